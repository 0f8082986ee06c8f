"""``optax-layca reproduce weight-decay --quick`` (Carbonnelle & De Vleeschouwer, 2019,
Fig. 4 and Fig. 10)."""

from __future__ import annotations

import numpy as np
from _reproduce_utils import check_files_and_section, panel_titles, quick_fixture

from optax_layca.app._experiments import _weight_decay

NAME = "weight-decay"


record = quick_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec)
    assert set(rec["chosen"]) == {"sgd", "sgd_l2", "layca"}
    assert rec["runs"][rec["chosen"]["sgd_l2"]]["hparams"]["weight_decay"] == 2e-3


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _weight_decay.figure(rec)
    titles = panel_titles(fig)
    assert titles[0].startswith("Fig. 4") and titles[1].startswith("Fig. 10")
    grid = [ax for ax in fig.subfigs[1].axes]
    assert len(grid) == 6
    assert [ax.get_ylabel() for ax in grid[::2]] == [
        "rotation per epoch (cosine distance)",
        "grad norm",
        "weight norm",
    ]
    assert all(len(ax.lines) == 6 and ax.get_yscale() == "log" for ax in grid)
    plt.close(fig)


def test_layca_rotates_more_uniformly_than_sgd(record):
    """Robust at quick scale (Carbonnelle & De Vleeschouwer, 2019, §4-5): Layca rotates every
    layer at the same rate, SGD mostly its last layer (min / max over layers)."""
    _, rec = record
    uniformity = lambda key: (lambda v: v.min() / v.max())(
        np.asarray(list(rec["runs"][key]["final_cosine_distance"].values()))
    )
    assert uniformity("layca") > uniformity(rec["chosen"]["sgd"]) + 0.2
