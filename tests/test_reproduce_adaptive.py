"""``optax-layca reproduce adaptive --quick`` (Carbonnelle & De Vleeschouwer, 2019, Fig. 5, 6
and 11), and the switch that lets different optimizers share one vmapped group."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reproduce_utils import check_files_and_section, panel_titles, quick_fixture

from optax_layca.app._experiments import _adaptive
from optax_layca.app._experiments._switch import switch

NAME = "adaptive"


record = quick_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec)  # validation split: val_acc
    assert set(rec["chosen"]) == {*_adaptive.PLAIN, *(f"{n}+layca" for n in _adaptive.WITH_LAYCA)}
    for snapshot in rec["moment_percentiles"].values():
        p = np.asarray(list(snapshot.values()))
        assert p.shape == (6, 3) and np.all(p > 0) and np.all(np.diff(p, axis=1) >= 0)


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _adaptive.figure(rec)
    titles = panel_titles(fig)
    assert titles[0].startswith("Fig. 5") and titles[1].startswith("Fig. 6")
    assert any(t.startswith("Fig. 11") for t in titles)
    curves = [ax for ax in fig.subfigs[0].axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title().split(" (")[0] for ax in curves] == [
        "RMSprop",
        "Adam",
        "Adagrad",
        "SGD",
        "SGD + Layca",
    ]
    assert all(len(ax.lines) == 6 and ax.get_ylim() == (0.0, 1.0) for ax in curves)
    pairs = fig.subfigs[1].axes
    assert len(pairs) == 3 and all(len(ax.lines) == 4 for ax in pairs)  # 2 runs x train/test
    plt.close(fig)


def test_layca_rotates_every_direction_at_its_rate(record):
    """Whatever the direction (SGD, RMSprop, Adagrad, Adam, SGD_AMom) picked by the switch,
    Layca turns every layer by arctan(ρ(0)) per step until the first decay."""
    _, rec = record
    decay = round(0.7 * rec["steps_per_epoch"] * len(rec["runs"]["layca_sgd"]["epoch_loss"]))
    for name in _adaptive.WITH_LAYCA:
        hist = rec["histories"][_adaptive.layca_key(name)]
        keep = (hist.steps > 0) & (hist.steps <= decay)
        assert keep.sum() >= 3
        want = np.arctan(rec["layca_rho"][name])
        for path, angle in hist.get("step_angle").items():
            # float32 angle of a float32 step: a few ulps of the angle (rtol 1e-5 = 80 ulps)
            np.testing.assert_allclose(angle[keep], want, rtol=1e-5, err_msg=f"{name} {path}")


def test_switch_runs_exactly_the_chosen_optimizer():
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
    txs = [optax.sgd(0.1), optax.adam(0.01), optax.rmsprop(0.02)]

    def trajectory(tx):
        state, p, out = tx.init(params), params, []
        for t in range(3):
            g = jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 1)), p)
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
            out.append(p)
        return out

    for i, tx in enumerate(txs):
        mixed = jax.jit(lambda idx: trajectory(switch(txs, idx)))(jnp.float32(i))
        for a, b in zip(jax.tree.leaves(mixed), jax.tree.leaves(trajectory(tx))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    stay = trajectory(switch(txs, jnp.int32(7)))[-1]  # no such optimizer: nothing moves
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stay), jax.tree.leaves(params)))
    with pytest.raises(ValueError, match="at least one"):
        switch([], 0)
