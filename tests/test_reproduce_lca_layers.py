"""``optax-layca reproduce lca-layers --quick`` (Lan et al., 2019, §4, Fig. 4, S11, S13,
S14)."""

from __future__ import annotations

from _reproduce_utils import (
    check_files_and_section,
    non_finite,
    panel_titles,
    quick_record_fixture,
)

from optax_layca.app._experiments import _lca_layers

NAME = "lca-layers"


record = quick_record_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec)
    assert non_finite(rec, allowed=("diverged_at", "config", "val_acc")) == []
    assert list(rec["runs"]) == list(_lca_layers.RUNS)


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _lca_layers.figure(rec)
    titles = panel_titles(fig)
    assert titles[0].startswith("Fig. 4") and titles[1].startswith("Fig. S14")
    bars = fig.subfigs[0].axes[0]
    assert len(bars.patches) == 4 * 3  # a bar per run and layer
    assert [ax.get_title() for ax in fig.subfigs[1].axes] == [
        r[0] for r in _lca_layers.RUNS.values()
    ]
    plt.close(fig)


def test_a_frozen_layer_has_exactly_zero_lca(record):
    """Its update is -0 · trace: its parameters never move, so every step's LCA is 0."""
    _, rec = record
    runs = rec["runs"]
    assert runs["freeze_first"]["max_abs_per_step"]["Dense_0"] == 0.0
    assert runs["freeze_last"]["max_abs_per_step"]["Dense_2"] == 0.0
    assert runs["base"]["max_abs_per_step"]["Dense_0"] > 0


def test_layers_add_up_to_the_loss_change(record):
    """Σ layers = Σ LCA = ΔL − Σ error; each of the 20 steps errs by at most the tolerance
    (0.001) or its float32 noise floor (far below), so |Σ error| <= 20 · 0.001."""
    _, rec = record
    for r in rec["runs"].values():
        loss = r["train_loss"]["loss"]
        assert abs(sum(r["per_layer"].values()) - (loss[-1] - loss[0])) <= 20 * 1e-3
        assert r["rk4_summary"]["num_unconverged"] == 0


def test_a_slower_last_layer_contributes_less(record):
    """Robust: at lr / 10 the last layer's steps are 10× shorter, so its |LCA| shrinks."""
    _, rec = record
    runs = rec["runs"]
    assert abs(runs["last_lr10"]["per_layer"]["Dense_2"]) < 0.5 * abs(
        runs["base"]["per_layer"]["Dense_2"]
    )
    loss = runs["base"]["train_loss"]["loss"]
    assert loss[-1] < loss[0]  # the baseline trains
