"""``optax-layca reproduce class-specialisation --quick`` (Lan et al., 2019, §S6.2)."""

from __future__ import annotations

import math

import numpy as np
from _reproduce_utils import (
    check_files_and_section,
    non_finite,
    panel_titles,
    quick_record_fixture,
)

from optax_layca.app._experiments import _class_specialisation

NAME = "class-specialisation"


record = quick_record_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec)
    allowed = ("diverged_at", "config", "val_acc", "neuron_specialisation")  # dead neurons: NaN
    assert non_finite(rec, allowed=allowed) == []
    assert np.asarray(rec["per_class_layer"]).shape == (10, 6)
    assert {k: np.asarray(v).shape for k, v in rec["neuron_class_lca"].items()}["Dense_0"] == (
        10,
        64,
    )


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _class_specialisation.figure(rec)
    titles = panel_titles(fig)
    assert titles[0].startswith("§S6.2")
    heat = fig.subfigs[0].axes[0]
    np.testing.assert_allclose(heat.images[0].get_array(), rec["per_class_layer"])
    plt.close(fig)


def test_specialisation_index_against_a_direct_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 7))
    got = _class_specialisation.specialisation(x)
    for j in range(7):
        h = np.maximum(-x[:, j], 0)
        p = h[h > 0] / h.sum()
        want = 1 + np.sum(p * np.log(p)) / math.log(10)
        assert abs(got[j] - want) < 1e-12


def test_class_runs_add_up_to_the_per_class_allocation(record):
    """Two instruments, one path: the per-class × per-layer LCA of the whole-set recorder and
    the per-parameter LCA of each class's examples (weighted by N_c / N), summed per layer.
    Both integrate the same 20 steps, each step's error within the tolerance 0.001 of its
    own loss (the classes' shares sum to the loss), so they agree within 2 · 20 · 0.001."""
    _, rec = record
    a = np.asarray(rec["per_class_layer"])
    b = np.asarray(rec["per_class_layer_from_class_runs"])
    assert abs(a.sum() - b.sum()) <= 2 * 20 * 1e-3
    assert np.abs(a - b).max() <= 2 * 20 * 1e-3
