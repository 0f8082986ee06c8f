"""``warmup``: SGD and Layca with and without a linear learning-rate warmup (Carbonnelle & De
Vleeschouwer, extended version, 2019, §5.3, Fig. 4).

The warmup starts at a tenth of the rate and reaches it linearly after ``d`` epochs (the
paper's scheme; the authors' ``lr_scheduler_with_warmup`` interpolates per batch): the rate of
step ``t`` is ``base × decay(t) × optax.linear_schedule(0.1, 1, d × steps_per_epoch)(t)``
(the ramp holds 1 after ``d`` epochs, so the step decay keeps its epochs). Every duration,
SGD learning rate and the two Layca runs train in one vmapped group (:mod:`._switch`; the
duration is a traced index into the ramps).

"High learning rate" (the paper's 3^-1 on ResNet-110) is fixed by rule: the largest rate of
the grid at which SGD *without* warmup trains (final training accuracy above twice chance, the
rule of :func:`._rotation_grid.trained`), so that, as in the paper, the run without warmup
still trains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import CARBONNELLE_EXTENDED_2019, Experiment, ExperimentConfig, register
from ._common import (
    combine,
    compare_accuracies,
    compare_layers,
    epoch_curves,
    history_curves,
    panels,
    run_summary,
    runs_table,
    train_runs,
)
from ._switch import METHOD, switched

__all__ = ["figure", "run", "verdict", "warmed_schedule"]

NAME = "warmup"
WARMUPS = (0, 1, 2, 3)  # warmup durations (epochs); the paper: 0, 5, 10, 15 of 200
SGD_KS = (-2, -1, 0, 1)  # SGD learning rates 3^k
LAYCA_RHO = 3.0**-3  # the paper's Layca rate for this experiment
EARLY = 0.125  # the paper looks at the first 25 of 200 epochs


def warmed_schedule(task: Any, hp: Mapping[str, Any]):
    """``step -> hp["lr"] × decay(step) × ramp(step)``, the ramp of ``WARMUPS[hp["warmup"]]``
    epochs from a tenth of the rate (none for 0)."""
    import jax.numpy as jnp
    import optax

    ramps = [
        optax.linear_schedule(0.1, 1.0, d * task.steps_per_epoch)
        if d
        else optax.constant_schedule(1.0)
        for d in WARMUPS
    ]
    decay = task.schedule(hp["lr"])

    def schedule(step):
        ramp = jnp.select([hp["warmup"] == i for i in range(len(ramps))], [r(step) for r in ramps])
        return decay(step) * ramp

    return schedule


def _sgd(task, hp):
    import optax

    return optax.sgd(warmed_schedule(task, hp))


def _layca(task, hp):
    from ... import layca

    return layca(warmed_schedule(task, hp), layer_order=task.order, non_layer="freeze")


def sgd_key(k: int, d: int) -> str:
    return f"sgd_k{k}_w{d}"


def layca_key(d: int) -> str:
    return f"layca_w{d}"


def _warm_label(d: int) -> str:
    return f"{d}-epoch warmup" if d else "no warmup"


def _group(ks):
    from .._train import Group, Run

    runs = [
        Run(
            sgd_key(k, d),
            f"SGD lr 3^{k}, {_warm_label(d)}",
            {METHOD: 0.0, "lr": 3.0**k, "warmup": float(i)},
        )
        for k in ks
        for i, d in enumerate(WARMUPS)
    ]
    runs += [
        Run(
            layca_key(d),
            f"Layca ρ(0) 3^-3, {_warm_label(d)}",
            {METHOD: 1.0, "lr": LAYCA_RHO, "warmup": float(WARMUPS.index(d))},
        )
        for d in (WARMUPS[0], WARMUPS[-1])
    ]
    return Group(
        f"SGD and Layca × warmups ({len(runs)} runs, vmapped)",
        switched([_sgd, _layca]),
        tuple(runs),
    )


def _train_config(config: ExperimentConfig):
    from .._train import TrainConfig

    return TrainConfig(
        dataset="mnist1d",
        model="deep",
        epochs=8 if config.quick else 30,
        seed=config.seed,
        num_train=1000 if config.quick else None,
        records_per_epoch=8,
        eval_every=1,
    )


def high_rate(results: Mapping[str, Any], ks) -> int:
    """The largest ``k`` whose SGD run without warmup trains (the smallest if none does)."""
    from ._rotation_grid import trained

    ok = [k for k in ks if trained(results, sgd_key(k, 0))]
    return max(ok) if ok else min(ks)


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Trains every SGD rate × warmup and Layca with and without warmup."""
    tc = _train_config(config)
    task, res, identity = train_runs(NAME, config, tc, [_group(SGD_KS)])
    order, spe = task.order, task.steps_per_epoch
    runs = {key: run_summary(r, order) for key, r in res.items()}
    k = high_rate({"runs": runs, "num_classes": int(task.data.num_classes)}, SGD_KS)
    shown = [sgd_key(k, d) for d in WARMUPS] + [layca_key(WARMUPS[0]), layca_key(WARMUPS[-1])]
    return {
        "identity": identity,
        "warmups": list(WARMUPS),
        "sgd_ks": list(SGD_KS),
        "high_k": k,
        "early_epoch": max(1, math.ceil(EARLY * tc.epochs)),
        "shown": shown,
        "runs": runs,
        "num_train": len(task.data.x_train),
        "num_test": len(task.data.x_test),
        "steps_per_epoch": spe,
        "layer_order": list(order),
        "curves": {
            key: history_curves(res[key].history, order, steps_per_epoch=spe) for key in shown
        },
        "epoch_rotation": {key: epoch_curves(res[key].history, order) for key in shown},
        "histories": {key: res[key].history for key in shown},
        "table": runs_table(runs, shown),
    }


def _acc_at(results, key, epoch, what="train_acc") -> float:
    r = results["runs"][key]
    ev = list(r["eval_epochs"])
    v = r[what][ev.index(epoch)] if epoch in ev else None
    return math.nan if v is None else float(v)


# ----------------------------------------------------------------------------- figure


def figure(results: Mapping[str, Any]):
    """Fig. 4 (002): the first third of training: rotation curves (row 1), rotation per
    epoch (row 2), training and test accuracy (row 3); SGD at the high rate with each warmup,
    then Layca without and with warmup."""
    import matplotlib.pyplot as plt

    from ... import plot
    from .._figures import tidy

    runs, shown = results["runs"], results["shown"]
    hists = {runs[k]["label"]: results["histories"][k] for k in shown}
    order, spe = results["layer_order"], results["steps_per_epoch"]
    epochs = len(runs[shown[0]]["epoch_loss"])
    window = max(results["early_epoch"], math.ceil(epochs / 3))
    fig = plt.figure(figsize=(19, 12), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1)
    axes = panels(top, len(shown))
    plot.rotation_curves_figure(
        hists,
        ax=axes,
        x="epoch",
        steps_per_epoch=spe,
        layer_order=order,
        legend=False,
        colorbar=True,
    )
    for ax, k in zip(axes, shown):
        ax.set_xlim(0, window)
        ax.set_title(
            f"{runs[k]['label']}\nη = {100 * (runs[k]['final']['test_acc'] or math.nan):.1f}%"
        )
    tidy(top, axes, f"Fig. 4 (extended version): layer rotation, first {window} of {epochs} epochs")
    axes = panels(middle, len(shown))
    plot.epoch_rotation_figure(
        {
            runs[k]["label"]: (
                results["epoch_rotation"][k]["epoch"],
                results["epoch_rotation"][k]["layers"],
            )
            for k in shown
        },
        ax=axes,
        layer_order=order,
        legend=False,
        colorbar=True,
    )
    for ax in axes:
        ax.set_xlim(0.5, window + 0.5)
    tidy(
        middle, axes, "rotation per epoch (cosine distance between the start and end of each epoch)"
    )
    train_ax, test_ax = panels(bottom, 2, sharey=False)
    for ax, what in ((train_ax, "train_acc"), (test_ax, "test_acc")):
        plot.training_curves_figure(
            {runs[k]["label"]: (runs[k]["eval_epochs"], runs[k][what]) for k in shown},
            ax=ax,
            ylabel=what.replace("_acc", "ing accuracy" if what == "train_acc" else " accuracy"),
            colors=[f"C{i}" for i in range(len(shown))],
        )
        ax.set_xlim(0, window)
    tidy(bottom, [train_ax, test_ax], "training curves")
    return fig


# ----------------------------------------------------------------------------- verdict


def verdict(results: Mapping[str, Any]) -> tuple[str, str]:
    """Three sub-claims (rules in :mod:`._common`): at the high rate, every SGD warmup beats no
    warmup in training accuracy at the early epoch (2 se each); without warmup SGD's first-epoch
    rotation is larger for every layer (the abrupt rotations); Layca without warmup ends on par
    with Layca with the longest warmup (test accuracy, 2 se)."""
    k, e = results["high_k"], results["early_epoch"]
    none = sgd_key(k, 0)
    early = []
    for d in results["warmups"][1:]:
        s, delta, se = compare_accuracies(
            _acc_at(results, sgd_key(k, d), e),
            _acc_at(results, none, e),
            results["num_train"],
            "greater",
        )
        early.append((d, s, delta, se))
    rot = {key: results["epoch_rotation"][key]["layers"] for key in results["shown"]}
    first = lambda key: [float(np.asarray(v, float)[0]) for v in rot[key].values()]
    longest = sgd_key(k, results["warmups"][-1])
    s_rot = compare_layers(first(none), first(longest), "greater")
    la, lb = layca_key(results["warmups"][0]), layca_key(results["warmups"][-1])
    test = lambda key: _acc_at(results, key, results["runs"][key]["eval_epochs"][-1], "test_acc")
    s_layca, d_layca, se_layca = compare_accuracies(
        test(la), test(lb), results["num_test"], "on_par"
    )
    s_early = combine([x[1] for x in early])
    text = (
        f"High SGD rate (largest that trains without warmup, final training accuracy > twice "
        f"chance): 3^{k}. Training accuracy at epoch "
        f"{e}: no warmup {_acc_at(results, none, e):.3f}; "
        + ", ".join(
            f"{d}-epoch warmup {_acc_at(results, sgd_key(k, d), e):.3f} ({dl:+.3f}, "
            f"2·se = {2 * se:.3f}: {s})"
            for d, s, dl, se in early
        )
        + f": warmups help, {s_early}. First-epoch rotation per layer without warmup "
        f"{np.round(first(none), 3).tolist()} vs {results['warmups'][-1]}-epoch warmup "
        f"{np.round(first(longest), 3).tolist()}: larger without, {s_rot}. Layca test accuracy "
        f"without warmup {test(la):.3f} vs with {test(lb):.3f} ({d_layca:+.3f}, on par within "
        f"2·se = {2 * se_layca:.3f}): {s_layca}; SGD without warmup {test(none):.3f}."
    )
    return combine([s_early, s_rot, s_layca]), text


CLAIM = (
    "We observe that without warmup, SGD generates unstable layer rotations and training "
    "accuracy doesn't improve before the 25th epoch. Using warmups brings significant "
    "improvements [...]. Finally, we also use Layca for training [...]. Thanks to its "
    "controlling ability, Layca doesn't suffer from SGD's instabilities in terms of layer "
    "rotation. We observe that this enables Layca to achieve large layer rotations and good "
    "generalization performance without the need for warmups."
)

register(
    Experiment(
        name=NAME,
        reference=CARBONNELLE_EXTENDED_2019.at("§5.3, Fig. 4"),
        claim=CLAIM,
        stand_in=(
            "MNIST-1D (4,000 train / 1,000 test) and a 6-layer ReLU MLP (width 64) stand in for "
            "ResNet-110 on CIFAR-10 (a network that notoriously needs warmup; this MLP may not); "
            "30 epochs of batch 32, rate ×0.2 at 70% and 90% (quick: 8 epochs on 1,000 "
            "examples), for 200 epochs. Warmups of 0, 1, 2 and 3 epochs (the paper: 0, 5, 10, "
            "15 of 200) at the largest SGD rate of 3^-2…3^1 that trains without warmup (the "
            "paper: 3^-1); Layca at ρ(0) = 3^-3 without and with the 3-epoch warmup. Early "
            "training is judged at epoch 4 (the paper's 25 of 200)."
        ),
        run=run,
        figure=figure,
        verdict=verdict,
    )
)
