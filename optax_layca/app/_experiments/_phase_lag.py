"""``phase-lag``: the last layer's information delay (Lan et al., 2019, §4 "Phase shift
hypothesis", Fig. 5).

Momentum ``β`` applies gradients ``β / (1 − β)`` steps old on average (0.9: 9 steps). The
paper trains every layer with momentum 0.9 and the last layer with the momentum of a delay
``d``, ``β_d = d / (d + 1)``, and reads each layer's cumulative LCA against ``d``. Here the
last layer's learning rate is also scaled by ``(1 − β_d) / (1 − 0.9)`` so that its terminal
step ``lr / (1 − β)`` stays the same at every delay: only the delay changes (the paper's text
does not say whether it kept the step; the authors' ``--lr_special`` / ``--mom_special`` allow
both). The runs start from one initialisation, see the same batches and train as one vmapped
group.

Rules, fixed before any run:

* "the transition from hurting to helping ... is almost linear with respect to delay": the
  last layer's cumulative LCA rises with its delay (Spearman r ≥ 0.5: agrees; ≤ −0.5: does not
  reproduce; fewer than 4 delays: inconclusive), and a straight line through (delay, LCA)
  explains R² ≥ 0.9 of it (agrees; < 0.5 does not reproduce; between inconclusive);
* as the last layer gets fresher information "it begins to steal progress from other layers":
  the neighbouring layer's cumulative LCA falls with the delay (Spearman r ≤ −0.5: agrees;
  ≥ 0.5: does not reproduce), "eventually forcing the neighboring layers into positive LCA"
  (the neighbour's LCA at delay 0 is positive: agrees; otherwise does not reproduce).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import AGREES, INCONCLUSIVE, NOT_REPRODUCED, Experiment, ExperimentConfig, register
from ._common import combine, rank_trend, trend_status
from ._lca_runs import (
    LAN_2019,
    MOMENTUM,
    STAND_IN,
    layer_names,
    layer_table,
    layerwise_sgd,
    record_lca,
    run_numbers,
    sgd_hparams,
)

__all__ = ["delay_momentum", "figure", "run", "verdict"]

DELAYS, QUICK_DELAYS = (9, 6, 3, 1, 0), (9, 3, 0)
LINEAR, NOT_LINEAR = 0.9, 0.5  # R² of the straight line


def delay_momentum(delay: float) -> float:
    """The momentum whose mean information delay is ``delay`` steps: ``β = d / (d + 1)``
    (the weights ``(1 − β) β^k`` of the gradient ``k`` steps old have mean ``β / (1 − β)``).

    Examples:
      >>> delay_momentum(9), delay_momentum(0)
      (0.9, 0.0)
    """
    return delay / (delay + 1.0)


def _group(delays):
    from .._train import Group, Run

    def hp(d):
        beta = delay_momentum(d)
        scale = (1.0 - beta) / (1.0 - MOMENTUM)
        return sgd_hparams(last_scale=scale, last_momentum=beta)

    runs = tuple(
        Run(f"delay{d}", f"last layer delay {d} (momentum {delay_momentum(d):.3g})", hp(d))
        for d in delays
    )
    return Group("SGD, last-layer delay (vmapped)", layerwise_sgd, runs)


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Trains one run per delay with every step allocated; returns Fig. 5's numbers."""
    delays = QUICK_DELAYS if config.quick else DELAYS
    task, runs, identity = record_lca("phase-lag", config, [_group(delays)])
    names = layer_names(task)
    out = {
        f"delay{d}": {
            **run_numbers(runs[f"delay{d}"], names),
            "delay": d,
            "momentum": delay_momentum(d),
        }
        for d in delays
    }
    results = {
        "identity": identity,
        "layers": names,
        "delays": list(delays),
        "runs": out,
        "histories": {k: r.result.history for k, r in runs.items()},
    }
    lead = ["last-layer delay", "its momentum"]
    row = lambda r: [r["delay"], f"{r['momentum']:.3g}"]
    table = layer_table(out, names, lead, row, {"final loss": "final_train_loss"})
    results["table"] = "Cumulative LCA per layer against the last layer's delay:\n\n" + table
    return results


def _series(results: Mapping[str, Any], layer: str) -> np.ndarray:
    return np.asarray(
        [results["runs"][f"delay{d}"]["per_layer"][layer] for d in results["delays"]], float
    )


def figure(results: Mapping[str, Any]):
    """Fig. 5: cumulative LCA of each layer against the last layer's delay (a line per layer,
    dark = first), and the training loss of each delay."""
    import matplotlib.pyplot as plt

    from ... import plot

    names, delays = results["layers"], results["delays"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    plot.training_curves_figure(
        {n: (delays, _series(results, n)) for n in names},
        ax=left,
        xlabel="last layer's delay (steps)",
        ylabel="cumulative LCA (negative = helped)",
        title="Fig. 5: LCA per layer vs the last layer's delay",
    )
    for line in left.lines:
        line.set_marker("o")
    left.axhline(0.0, color="k", lw=0.8)
    plot.training_curves_figure(
        {
            r["label"]: (r["train_loss"]["iteration"], r["train_loss"]["loss"])
            for r in results["runs"].values()
        },
        ax=right,
        xlabel="iteration",
        ylabel="training-set loss",
        colors="plasma",
        title="training loss",
    )
    return fig


def linear_r2(x, y) -> float:
    """R² of the least-squares line through ``(x, y)`` (NaN with fewer than 3 points or a
    constant ``y``).

    Examples:
      >>> linear_r2([0, 1, 2, 3], [1, 3, 5, 7]), round(linear_r2([0, 1, 2, 3], [0, 1, 0, 1]), 2)
      (1.0, 0.2)
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(y) == 0:
        return math.nan
    fit = np.polyval(np.polyfit(x, y, 1), x)
    return float(1.0 - np.sum((y - fit) ** 2) / np.sum((y - y.mean()) ** 2))


def verdict(results: Mapping[str, Any]) -> tuple[str, str]:
    """The rules of the module docstring."""
    names, delays = results["layers"], results["delays"]
    last, neighbour = _series(results, names[-1]), _series(results, names[-2])
    r_last = rank_trend(delays, last)
    r2 = linear_r2(delays, last)
    s_lin = (
        INCONCLUSIVE
        if not math.isfinite(r2)
        else (AGREES if r2 >= LINEAR else NOT_REPRODUCED if r2 < NOT_LINEAR else INCONCLUSIVE)
    )
    r_nb = rank_trend(delays, neighbour)
    at0 = neighbour[list(delays).index(0)] if 0 in delays else math.nan
    s_pos = INCONCLUSIVE if not math.isfinite(at0) else (AGREES if at0 > 0 else NOT_REPRODUCED)
    statuses = [trend_status(r_last), s_lin, trend_status(-r_nb), s_pos]
    fmt = lambda v: "[" + ", ".join(f"{x:+.4f}" for x in v) + "]"
    text = (
        f"Over delays {list(delays)}, the last layer's ({names[-1]}) cumulative LCA is "
        f"{fmt(last)}: Spearman r with the delay {r_last:.2f} ({statuses[0]}), straight-line "
        f"R² {r2:.2f} ({s_lin}). The neighbour's ({names[-2]}) is {fmt(neighbour)}: r "
        f"{r_nb:.2f} (falls with the delay: {statuses[2]}); at delay 0 it is {at0:+.4f} "
        f"(positive: {s_pos})."
    )
    return combine(statuses), text


CLAIM = (
    "We note that training with momentum 0.9 corresponds to an information lag of 9 steps "
    "(the mean of an exponential series with exponent .9)—each update applied uses information "
    "9 steps old. [...] As shown in Figure 5, this works, and the transition from hurting to "
    "helping (a lot) is almost linear with respect to delay! As we give the last layer an "
    "information freshness advantage, it begins to “steal progress” from other layers, "
    "eventually forcing the neighboring layers into positive LCA."
)

EXPERIMENT = register(
    Experiment(
        "phase-lag",
        LAN_2019.at("§4, Fig. 5"),
        CLAIM,
        STAND_IN + " SGD with momentum 0.9 (lr 0.05) for every layer but the last, whose "
        "delay d ∈ {9, 6, 3, 1, 0} (quick: 9, 3, 0) sets its momentum d / (d + 1), with its "
        "learning rate scaled by (1 − β_d) / 0.1 to keep its terminal step; CIFAR–ResNet in "
        "the paper, whose last layer hurts at delay 9 (MNIST–FC's helps).",
        run,
        figure,
        verdict,
    )
)
