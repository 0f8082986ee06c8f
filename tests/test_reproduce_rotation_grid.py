"""``optax-layca reproduce rotation-grid --quick`` (Carbonnelle & De Vleeschouwer, 2019,
Fig. 2a, 2b and 3)."""

from __future__ import annotations

import numpy as np
from _reproduce_utils import check_files_and_section, panel_titles, quick_fixture

from optax_layca.app._experiments import _rotation_grid

NAME = "rotation-grid"


record = quick_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec)
    ks, alphas = rec["ks"], rec["alphas"]
    assert np.shape(rec["test_acc"]) == (len(ks), len(alphas)) and len(rec["histories"]) == 9


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _rotation_grid.figure(rec)
    titles = panel_titles(fig)
    assert [t.split(":")[0] for t in titles[:3]] == ["Fig. 2a", "Fig. 2b", "Fig. 3"]
    assert "test accuracy vs α (ρ(0) tuned)" in titles
    assert "test accuracy vs ρ(0) (α = 0)" in titles
    curves = [ax for ax in fig.subfigs[1].axes if ax.get_label() != "<colorbar>"]
    assert all(len(ax.lines) == 6 for ax in curves)  # one line per layer
    assert all("Δη" in ax.get_title() for ax in curves)
    assert [ax.get_xlabel() for ax in curves] == ["epoch"] * len(curves)
    plt.close(fig)


def test_layca_controls_the_rotation_rates(record):
    """Robust at any scale (Fig. 2b: "Layca enables good control over the rotation rates"):
    a higher ρ(0) rotates every layer further; α < 0 favours the first layer, α > 0 the last."""
    _, rec = record
    final = {
        k: np.asarray(list(r["final_cosine_distance"].values())) for k, r in rec["runs"].items()
    }
    key = _rotation_grid.run_key
    assert np.all(final[key(-3, 0.0)] > final[key(-5, 0.0)])
    assert final[key(-3, -0.6)][0] > final[key(-3, -0.6)][-1]
    assert final[key(-3, 0.6)][-1] > final[key(-3, 0.6)][0]
