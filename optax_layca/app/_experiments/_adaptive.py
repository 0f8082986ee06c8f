"""``adaptive``: adaptive gradient methods with and without Layca (Carbonnelle & De
Vleeschouwer, 2019, §5.2, Fig. 5 and 6, and App. A.5, Fig. 11).

Two vmapped groups, each one compiled program (:mod:`._switch` lets runs of different
optimizers share it):

* without Layca: SGD, Adam, RMSprop and Adagrad (optax's defaults), each over a grid of
  learning rates, the rate chosen on a held-out 10% of the training set (the authors'
  "extensive learning rate tuning");
* with Layca (α = 0, biases frozen as in the authors' code; ρ(0) = 3^-3, or 3^-5 on Adam's
  and SGD_AMom's momentum directions, the authors' rates) on the direction of each method: SGD, RMSprop (``scale_by_rms``), Adagrad (``scale_by_rss``), Adam
  (``scale_by_adam``) and SGD_AMom (``optax.ema(0.9, debias=False)``, Adam's first moment
  without debiasing, the paper's non-adaptive equivalent of Adam, App. B.4).

Fig. 11's percentiles of Adam's ``ν`` are read from the optimizer state at chosen epochs by
:func:`optax_layca.rotation.second_moment_percentiles` (kernels only; the authors also
include biases).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import (
    AGREES,
    CARBONNELLE_2019,
    INCONCLUSIVE,
    NOT_REPRODUCED,
    Experiment,
    ExperimentConfig,
    register,
)
from ._common import (
    combine,
    compare_accuracies,
    history_curves,
    mnist1d_config,
    panels,
    run_summary,
    runs_table,
    selected,
    train_runs,
)
from ._switch import METHOD, switched

__all__ = [
    "OPTIMIZERS",
    "curve_gap",
    "figure",
    "gap_status",
    "layca_on",
    "run",
    "verdict",
]

NAME = "adaptive"
# Layca's ρ(0) per direction: the authors' (``get_optimized_training_schedule``): 3^-5 on the
# momentum directions (Adam, SGD_AMom), whose consistent steps rotate a layer further for the
# same per-step angle, 3^-3 on the others; each pair of Fig. 6 shares its rate
LAYCA_RHO = {
    "sgd": 3.0**-3,
    "rmsprop": 3.0**-3,
    "adagrad": 3.0**-3,
    "adam": 3.0**-5,
    "sgd_amom": 3.0**-5,
}
# learning-rate grids (3^k) per method, default and quick
GRIDS = {
    "sgd": (-3, -2, -1, 0),
    "adam": (-8, -7, -6, -5),
    "rmsprop": (-8, -7, -6, -5),
    "adagrad": (-5, -4, -3, -2),
}
QUICK_GRIDS = {"sgd": (-2, -1), "adam": (-7, -6), "rmsprop": (-7, -6), "adagrad": (-4, -3)}
LABELS = {
    "sgd": "SGD",
    "adam": "Adam",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
    "sgd_amom": "SGD_AMom",
}
# Fig. 6's pairs: an adaptive method and its non-adaptive equivalent, both under Layca
PAIRS = (("rmsprop", "sgd"), ("adagrad", "sgd"), ("adam", "sgd_amom"))
# "Indistinguishable" training and test curves: every accuracy within 0.05 of the other
# curve's at every epoch (half the 0.1 the `lars` experiment allows cosine distances: an
# accuracy axis is read more finely); beyond 0.10 somewhere they are told apart. Fixed
# before any run.
SAME_ACC, DIFFERENT_ACC = 0.05, 0.10
# Fig. 11: "vary much more across layers than inside layers": the range over layers of the
# log10 median at least twice the typical (median over layers) log10(p90/p10); at most as
# large: does not reproduce. Fixed before any run.
MUCH_MORE, NOT_MORE = 2.0, 1.0


def _sgd(task, hp):
    import optax

    return optax.sgd(task.schedule(hp["lr"]))


def _adam(task, hp):
    import optax

    return optax.adam(task.schedule(hp["lr"]))


def _rmsprop(task, hp):
    import optax

    return optax.rmsprop(task.schedule(hp["lr"]))


def _adagrad(task, hp):
    import optax

    return optax.adagrad(task.schedule(hp["lr"]))


def _sgd_amom(task, hp):
    from ... import sgd_amom

    return sgd_amom(task.schedule(hp["lr"]))


# name -> build(task, hp) of the full optimizer at learning rate hp["lr"] (step decay)
OPTIMIZERS = {
    "sgd": _sgd,
    "adam": _adam,
    "rmsprop": _rmsprop,
    "adagrad": _adagrad,
    "sgd_amom": _sgd_amom,
}


def _direction(name: str):
    """The step direction of method ``name`` (optax's gradient convention), None for SGD."""
    import optax

    return {
        "sgd": lambda: None,
        "adam": optax.scale_by_adam,
        "rmsprop": optax.scale_by_rms,
        "adagrad": optax.scale_by_rss,
        "sgd_amom": lambda: optax.ema(0.9, debias=False),
    }[name]()


def layca_on(names: Sequence[str]):
    """A group build: Layca (rate ``hp["rho"]``, α = ``hp["alpha"]``, biases frozen) on the
    direction ``names[hp["method"]]``."""
    import optax

    from ... import layca
    from ._switch import switch

    def build(task, hp):
        bases = [_direction(n) or optax.identity() for n in names]
        return layca(
            task.schedule(hp["rho"]),
            base=switch(bases, hp[METHOD]),
            alpha=hp["alpha"],
            layer_order=task.order,
            non_layer="freeze",
        )

    return build


PLAIN = ("sgd", "adam", "rmsprop", "adagrad")
WITH_LAYCA = ("sgd", "rmsprop", "adagrad", "adam", "sgd_amom")


def plain_key(name: str, k: int) -> str:
    return f"{name}_k{k}"


def layca_key(name: str) -> str:
    return f"layca_{name}"


def _groups(grids: Mapping[str, Sequence[int]]):
    from .._train import Group, Run

    plain = tuple(
        Run(plain_key(n, k), f"{LABELS[n]} (lr 3^{k})", {METHOD: float(i), "lr": 3.0**k})
        for i, n in enumerate(PLAIN)
        for k in grids[n]
    )
    with_layca = tuple(
        Run(
            layca_key(n),
            f"{LABELS[n]} + Layca (ρ(0) 3^{round(math.log(LAYCA_RHO[n], 3))})",
            {METHOD: float(i), "rho": LAYCA_RHO[n], "alpha": 0.0},
        )
        for i, n in enumerate(WITH_LAYCA)
    )
    return [
        Group(
            f"SGD, Adam, RMSprop, Adagrad ({len(plain)} runs, vmapped)",
            switched([OPTIMIZERS[n] for n in PLAIN]),
            plain,
        ),
        Group(
            f"Layca on 5 directions ({len(with_layca)} runs, vmapped)",
            layca_on(WITH_LAYCA),
            with_layca,
        ),
    ]


class MomentProbe:
    """``on_epoch`` callback: percentiles of Adam's ``ν`` per layer for the Adam runs at
    ``epochs`` (the Adam state is ``tracked_state[index]`` of the switched group)."""

    def __init__(self, keys: Sequence[str], index: int, epochs: Sequence[int]):
        self.index, self.epochs = index, {int(e) for e in epochs}
        self.snapshots: dict[str, dict[int, Any]] = {k: {} for k in keys}

    def __call__(self, run: Any, epoch: int, params: Any, opt_state: Any) -> None:
        from ...rotation import second_moment_percentiles

        del params
        if run.key in self.snapshots and epoch in self.epochs:
            adam_state = opt_state.tracked_state[self.index]
            self.snapshots[run.key][epoch] = second_moment_percentiles(adam_state)


def _train_config(config: ExperimentConfig):
    return mnist1d_config(config, every_epoch=True)


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Trains both groups; returns the numbers of Fig. 5, 6 and 11."""
    grids = QUICK_GRIDS if config.quick else GRIDS
    tc = _train_config(config)
    moment_epochs = sorted({1, max(1, tc.epochs // 3), tc.epochs})
    probe = MomentProbe(
        [plain_key("adam", k) for k in grids["adam"]], PLAIN.index("adam"), moment_epochs
    )
    task, res, identity = train_runs(NAME, config, tc, _groups(grids), on_epoch=probe)
    order, spe = task.order, task.steps_per_epoch
    runs = {key: run_summary(r, order) for key, r in res.items()}
    chosen = {n: selected(runs, [plain_key(n, k) for k in grids[n]]) for n in PLAIN}
    chosen.update({f"{n}+layca": layca_key(n) for n in WITH_LAYCA})
    snaps = probe.snapshots[chosen["adam"]]
    moments = {
        str(e): {p: np.asarray(v, float).tolist() for p, v in snaps[e].items()}
        for e in sorted(snaps)
    }
    shown = set(chosen.values())
    return {
        "identity": identity,
        "grids": {n: list(v) for n, v in grids.items()},
        "layca_rho": dict(LAYCA_RHO),
        "chosen": chosen,
        "runs": runs,
        "num_test": len(task.data.x_test),
        "steps_per_epoch": spe,
        "layer_order": list(order),
        "curves": {k: history_curves(res[k].history, order, steps_per_epoch=spe) for k in shown},
        "moment_percentiles": moments,
        "histories": {k: res[k].history for k in shown},
        "table": runs_table(
            runs, list(chosen.values()), "run (plain methods: lr chosen on validation)"
        ),
    }


# ----------------------------------------------------------------------------- figure


def _acc(results, key, what="test_acc") -> float:
    v = results["runs"][key]["final"][what]
    return math.nan if v is None else float(v)


def _fig5(sub, results) -> None:
    from ... import plot
    from .._figures import tidy

    chosen, runs = results["chosen"], results["runs"]
    keys = [chosen[n] for n in ("rmsprop", "adam", "adagrad", "sgd")] + [chosen["sgd+layca"]]
    axes = panels(sub, len(keys))
    plot.rotation_curves_figure(
        {runs[k]["label"]: results["histories"][k] for k in keys},
        ax=axes,
        x="epoch",
        steps_per_epoch=results["steps_per_epoch"],
        layer_order=results["layer_order"],
        legend=False,
        colorbar=True,
    )
    ref = _acc(results, chosen["sgd+layca"])
    for ax, k in zip(axes, keys):
        delta = 100 * (_acc(results, k) - ref)
        ax.set_title(f"{runs[k]['label']}\nΔη = {delta:+.1f}% (vs SGD + Layca)", fontsize=9)
    tidy(sub, axes, "Fig. 5: layer-wise angle deviation curves of adaptive methods (and SGD)")


def _fig6(sub, results) -> None:
    from ... import plot
    from .._figures import tidy

    runs = results["runs"]
    axes = panels(sub, len(PAIRS))
    for ax, pair in zip(axes, PAIRS):
        keys = [layca_key(n) for n in pair]
        label = lambda k: runs[k]["label"]
        plot.training_curves_figure(
            {label(k): (runs[k]["eval_epochs"], runs[k]["test_acc"]) for k in keys},
            dashed={label(k): (runs[k]["eval_epochs"], runs[k]["train_acc"]) for k in keys},
            ax=ax,
            ylabel="accuracy (test solid, train dashed)",
            colors=["C3", "C0"],
            title=" vs ".join(label(k) for k in keys),
        )
    tidy(sub, axes, "Fig. 6: adaptive methods and their non-adaptive equivalents, both with Layca")


def _fig11(ax, results) -> None:
    from ... import plot

    snaps = {f"epoch {e}": v for e, v in results["moment_percentiles"].items()}
    plot.moment_percentiles_figure(snaps, ax=ax, layer_order=results["layer_order"])
    lr = results["runs"][results["chosen"]["adam"]]["label"]
    ax.set_title(f"Fig. 11: Adam's ν per layer, 10/50/90th percentiles ({lr})", fontsize=9)


def figure(results: Mapping[str, Any]):
    """Fig. 5 (rotation curves of the adaptive methods and SGD, Δη vs SGD + Layca), Fig. 6
    (accuracy curves of each pair under Layca) and Fig. 11 (Adam's ν percentiles)."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(17, 12), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.0, 1.0, 1.0])
    _fig5(top, results)
    _fig6(middle, results)
    left, _ = bottom.subfigures(1, 2, width_ratios=[1.0, 1.2])
    _fig11(left.subplots(), results)
    return fig


# ----------------------------------------------------------------------------- verdict


def curve_gap(
    run_a: Mapping[str, Any],
    run_b: Mapping[str, Any],
    what: Sequence[str] = ("train_acc", "test_acc"),
) -> float:
    """Largest |accuracy difference| between two runs' curves ``what``, over the evaluations
    after initialisation (NaN if a run diverged)."""
    gaps = []
    for curve in what:
        a = np.asarray(run_a[curve], float)[1:]
        b = np.asarray(run_b[curve], float)[1:]
        gaps.append(np.max(np.abs(a - b)) if a.size and a.size == b.size else math.nan)
    return float(max(gaps))


def gap_status(gap: float) -> str:
    """Indistinguishable curves (gap ≤ ``SAME_ACC``), told apart (> ``DIFFERENT_ACC``)."""
    if not math.isfinite(gap):
        return INCONCLUSIVE
    return AGREES if gap <= SAME_ACC else (NOT_REPRODUCED if gap > DIFFERENT_ACC else INCONCLUSIVE)


def spread_ratio(snapshot: Mapping[str, Sequence[float]]) -> float:
    """Fig. 11's rule: range over layers of log10(p50) ÷ median over layers of
    log10(p90 / p10) (NaN when a percentile is not positive)."""
    p = np.asarray(list(snapshot.values()), float).reshape(len(snapshot), -1)
    if not np.all(p > 0):
        return math.nan
    logs = np.log10(p)
    across = logs[:, 1].max() - logs[:, 1].min()
    within = np.median(logs[:, 2] - logs[:, 0])
    return float(across / within) if within > 0 else math.inf


def _ratio_status(r: float) -> str:
    if not math.isfinite(r):
        return AGREES if r == math.inf else INCONCLUSIVE
    return AGREES if r >= MUCH_MORE else (NOT_REPRODUCED if r <= NOT_MORE else INCONCLUSIVE)


def verdict(results: Mapping[str, Any]) -> tuple[str, str]:
    """Three sub-claims (rules in :mod:`._common` and above): the adaptive methods generalise
    worse than SGD + Layca (2 se, each); under Layca each adaptive method's curves are
    indistinguishable from its non-adaptive equivalent's; Adam's ν varies more across layers
    than inside them."""
    chosen, runs, n = results["chosen"], results["runs"], results["num_test"]
    ref = _acc(results, chosen["sgd+layca"])
    worse = []
    for name in ("adam", "rmsprop", "adagrad"):
        s, d, se = compare_accuracies(ref, _acc(results, chosen[name]), n, "greater")
        worse.append((name, s, d, se))
    gaps = [(a, b, curve_gap(runs[layca_key(a)], runs[layca_key(b)])) for a, b in PAIRS]
    ratios = {e: spread_ratio(v) for e, v in results["moment_percentiles"].items()}
    s_worse = combine([w[1] for w in worse])
    s_same = combine([gap_status(g) for _, _, g in gaps])
    s_moment = combine([_ratio_status(r) for r in ratios.values()])
    cd = lambda key: runs[key]["final_cosine_distance"]
    first, last = results["layer_order"][0], results["layer_order"][-1]
    text = (
        "(Fig. 5) test accuracy of SGD + Layca "
        f"{ref:.3f} vs "
        + ", ".join(
            f"{LABELS[nm]} {_acc(results, chosen[nm]):.3f} ({d:+.3f}, 2·se = {2 * se:.3f}: {s})"
            for nm, s, d, se in worse
        )
        + f": generalise worse, {s_worse}. Final cosine distance first/last layer: "
        + ", ".join(
            f"{LABELS[nm]} {cd(chosen[nm])[first]:.2f}/{cd(chosen[nm])[last]:.2f}"
            for nm in ("sgd", "adam", "rmsprop", "adagrad")
        )
        + f", SGD + Layca {cd(chosen['sgd+layca'])[first]:.2f}/{cd(chosen['sgd+layca'])[last]:.2f}. "
        "(Fig. 6) largest gap between the accuracy curves under Layca: "
        + ", ".join(f"{LABELS[a]} vs {LABELS[b]} {g:.3f}" for a, b, g in gaps)
        + f" (indistinguishable ≤ {SAME_ACC}, told apart > {DIFFERENT_ACC}): {s_same}. "
        "(Fig. 11) spread of Adam's ν across layers ÷ inside layers (log10): "
        + ", ".join(f"epoch {e}: {r:.2f}" for e, r in ratios.items())
        + f" (much more ≥ {MUCH_MORE}, not more ≤ {NOT_MORE}): {s_moment}."
    )
    return combine([s_worse, s_same, s_moment]), text


CLAIM = (
    "Again, our rules of thumb can be applied: the overall worse generalization ability "
    "compared to Layca corresponds to low and/or non-uniform layer rotation rate "
    "configurations. [...] Figure 6 confirms this hypothesis by showing that the training and "
    "test curves of adaptive methods become indistinguishable from their non-adaptive "
    "equivalents when Layca is used to enforce a fixed layer rotation rate configuration. "
    "[...] The conclusion is clear: the estimates indeed vary much more across layers than "
    "inside layers."
)

register(
    Experiment(
        name=NAME,
        reference=CARBONNELLE_2019.at("§5.2, Fig. 5 and 6, and App. A.5, Fig. 11"),
        claim=CLAIM,
        stand_in=(
            "MNIST-1D (3,600 train after a 10% validation split / 1,000 test) and a 6-layer "
            "ReLU MLP (width 64) stand in for the paper's five CIFAR / Tiny ImageNet tasks, one "
            "per adaptive method there; here every method runs on the one task. 30 epochs of "
            "batch 32 with the rate ×0.2 at 70% and 90% (quick: 3 epochs on 1,000 examples) "
            "stand in for 80–250 epochs of batch 128. Learning rates (3^k) are chosen on the "
            "validation split over 4 values per method (quick: 2); Layca runs at α = 0, ρ(0) = "
            "3^-3 (3^-5 on the Adam and SGD_AMom directions, the authors' rates). Fig. 11's ν percentiles are of the selected Adam run at "
            "epochs 1, 10 and 30 (the paper: 1, 10, 50 on C10-CNN1), kernels only."
        ),
        run=run,
        figure=figure,
        verdict=verdict,
    )
)
