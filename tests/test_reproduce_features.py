"""``optax-layca reproduce features --quick`` (Carbonnelle & De Vleeschouwer, extended
version, 2019, §6, Fig. 8)."""

from __future__ import annotations

import numpy as np
from _reproduce_utils import check_files_and_section, panel_titles, quick_fixture

from optax_layca.app._experiments import _features

NAME = "features"


record = quick_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec, may_be_null=("val_acc",))  # no validation split
    assert rec["image_shape"] == [8, 8] and len(rec["units"]) == _features.NUM_UNITS
    for rows in rec["features"].values():
        assert np.shape(rows) == (64, _features.NUM_UNITS)
    for dist in (*rec["displacement_distance"].values(), *rec["unit_distance_to_init"].values()):
        assert len(dist) == 256 and all(0 <= d <= 2 for d in dist)  # one per hidden unit


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _features.figure(rec)
    titles = panel_titles(fig)
    assert titles[0].startswith("Fig. 8") and "layer rotation of the first layer" in titles
    images = [ax for ax in fig.subfigs[0].axes if ax.images]
    assert len(images) == (1 + len(rec["ks"])) * _features.NUM_UNITS  # init + every rate
    first = np.asarray(rec["features"]["init"])[:, 0].reshape(8, 8)
    np.testing.assert_allclose(images[0].images[0].get_array(), first)
    plt.close(fig)


def test_layca_sets_the_rotation(record):
    """Robust at any scale: Layca's rate controls the rotation, so the first layer's cosine
    distance to init grows with ρ(0)."""
    _, rec = record
    rot = [rec["rotation"][_features.run_key(k)] for k in rec["ks"]]
    assert np.all(np.diff(rot) > 0), rot
