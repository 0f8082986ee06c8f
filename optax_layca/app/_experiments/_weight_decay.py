"""``weight-decay``: SGD with and without weight decay (Carbonnelle & De Vleeschouwer, 2019,
§5.1, Fig. 4 and App. A.4, Fig. 10).

SGD's learning rate is chosen on the 3^k grid, with and without weight decay, on a held-out
10% of the training set (the authors' procedure); Layca (α = 0, ρ(0) = 3^-3) is the reference
of the Δη in the titles, as in the paper. The decay coefficient is the authors': an L2 penalty
of 1e-3 in the loss, i.e. ``2e-3 · w`` added to the gradient (``optax.add_decayed_weights``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import CARBONNELLE_2019, Experiment, ExperimentConfig, register
from ._common import (
    combine,
    compare_accuracies,
    compare_layers,
    curve_panels,
    epoch_curves,
    history_curves,
    mnist1d_config,
    run_summary,
    selected,
    train_runs,
)

__all__ = ["figure", "run", "verdict"]

WEIGHT_DECAY = 2e-3  # the authors' Keras L2 penalty 1e-3: d(1e-3 ‖w‖²)/dw = 2e-3 w
LAYCA_RHO = 3.0**-3


def _groups(ks):
    from .._train import Group, Run, layca_sgd, sgd

    sgd_runs = tuple(
        Run(f"{name}_k{k}", f"{label} (lr 3^{k})", {"lr": 3.0**k, "weight_decay": wd})
        for name, label, wd in (("sgd", "SGD", 0.0), ("sgd_l2", "SGD + L2", WEIGHT_DECAY))
        for k in ks
    )
    layca = (Run("layca", "Layca (α = 0, ρ(0) = 3^-3)", {"rho": LAYCA_RHO, "alpha": 0.0}),)
    return [
        Group(f"SGD ± weight decay ({len(sgd_runs)} runs, vmapped)", sgd, sgd_runs),
        Group("Layca (reference)", layca_sgd, layca),
    ]


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Trains SGD over its learning-rate grid with and without weight decay, and Layca."""
    ks = (-2, -1) if config.quick else (-3, -2, -1, 0)
    task, res, identity = train_runs("weight-decay", config, mnist1d_config(config), _groups(ks))
    order, spe = task.order, task.steps_per_epoch
    runs = {key: run_summary(r, order) for key, r in res.items()}
    chosen = {
        "sgd": selected(runs, [f"sgd_k{k}" for k in ks]),
        "sgd_l2": selected(runs, [f"sgd_l2_k{k}" for k in ks]),
        "layca": "layca",
    }
    shown = {role: res[key].history for role, key in chosen.items()}
    norms = {
        role: {name: history_curves(h, order, name, spe) for name in ("grad_norm", "weight_norm")}
        for role, h in shown.items()
    }
    return {
        "identity": identity,
        "ks": list(ks),
        "chosen": chosen,
        "runs": runs,
        "num_test": len(task.data.x_test),
        "steps_per_epoch": spe,
        "decay_epoch": max(1, math.floor(task.config.decay_at[0] * task.config.epochs)),
        "curves": {
            role: history_curves(h, order, steps_per_epoch=spe) for role, h in shown.items()
        },
        "epoch_rotation": {role: epoch_curves(h, order) for role, h in shown.items()},
        "norms": norms,
        "histories": {key: r.history for key, r in res.items()},
        "table": _table(runs, chosen),
    }


def _table(runs, chosen) -> str:
    from .._report import md_table

    rows = []
    for key in chosen.values():
        f = runs[key]["final"]
        rows.append(
            [
                runs[key]["label"],
                f"{f['train_acc']:.3f}",
                f"{f['test_acc']:.3f}",
                f"{f['cos_min']:.3f}",
                f"{f['cos_max']:.3f}",
            ]
        )
    return md_table(
        ["run (selected on validation)", "train acc", "test acc", "cos dist min", "cos dist max"],
        rows,
    )


# ----------------------------------------------------------------------------- figure


def figure(results: Mapping[str, Any]):
    """Fig. 4 (rotation curves, SGD and SGD + L2) above Fig. 10 (per-epoch rotation, gradient
    and weight norms per layer; left SGD, right SGD + L2)."""
    import matplotlib.pyplot as plt

    from ... import plot

    fig = plt.figure(figsize=(10, 15), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 2.8])
    chosen, runs = results["chosen"], results["runs"]
    roles = ("sgd", "sgd_l2")
    hists = {role: results["histories"][chosen[role]] for role in roles}
    order = results["identity"]["layers"]
    curve_panels(
        top,
        results,
        [chosen[r] for r in roles],
        "layca",
        "Fig. 4: layer-wise angle deviation curves, SGD without / with weight decay",
    )
    grid = bottom.subplots(3, 2, sharex=True, sharey="row")
    plot.epoch_rotation_figure(
        {runs[chosen[r]]["label"]: hists[r] for r in roles},
        ax=list(grid[0]),
        layer_order=order,
        legend=False,
    )
    for col, r in enumerate(roles):
        plot.layer_norms_figure(
            hists[r],
            names=("grad_norm", "weight_norm"),
            ax=[grid[1, col], grid[2, col]],
            x="epoch",
            layer_order=order,
            legend=False,
        )
    bottom.suptitle(
        "Fig. 10: rotation per epoch (row 1), gradient norm (row 2) and weight norm "
        "(row 3) of each layer",
        fontsize=11,
    )
    return fig


# ----------------------------------------------------------------------------- verdict


def _last_epoch(curve: Mapping[str, Any], spe_epochs: int) -> np.ndarray:
    """Per layer, the mean of a norm over the records of the last epoch."""
    x = np.asarray(curve["epoch"], float)
    keep = x > x.max() - 1
    return np.asarray([np.mean(np.asarray(v, float)[keep]) for v in curve["layers"].values()])


def _kept_rate(results, role) -> np.ndarray:
    """Per layer: rotation in the epoch before the first decay ÷ rotation in epoch 1."""
    rot = results["epoch_rotation"][role]
    e = list(np.asarray(rot["epoch"]))
    i = e.index(results["decay_epoch"]) if results["decay_epoch"] in e else len(e) - 1
    return np.asarray(
        [np.asarray(v, float)[i] / np.asarray(v, float)[0] for v in rot["layers"].values()]
    )


def verdict(results: Mapping[str, Any]) -> tuple[str, str]:
    """Five sub-claims (rules in :mod:`._common`): with weight decay, every layer rotates
    further, keeps rotating (per-epoch rate), has larger gradients and smaller weights at the
    end; its test accuracy beats SGD's and is on par with Layca's."""
    runs, chosen, n = results["runs"], results["chosen"], results["num_test"]
    cd = {
        r: np.asarray(list(runs[chosen[r]]["final_cosine_distance"].values()), float)
        for r in ("sgd", "sgd_l2")
    }
    acc = {r: runs[chosen[r]]["final"]["test_acc"] for r in chosen}
    acc = {r: math.nan if v is None else v for r, v in acc.items()}
    norm = lambda r, name: _last_epoch(results["norms"][r][name], results["steps_per_epoch"])
    s = {
        "rotation": compare_layers(cd["sgd_l2"], cd["sgd"], "greater"),
        "kept": compare_layers(
            _kept_rate(results, "sgd_l2"), _kept_rate(results, "sgd"), "greater"
        ),
        "grad": compare_layers(norm("sgd_l2", "grad_norm"), norm("sgd", "grad_norm"), "greater"),
        "weight": compare_layers(norm("sgd_l2", "weight_norm"), norm("sgd", "weight_norm"), "less"),
    }
    s_acc, d_acc, se = compare_accuracies(acc["sgd_l2"], acc["sgd"], n, "greater")
    s_par, d_par, se_par = compare_accuracies(acc["sgd_l2"], acc["layca"], n, "on_par")
    text = (
        f"Final cosine distance to init per layer, SGD {np.round(cd['sgd'], 2).tolist()} vs "
        f"SGD + L2 {np.round(cd['sgd_l2'], 2).tolist()}: larger with weight decay "
        f"{s['rotation']}; rotation per epoch kept until the first decay "
        f"(epoch {results['decay_epoch']} ÷ epoch 1): {s['kept']}; larger gradient norms in the "
        f"last epoch: {s['grad']}; smaller weight norms: {s['weight']}. Test accuracy SGD + L2 "
        f"{acc['sgd_l2']:.3f} vs SGD {acc['sgd']:.3f} ({d_acc:+.3f}, 2·se = {2 * se:.3f}): "
        f"{s_acc}; vs Layca {acc['layca']:.3f} ({d_par:+.3f}, on par within 2·se = "
        f"{2 * se_par:.3f}): {s_par}."
    )
    return combine([*s.values(), s_acc, s_par]), text


CLAIM = (
    "We observe that all layers are rotated synchronously, reaching a cosine distance of 1 from "
    "their initialization, and that the resulting test performances are on par with the ones "
    "obtained with Layca. [...] The most considerable impact, however, seems to be weight "
    "decay's ability to keep the layer rotation rates high during the course of training. [...] "
    "As expected, the norm of weights are smaller when weight decay is used (row 3 of Fig. 10). "
    "However, and more surprisingly, weight decay seems to have a much stronger impact on the "
    "norm of gradients (row 2 of Fig. 10)."
)

STAND_IN = (
    "MNIST-1D and a 6-layer ReLU MLP (width 64) stand in for the paper's five CIFAR / "
    "Tiny ImageNet tasks; 30 epochs of batch 32 (quick: 3 epochs on 1,000 examples) for "
    "80–250 epochs of batch 128. SGD's learning rate is chosen on 3^-3…3^0 (quick: "
    "3^-2, 3^-1) on a 10% validation split, with the authors' L2 penalty 1e-3. The "
    "gradient norm is that of the minibatch at each epoch's last step (the authors "
    "average per-batch norms over 2,000 training examples)."
)

EXPERIMENT = register(
    Experiment(
        "weight-decay",
        CARBONNELLE_2019.at("§5.1, Fig. 4 and Fig. 10"),
        CLAIM,
        STAND_IN,
        run,
        figure,
        verdict,
    )
)
