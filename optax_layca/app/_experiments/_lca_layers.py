"""``lca-layers``: which layers help, and what freezing one does (Lan et al., 2019, §4,
Fig. 4, S11, S13, S14).

Four runs of the stand-in MNIST–FC (SGD, momentum 0.9, lr 0.05) from one initialisation on the
same batches, trained together as one vmapped group (the authors' ``--freeze_layers`` and
``--opt2_layers``): the baseline, the first layer frozen at its initialisation, the last layer
frozen, and the last layer at lr / 10. A frozen layer has learning-rate factor 0: its update is
exactly 0, so its LCA is exactly 0 at every step.

Rules, fixed before any run (every layer, or every run, one observation):

* S11, "all layers helping" for MNIST–FC with SGD: every layer's cumulative LCA in the baseline
  is negative: agrees; one is positive: does not reproduce.
* freezing the first layer makes "the other layers, especially the neighboring ones" help less
  (the neighbour's cumulative LCA rises: agrees; falls: does not reproduce), and "the overall
  performance is not any better" (final training loss not lower than the baseline's by more
  than 2%: agrees; lower by more: does not reproduce);
* freezing the last layer, the neighbour helps less (same rule);
* lr / 10 on the last layer "results in similar behavior as freezing it": every layer's
  cumulative LCA moves the same way from the baseline (sign of the change) under both: agrees;
  the opposite way for every layer: does not reproduce; otherwise inconclusive;
* "freezing the last layer results in significant improvement" is the paper's finding for
  networks whose last layer hurts (CIFAR–ResNet); it is judged (final training loss lower with
  the last layer frozen) only when the baseline's last layer hurts, and reported otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import AGREES, INCONCLUSIVE, NOT_REPRODUCED, Experiment, ExperimentConfig, register
from ._common import combine
from ._lca_runs import (
    LAN_2019,
    STAND_IN,
    layer_names,
    layer_table,
    layerwise_sgd,
    record_lca,
    run_numbers,
    sgd_hparams,
)

__all__ = ["figure", "run", "verdict"]

NOT_BETTER_RTOL = 0.02  # "not any better": final loss not lower than the baseline's by > 2%
RUNS = {  # key: (label, first-layer factor, last-layer factor)
    "base": ("baseline", 1.0, 1.0),
    "freeze_first": ("first layer frozen", 0.0, 1.0),
    "freeze_last": ("last layer frozen", 1.0, 0.0),
    "last_lr10": ("last layer at lr / 10", 1.0, 0.1),
}


def _group():
    from .._train import Group, Run

    runs = tuple(
        Run(key, label, sgd_hparams(first_scale=f, last_scale=la))
        for key, (label, f, la) in RUNS.items()
    )
    return Group("SGD, layers frozen / slowed (vmapped)", layerwise_sgd, runs)


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Trains the four runs with every step allocated; returns Fig. 4 / S13's numbers."""
    from ... import lca

    task, runs, identity = record_lca("lca-layers", config, [_group()], test_loss=True)
    names = layer_names(task)
    out = {}
    for key, r in runs.items():
        h = r.histories["rk4"]
        cum = lca.cumulative_per_layer(h)
        out[key] = {
            **run_numbers(r, names),
            "cumulative": {n: cum[n] for n in names},
            "max_abs_per_step": {
                n: float(np.max(np.abs(h.per_layer[:, i]))) for i, n in enumerate(h.layer_names)
            },
            "final_test_loss": r.test_loss,
        }
    results = {
        "identity": identity,
        "layers": names,
        "runs": out,
        "histories": {k: r.result.history for k, r in runs.items()},
    }
    tail = {"final train loss": "final_train_loss", "final test loss": "final_test_loss"}
    table = layer_table(out, names, ["run"], lambda r: [r["label"]], tail)
    results["table"] = "Cumulative LCA per layer (negative = helped):\n\n" + table
    return results


# ----------------------------------------------------------------------------- figure


def figure(results: Mapping[str, Any]):
    """Fig. 4 / S13 (cumulative LCA per layer of each run, grouped bars; training loss of each
    run) above Fig. S14's per-layer "loss curves" (cumulative LCA over iterations), one panel
    per run, coloured by depth."""
    import matplotlib.pyplot as plt

    from ... import plot
    from .._figures import tidy

    runs, names = results["runs"], results["layers"]
    fig = plt.figure(figsize=(15, 8), layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    bars, losses = top.subplots(1, 2)
    plot.lca_bars_figure(
        {r["label"]: r["per_layer"] for r in runs.values()},
        ax=bars,
        categories=names,
        title="Fig. 4 / S13: LCA per layer",
    )
    plot.training_curves_figure(
        {
            r["label"]: (r["train_loss"]["iteration"], r["train_loss"]["loss"])
            for r in runs.values()
        },
        ax=losses,
        xlabel="iteration",
        ylabel="training-set loss",
        colors="tab10",
        title="training loss (whole training set)",
    )
    top.suptitle("Fig. 4: freezing the first or last layer, or the last at lr / 10", fontsize=11)
    axes = list(bottom.subplots(1, len(runs), sharey=True))
    for ax, r in zip(axes, runs.values()):
        t = np.arange(1, len(next(iter(r["cumulative"].values()))) + 1)
        plot.training_curves_figure(
            {n: (t, r["cumulative"][n]) for n in names},
            ax=ax,
            xlabel="iteration",
            ylabel="cumulative LCA",
            title=r["label"],
            legend=ax is axes[0],
        )
    tidy(bottom, axes, "Fig. S14: cumulative LCA of each layer over training (dark = first)")
    return fig


# ----------------------------------------------------------------------------- verdict


def _rises(after: float, before: float) -> str:
    if not (math.isfinite(after) and math.isfinite(before)):
        return INCONCLUSIVE
    return AGREES if after > before else NOT_REPRODUCED


def _same_direction(a: Mapping[str, float], b: Mapping[str, float], base, names) -> str:
    da = np.sign([a[n] - base[n] for n in names])
    db = np.sign([b[n] - base[n] for n in names])
    if np.all(da == db) and np.all(da != 0):
        return AGREES
    return NOT_REPRODUCED if np.all(da == -db) and np.all(da != 0) else INCONCLUSIVE


def verdict(results: Mapping[str, Any]) -> tuple[str, str]:
    """The rules of the module docstring."""
    runs, names = results["runs"], results["layers"]
    lca = {k: r["per_layer"] for k, r in runs.items()}
    loss = {k: r["final_train_loss"] for k, r in runs.items()}
    base = lca["base"]
    s_help = AGREES if all(base[n] < 0 for n in names) else NOT_REPRODUCED
    second, before_last = names[1], names[-2]
    s_first = _rises(lca["freeze_first"][second], base[second])
    better = loss["freeze_first"] < (1 - NOT_BETTER_RTOL) * loss["base"]
    s_first_loss = NOT_REPRODUCED if better else AGREES
    s_last = _rises(lca["freeze_last"][before_last], base[before_last])
    s_lr10 = _same_direction(lca["last_lr10"], lca["freeze_last"], base, names)
    statuses = [s_help, s_first, s_first_loss, s_last, s_lr10]
    fmt = lambda d: "[" + ", ".join(f"{d[n]:+.3f}" for n in names) + "]"
    improvement = "the baseline's last layer helped, so this premise is absent (not judged)"
    if base[names[-1]] > 0:
        s_imp = AGREES if loss["freeze_last"] < loss["base"] else NOT_REPRODUCED
        statuses.append(s_imp)
        improvement = f"the last layer hurt; freezing it lowers the final loss: {s_imp}"
    text = (
        f"Cumulative LCA per layer {names}: baseline {fmt(base)} (all help: {s_help}); first "
        f"frozen {fmt(lca['freeze_first'])} (the neighbour helps less: {s_first}; final loss "
        f"{loss['freeze_first']:.4f} vs {loss['base']:.4f}, not better: {s_first_loss}); last "
        f"frozen {fmt(lca['freeze_last'])} (the neighbour helps less: {s_last}; final loss "
        f"{loss['freeze_last']:.4f}: {improvement}); last at lr / 10 {fmt(lca['last_lr10'])} "
        f"(every layer moves as when frozen: {s_lr10})."
    )
    return combine(statuses), text


CLAIM = (
    "We see an expected pattern for MNIST–FC and MNIST–Lenet (all layers helping; Figure S11) "
    "[...] Though we can prevent this layer from hurting, the overall performance is not any "
    "better because the other layers, especially the neighboring ones, start to help less "
    "[...] freezing the last layer at its initialization (Figure 4) improves training "
    "performance [...] We also observe other layers, especially neighboring ones, not helping "
    "as much, but this time the change in the last layer’s LCA more than compensates. "
    "Decreasing the learning rate of the last layer by 10x (0.01 as opposed to 0.1 for other "
    "layers) results in similar behavior as freezing it."
)

EXPERIMENT = register(
    Experiment(
        "lca-layers",
        LAN_2019.at("§4, Fig. 4, S11, S13, S14"),
        CLAIM,
        STAND_IN + " SGD with momentum 0.9 (lr 0.05) stands in for CIFAR–ResNet's SGD "
        "(lr 0.1); the four runs start from one initialisation and see the same batches.",
        run,
        figure,
        verdict,
    )
)
