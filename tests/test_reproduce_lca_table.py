"""``optax-layca reproduce lca-table --quick`` (Lan et al., 2019, Table 1, Fig. 3, Tables S1
and S2)."""

from __future__ import annotations

import numpy as np
from _reproduce_utils import (
    check_files_and_section,
    panel_titles,
    quick_fixture,
)

from optax_layca.app._experiments import _lca_table

NAME = "lca-table"


record = quick_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec)
    assert list(rec["runs"]) == ["sgd0", "sgd", "adam"]
    assert rec["identity"]["iterations"] == 20 and rec["layers"] == [
        "Dense_0",
        "Dense_1",
        "Dense_2",
    ]
    report = (out / "report.md").read_text()
    assert "Total error, RK4" in report and "iterations per weight movement" in report


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _lca_table.figure(rec)
    titles = panel_titles(fig)
    assert titles[0].startswith("Fig. 3a") and titles[1].startswith("Fig. 3c")
    assert [t.split(":")[0] for t in titles[-3:]] == ["Fig. 3c", "Table S1", "Table S2"]
    stacks = fig.subfigs[0].axes
    assert len(stacks) == 3 and all(len(ax.collections) == 3 for ax in stacks)
    assert fig.subfigs[1].axes[1].get_yscale() == "log"
    plt.close(fig)


def test_fractions_are_a_partition_of_the_parameters(record):
    _, rec = record
    for r in rec["runs"].values():
        total = sum(np.asarray(r["fractions"][k]) for k in ("helping", "hurting", "zero"))
        # counts / P in float64, then rounded to 7 significant digits by the JSON writer
        np.testing.assert_allclose(total, 1.0, atol=3e-7)
        assert len(r["fractions"]["helping"]) == 20


def test_rk4_is_far_more_exact_than_first_order(record):
    """Robust at any scale (Lan et al., 2019, §2, Table S1): RK4 is fourth order, first order
    is first order; every RK4 step meets the paper's tolerance."""
    _, rec = record
    for r in rec["runs"].values():
        e = r["error"]
        assert abs(e["total_error_rk4_pct"]) < 1.0
        assert e["mean_iteration_error_fo"] > 10 * e["mean_iteration_error_rk4"]
        assert r["rk4_summary"]["num_unconverged"] == 0


def test_momentum_slows_the_oscillations(record):
    """Robust (Table S2): with momentum 0.9 a parameter's motion averages the last ~10
    gradients, so it changes direction far less often than plain SGD's."""
    _, rec = record
    runs = rec["runs"]
    assert (
        runs["sgd"]["iterations_per_motion_change"]
        > 2 * runs["sgd0"]["iterations_per_motion_change"]
    )
