"""``optax-layca reproduce adapt-copy --quick`` (Carbonnelle & De Vleeschouwer, extended
version, 2019, §5.4, Fig. 7)."""

from __future__ import annotations

import numpy as np
from _reproduce_utils import check_files_and_section, panel_titles, quick_fixture

from optax_layca.app._experiments import _adapt_copy

NAME = "adapt-copy"


record = quick_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec)
    assert rec["shown"][1:3] == ["copy_step_angle", "copy_cosine_distance"]


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _adapt_copy.figure(rec)
    titles = panel_titles(fig)
    assert any(t.startswith("Fig. 7") for t in titles)
    curves = [ax for ax in fig.subfigs[0].axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title().split(" (")[0] for ax in curves] == [
        "Adam",
        "AdaptCopy of Adam",
        "AdaptCopy of Adam",
        "SGD_AMom",
    ]
    assert all(len(ax.lines) == 6 and ax.get_ylim() == (0.0, 1.0) for ax in curves)
    assert all(len(ax.lines) == 4 for ax in fig.subfigs[1].axes)
    plt.close(fig)


def test_copy_replays_adams_path_length(record):
    """The paper's rule turns each layer by Adam's mean angle per step between records, so at
    every record the copy's cumulative angle is Adam's."""
    _, rec = record
    adam = rec["histories"][rec["chosen"]["adam"]]
    copy = rec["histories"]["copy_step_angle"]
    np.testing.assert_array_equal(copy.steps, adam.steps)
    a, c = adam.get("cumulative_angle"), copy.get("cumulative_angle")
    for path in a:
        # sums of <= 128 float32 angles: |err| <= 128·eps·Σθ (eps = 2**-24) ≈ 1e-5 relative
        np.testing.assert_allclose(c[path], a[path], rtol=1e-4, atol=1e-6, err_msg=path)


def test_curve_target_lands_on_adams_curves(record):
    """By construction (a deadbeat controller on the sphere) the curve target copies Adam's
    cosine distances to init, whatever the scale."""
    _, rec = record
    gap = _adapt_copy.rotation_gap(rec, "copy_cosine_distance", rec["chosen"]["adam"])
    assert gap <= _adapt_copy.SAME_CURVES
