"""``optax-layca reproduce lars --quick`` (Carbonnelle & De Vleeschouwer, 2019, App. A.2,
Fig. 8)."""

from __future__ import annotations

from _reproduce_utils import check_files_and_section, panel_titles, quick_fixture

from optax_layca.app._experiments import _lars

NAME = "lars"


record = quick_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec, may_be_null=("val_acc",))


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _lars.figure(rec)
    titles = panel_titles(fig)
    assert titles[0].startswith("Fig. 8")
    curves = [ax for ax in fig.subfigs[0].axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title().split(" (")[0] for ax in curves] == ["LARS", "Layca"]
    assert all(len(ax.lines) == 6 and ax.get_ylim() == (0.0, 1.0) for ax in curves)
    plt.close(fig)


def test_lars_curves_are_layca_curves(record):
    """Robust at quick scale (Fig. 8: "indistinguishable"): for small rotations LARS without
    operations 1 and 4 moves each layer as Layca does."""
    _, rec = record
    assert _lars.curve_gap(rec) <= _lars.SAME_CURVES
