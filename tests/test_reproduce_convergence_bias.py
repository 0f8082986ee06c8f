"""``optax-layca reproduce convergence-bias --quick`` (Chen, Yuille & Zhou, 2023,
Definition 2.1, §2 and §5)."""

from __future__ import annotations

import numpy as np
from _reproduce_utils import (
    check_files_and_section,
    non_finite,
    panel_titles,
    quick_fixture,
)

from optax_layca.app._experiments import _convergence_bias

NAME = "convergence-bias"


record = quick_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    # at quick scale the high frequency may never be learned: no step, no coverage then
    check_files_and_section(out, NAME, rec, may_be_null=("learned_step", "coverage_at_high"))
    # the high frequency is not learned in the quick run: its step and phase are undefined
    allowed = ("diverged_at", "config", "val_acc", "learned_step", "coverage_at_high")
    assert non_finite(rec, allowed=allowed) == []
    assert len(rec["layers"]) == 6


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _convergence_bias.figure(rec)
    titles = panel_titles(fig)
    assert titles[0].startswith("Part A") and titles[1].startswith("Part B")
    rates = fig.subfigs[0].axes[0]
    assert len(rates.lines) == 6 and "Definition 2.1" in rates.get_title()
    plt.close(fig)


def test_every_layer_covers_its_whole_way_exactly_once(record):
    """F_l(0) = 0 and F_l(T) = 1 by Definition 2.1 (θ(T) = θ*), for both parts; the window
    rates telescope: Σ_i (t_i − t_{i−1}) C^{(t_{i−1}, t_i)} = F(T)."""
    _, rec = record
    a = rec["classification"]
    steps = np.asarray(a["epochs"]) * rec["identity"]["steps_per_epoch"]
    for layer in rec["layers"]:
        for cov in (a["coverage"][layer], rec["frequencies"]["coverage"][layer]):
            assert cov[0] == 0.0 and abs(cov[-1] - 1.0) < 1e-6  # 7 significant digits (JSON)
        telescoped = np.sum(np.diff(steps) * np.asarray(a["window_rate"][layer]))
        assert abs(telescoped - 1.0) < 1e-5  # ~100 terms, each rounded to 7 digits


def test_low_frequency_is_learned_first(record):
    """Robust (the frequency principle the paper builds on, Rahaman et al., 2019): the low
    frequency's residual falls below half, the high one's stays above it."""
    _, rec = record
    b = rec["frequencies"]
    low, high = (np.asarray(b["residual"][str(f)]) for f in _convergence_bias.FREQS)
    assert b["learned_step"]["1"] is not None and b["learned_step"]["1"] < b["steps"][-1]
    assert low[-1] < 0.5 < high[-1]


def test_helpers():
    assert _convergence_bias.first_below(
        [3, 2, 1], [0, 1, 2], 0.5
    ) != _convergence_bias.first_below([3, 2, 1], [0, 1, 2], 0.5)  # NaN: never below
    assert _convergence_bias.first_below([0.1, 0.6], [5, 7], 0.5, above=True) == 7.0
