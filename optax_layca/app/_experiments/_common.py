"""Pieces every experiment shares: training, per-run summaries, plotted curves, verdict rules.

Verdict rules are fixed in advance and stated where they are used:

* accuracies are compared against their sampling noise: the standard error of a difference of
  two accuracies measured on ``n`` test examples, ``se = sqrt(p1 (1 - p1) / n + p2 (1 - p2) /
  n)``; a difference beyond ``2 se`` (≈95%) decides, within it the result is inconclusive
  (or, for an "on par" claim, agrees);
* per-layer quantities (rotation, norms) are deterministic for a seed, and every layer is one
  observation: a claim "A > B" agrees when it holds for every layer, does not reproduce when
  the opposite holds for every layer, and is inconclusive otherwise;
* a trend ("the higher ρ(0), the higher ...") uses Spearman's rank correlation ``r`` over the
  runs: ``r ≥ 0.5`` agrees, ``r ≤ -0.5`` does not reproduce, in between inconclusive. With
  fewer than 4 runs it is inconclusive: even a perfect ordering of 3 runs happens by chance
  with probability 1/6, of 4 runs 1/24 < 0.05.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import AGREES, INCONCLUSIVE, NOT_REPRODUCED, ExperimentConfig

__all__ = [
    "accuracy_se",
    "combine",
    "compare_accuracies",
    "curve_panels",
    "compare_layers",
    "epoch_curves",
    "history_curves",
    "mnist1d_config",
    "panels",
    "rank_trend",
    "run_summary",
    "runs_table",
    "selected",
    "train_runs",
    "trend_status",
]

TREND = 0.5  # |Spearman r| that decides a trend
MIN_TREND_RUNS = 4  # fewer: a perfect ordering is not unlikely by chance (1/3! = 0.17)


def mnist1d_config(
    config: ExperimentConfig,
    *,
    records_per_epoch: int = 4,
    validation: float = 0.1,
    every_epoch: bool = False,
    quick_epochs: int = 3,
) -> Any:
    """The stand-in training of the papers' experiments: MNIST-1D, the 6-layer MLP, 30 epochs
    of batch 32 (quick: ``quick_epochs`` on 1,000 examples); accuracies measured at the end (or after
    every epoch)."""
    from .._train import TrainConfig

    epochs = quick_epochs if config.quick else 30
    return TrainConfig(
        dataset="mnist1d",
        model="deep",
        epochs=epochs,
        seed=config.seed,
        num_train=1000 if config.quick else None,
        records_per_epoch=records_per_epoch,
        eval_every=1 if every_epoch else epochs,
        validation=validation,
    )


def train_runs(
    name: str,
    config: ExperimentConfig,
    train_config: Any,
    groups: Sequence[Any],
    *,
    task: Any = None,
    **kwargs: Any,
):
    """Sets up the task (unless ``task``, set up from ``train_config``, is given), trains
    ``groups`` with the one training loop (``kwargs``, e.g. ``on_epoch=``, go to
    :func:`~optax_layca.app._train.train`); returns ``(task, {run key: RunResult},
    identity)``."""
    from .. import _report, _train

    if task is None:
        task = _train.setup(train_config)
    elif task.config != train_config:
        raise ValueError("`train_runs(task=...)` was set up from another configuration.")
    results = _train.train(task, groups, progress=config.progress, **kwargs)
    identity = _report.run_identity(
        "reproduce", train_config, task, experiment=name, quick=config.quick
    )
    return task, results, identity


def run_summary(res: Any, order: Sequence[str]) -> dict[str, Any]:
    """JSON-ready numbers of one run: hyperparameters, final figures, curves per epoch."""
    return {
        "label": res.run.label,
        "hparams": dict(res.run.hparams),
        "diverged_at": res.diverged_at,
        "final": res.final(order),
        "final_cosine_distance": dict(zip(order, res.final_cosine_distance(order))),
        "epoch_loss": res.epoch_loss,
        "eval_epochs": res.eval_epochs,
        "train_acc": res.train_acc,
        "test_acc": res.test_acc,
        "val_acc": res.val_acc,
    }


def history_curves(
    hist: Any, order: Sequence[str], name: str = "cosine_distance", steps_per_epoch: int = 1
) -> dict[str, Any]:
    """The numbers a figure draws from a history: ``{"epoch": x, "layers": {path: y}}`` with
    ``x = step / steps_per_epoch`` of every record."""
    values = hist.get(name, list(order))
    return {"epoch": hist.steps / float(steps_per_epoch), "layers": values}


def epoch_curves(hist: Any, order: Sequence[str]) -> dict[str, Any]:
    """Per-epoch rotation ``{"epoch": e, "layers": {path: rotation}}`` of a history."""
    epochs, rot = hist.per_epoch_rotation(list(order))
    return {"epoch": epochs, "layers": rot}


def accuracy_se(p1: float, p2: float, n: int) -> float:
    """Standard error of ``p1 - p2``, two accuracies each measured on ``n`` examples."""
    return math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)


def compare_accuracies(a: float, b: float, n: int, claim: str) -> tuple[str, float, float]:
    """``(status, a - b, se)`` of the claim ``"greater"`` (a > b) or ``"on_par"`` (a ≈ b).

    Examples:
      >>> compare_accuracies(0.80, 0.70, 1000, "greater")[0]
      'agrees'
      >>> compare_accuracies(0.71, 0.70, 1000, "greater")[0]
      'inconclusive'
      >>> compare_accuracies(0.71, 0.70, 1000, "on_par")[0]
      'agrees'
    """
    if not (math.isfinite(a) and math.isfinite(b)):
        return INCONCLUSIVE, math.nan, math.nan
    delta, se = a - b, accuracy_se(a, b, n)
    if claim == "on_par":
        return (AGREES if abs(delta) <= 2 * se else NOT_REPRODUCED), delta, se
    if claim != "greater":
        raise ValueError(f"claim must be 'greater' or 'on_par'; got {claim!r}.")
    if delta > 2 * se:
        return AGREES, delta, se
    return (NOT_REPRODUCED if delta < -2 * se else INCONCLUSIVE), delta, se


def compare_layers(a: Sequence[float], b: Sequence[float], claim: str = "greater") -> str:
    """Per-layer claim ``a > b`` (``"greater"``) or ``a < b`` (``"less"``), every layer one
    observation.

    Examples:
      >>> compare_layers([2, 3], [1, 1]), compare_layers([2, 0], [1, 1]), compare_layers([0], [1])
      ('agrees', 'inconclusive', 'does not reproduce at this scale')
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if claim == "less":
        a, b = b, a
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return INCONCLUSIVE
    if np.all(a > b):
        return AGREES
    return NOT_REPRODUCED if np.all(a < b) else INCONCLUSIVE


def rank_trend(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of ``y`` with ``x`` over the finite pairs (NaN if fewer
    than :data:`MIN_TREND_RUNS`).

    Examples:
      >>> rank_trend([1, 2, 3, 4], [10, 20, 15, 40]), rank_trend([1, 2, 3], [1, 2, 3])
      (0.8, nan)
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < MIN_TREND_RUNS:
        return math.nan
    rx, ry = (np.argsort(np.argsort(v[keep])).astype(float) for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry / denom) if denom > 0 else math.nan


def trend_status(r: float) -> str:
    """Status of an increasing-trend claim from Spearman's ``r`` (see the module docstring)."""
    if not math.isfinite(r):
        return INCONCLUSIVE
    return AGREES if r >= TREND else (NOT_REPRODUCED if r <= -TREND else INCONCLUSIVE)


def combine(statuses: Sequence[str]) -> str:
    """One status for several sub-claims: agrees if all agree, does not reproduce if any does
    not, inconclusive otherwise."""
    if all(s == AGREES for s in statuses):
        return AGREES
    return NOT_REPRODUCED if NOT_REPRODUCED in statuses else INCONCLUSIVE


def panels(figure: Any, n: int, *, sharey: bool = True):
    """``n`` axes in one row of ``figure`` (a Figure or SubFigure), sharing y."""
    return list(np.ravel(figure.subplots(1, n, sharey=sharey, squeeze=False)))


def curve_panels(
    figure: Any, results: Mapping[str, Any], keys: Sequence[str], ref: str, title: str
) -> list:
    """One panel of layer rotation curves per run ``keys`` (Fig. 2b's axes and colouring),
    titled with its test accuracy gap Δη to run ``ref`` (as the paper's panels)."""
    from ... import plot
    from .._figures import tidy

    runs = results["runs"]
    axes = panels(figure, len(keys))
    plot.rotation_curves_figure(
        {runs[k]["label"]: results["histories"][k] for k in keys},
        ax=axes,
        x="epoch",
        steps_per_epoch=results["identity"]["steps_per_epoch"],
        layer_order=results["identity"]["layers"],
        legend=False,
        colorbar=True,
    )
    acc = lambda k: runs[k]["final"]["test_acc"]
    for ax, k in zip(axes, keys):
        gap = "—" if None in (acc(k), acc(ref)) else f"{100 * (acc(k) - acc(ref)):+.1f}%"
        ax.set_title(f"{runs[k]['label']}\nΔη = {gap} (vs {runs[ref]['label']})", fontsize=9)
    tidy(figure, axes, title)
    return axes


def selected(runs: Mapping[str, Any], keys: Sequence[str], by: str = "val_acc") -> str:
    """The key among ``keys`` whose run has the best final ``by`` accuracy (a run that
    diverged, NaN, is never chosen unless all did: then the first key)."""
    score = lambda k: runs[k]["final"][by]
    finite = [k for k in keys if score(k) is not None and math.isfinite(score(k))]
    return max(finite, key=score) if finite else keys[0]


def runs_table(runs: Mapping[str, Any], keys: Sequence[str], first: str = "run") -> str:
    """Markdown table of final figures, one row per run of ``keys`` (summaries from
    :func:`run_summary`): label, diverged, train and test accuracy, min and max over layers of
    the final cosine distance to init ("div." for a run that diverged)."""
    from .._report import md_table

    fmt = lambda v: "div." if v is None or not math.isfinite(v) else f"{v:.3f}"
    rows = []
    for key in keys:
        r, f = runs[key], runs[key]["final"]
        rows.append(
            [r["label"], "no" if r["diverged_at"] is None else f"epoch {r['diverged_at']}"]
            + [fmt(f[k]) for k in ("train_acc", "test_acc", "cos_min", "cos_max")]
        )
    head = [first, "diverged", "train acc", "test acc", "cos dist min", "cos dist max"]
    return md_table(head, rows)
