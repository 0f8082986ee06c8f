"""``optax-layca reproduce synchronisation --quick`` (Lan et al., 2019, §5, Fig. 6,
S16–S19)."""

from __future__ import annotations

import numpy as np
from _reproduce_utils import (
    check_files_and_section,
    non_finite,
    panel_titles,
    quick_record_fixture,
)

from optax_layca.app._experiments import _synchronisation

NAME = "synchronisation"


record = quick_record_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec)
    assert non_finite(rec, allowed=("diverged_at", "config", "val_acc")) == []
    moments = np.asarray(rec["class_layer"]["moments"])
    assert moments.shape == (10, 20, 3)  # classes × iterations × layers
    assert np.asarray(rec["layer"]["moments"]).shape == (20, 3)
    assert len(rec["class_layer"]["baseline"]) == _synchronisation.SHUFFLES


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _synchronisation.figure(rec)
    titles = panel_titles(fig)
    assert titles[1].startswith("Fig. 6") and titles[2].startswith("S17, S18, S19")
    raster = fig.subfigs[1].axes[0]
    dots = sum(len(c.get_offsets()) for c in raster.collections)
    assert dots == int(np.sum(rec["class_layer"]["moments"]))
    plt.close(fig)


def test_synchronised_moments_are_moments_shared_by_two_layers(record):
    _, rec = record
    for view in ("class_layer", "layer", "gradient", "motion"):
        m = np.asarray(rec[view]["moments"], bool)
        s = np.asarray(rec[view]["synchronized"], bool)
        shared = m & (m.sum(axis=-1, keepdims=True) >= 2)
        np.testing.assert_array_equal(s, shared)
        assert rec[view]["num_synchronized"] == int(s.sum())


def test_gradient_only_and_motion_only_curves_have_the_same_total(record):
    """Σ_t G_l = Σ_i (Σ_t g_i) m̄_i = T Σ_i ḡ_i m̄_i = Σ_t M_l, for every layer. Computed in
    float64 (error ~1e-16 relative), then every value rounded to 7 significant digits by the
    JSON writer (≤ 5e-8 relative each): |Σ G − Σ M| ≤ 5e-8 (Σ|G| + Σ|M|), with margin 2."""
    _, rec = record
    for layer in rec["layers"]:
        g, m = np.asarray(rec["gradient_only"][layer]), np.asarray(rec["motion_only"][layer])
        assert abs(g.sum() - m.sum()) <= 1e-7 * (np.abs(g).sum() + np.abs(m).sum())


def test_class_moments_outnumber_the_shifted_baseline(record):
    """At quick scale the per-class × per-layer moments are already synchronised well above
    the shifted baseline (Fig. 6); the per-layer count (S17) is too small to tell."""
    _, rec = record
    d = rec["class_layer"]
    assert d["num_synchronized"] > d["baseline_mean"]
