"""``optax-layca reproduce phase-lag --quick`` (Lan et al., 2019, §4, Fig. 5)."""

from __future__ import annotations

import numpy as np
from _reproduce_utils import (
    check_files_and_section,
    non_finite,
    panel_titles,
    quick_record_fixture,
)

from optax_layca.app._experiments import _phase_lag

NAME = "phase-lag"


record = quick_record_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec)
    assert non_finite(rec, allowed=("diverged_at", "config", "val_acc")) == []
    assert rec["delays"] == list(_phase_lag.QUICK_DELAYS)


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _phase_lag.figure(rec)
    left = fig.axes[0]
    assert panel_titles(fig)[0].startswith("Fig. 5")
    curves = [line for line in left.lines if line.get_label() in rec["layers"]]
    assert len(curves) == 3  # a line per layer, over the delays
    np.testing.assert_allclose(curves[0].get_xdata(), rec["delays"])
    np.testing.assert_allclose(
        curves[-1].get_ydata(),
        [rec["runs"][f"delay{d}"]["per_layer"]["Dense_2"] for d in rec["delays"]],
    )
    plt.close(fig)


def test_delay_momentum_has_the_delay_as_mean_lag():
    """The weights (1 − β) β^k of the gradient k steps old have mean β / (1 − β) = d."""
    for d in (0, 1, 3, 9):
        beta = _phase_lag.delay_momentum(d)
        k = np.arange(20000)
        w = (1 - beta) * beta**k
        assert abs(np.sum(k * w) - d) < 1e-6 * (1 + d)


def test_every_delay_keeps_the_last_layers_terminal_step():
    """lr · scale / (1 − β) is the same at every delay (only the delay changes)."""
    group = _phase_lag._group(_phase_lag.DELAYS)
    steps = [
        r.hparams["lr"] * r.hparams["last_scale"] / (1 - r.hparams["last_momentum"])
        for r in group.runs
    ]
    np.testing.assert_allclose(steps, steps[0], rtol=1e-12)


def test_linear_r2_matches_numpy():
    rng = np.random.default_rng(0)
    x, y = np.arange(6.0), rng.normal(size=6)
    assert abs(_phase_lag.linear_r2(x, y) - np.corrcoef(x, y)[0, 1] ** 2) < 1e-12
