"""``class-specialisation``: which layers and neurons learn which class (Lan et al., 2019,
§S6.2).

One run (SGD, momentum 0.9, lr 0.05) of a deeper stand-in, the 6-layer ReLU MLP
``64-64-64-64-64-64-10`` on digits, so that a trend over depth can be read: every step is
allocated per class × per layer over the whole training set, and, per class, the loss of that
class's examples is allocated per parameter (weighted by its share ``N_c / N`` of the
training set, so the classes sum to the loss) and summed over the run, then per neuron
(:func:`optax_layca.lca.per_neuron`: a neuron's incoming weights and bias).

A neuron's *specialisation* is ``1 − H(p) / log C`` of the class distribution ``p_c ∝
max(−LCA_c, 0)`` of what it helped (0: it helped every class equally; 1: one class only); a
layer's is the mean over its neurons that helped. The paper's text gives no formula: this one
is ours.

Rule, fixed before any run: "how specialized neurons are and how this pattern evolves as we go
deeper" read with the common view it cites ("earlier layers ... learn more general concepts
than later layers"): the hidden layers' mean specialisation rises with depth (Spearman r ≥ 0.5:
agrees; ≤ −0.5: does not reproduce; between: inconclusive). The output layer is left out: its
neuron ``c`` is class ``c``'s logit, specialised by construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import Experiment, ExperimentConfig, register
from ._common import rank_trend, trend_status
from ._lca_runs import LAN_2019, record_one_sgd_run

__all__ = ["figure", "run", "specialisation", "verdict"]

MODEL = "deep"


def specialisation(per_class_neuron: np.ndarray) -> np.ndarray:
    """Per neuron, ``1 − H(p) / log C`` of ``p_c ∝ max(−x_c, 0)`` (``[C, units]`` LCA); NaN
    for a neuron that helped no class.

    Examples:
      >>> x = np.array([[-1.0, -1.0, 0.5], [0.0, -1.0, 0.5]])
      >>> specialisation(x).round(3).tolist()
      [1.0, 0.0, nan]
    """
    h = np.maximum(-np.asarray(per_class_neuron, np.float64), 0.0)
    total = h.sum(0)
    c = h.shape[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = h / np.where(total > 0, total, 1.0)
        ent = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=0)
    return np.where(total > 0, 1.0 - ent / math.log(c), np.nan)


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Trains the run; returns the per-class × per-layer LCA and the neurons' class LCA."""
    from ... import lca

    r, h, names, idx, identity = record_one_sgd_run(
        "class-specialisation", config, model=MODEL, per_class=True, class_params=True
    )
    per_class = h.per_class[:, :, idx].sum(0)  # [C, M]
    neurons = {n: np.concatenate([lca.per_neuron(t, n) for t in r.class_totals]) for n in names}
    spec = {n: specialisation(v) for n, v in neurons.items()}
    from_classes = np.asarray(
        [[v[c].sum() for v in neurons.values()] for c in range(per_class.shape[0])]
    )
    results = {
        "identity": identity,
        "layers": names,
        "per_class_layer": per_class,
        "class_loss_change": h.class_loss_change.sum(0),
        "neuron_class_lca": neurons,
        "neuron_specialisation": spec,
        "layer_specialisation": {
            n: float(np.nanmean(v)) if np.any(np.isfinite(v)) else math.nan for n, v in spec.items()
        },
        "per_class_layer_from_class_runs": from_classes,
        "rk4_summary": h.summary(),
        "histories": {"sgd": r.result.history},
    }
    results["table"] = _table(results)
    return results


def _table(results: Mapping[str, Any]) -> str:
    from .._report import md_table

    names = results["layers"]
    pc = np.asarray(results["per_class_layer"], float)
    rows = [[c, *(f"{pc[c, j]:+.4f}" for j in range(len(names)))] for c in range(pc.shape[0])]
    rows.append(
        [
            "mean neuron specialisation",
            *(f"{results['layer_specialisation'][n]:.3f}" for n in names),
        ]
    )
    return (
        "Per-class × per-layer cumulative LCA (rows: classes), and each layer's mean "
        "neuron specialisation:\n\n" + md_table(["class", *names], rows)
    )


def _hidden(names: Sequence[str]) -> list[str]:
    return list(names)[:-1]


def figure(results: Mapping[str, Any]):
    """§S6.2: per-class × per-layer LCA; each layer's mean neuron specialisation against
    depth; per-class LCA of every neuron of the first and of the last hidden layer."""
    import matplotlib.pyplot as plt

    from ... import plot

    names = results["layers"]
    hidden = _hidden(names)
    fig = plt.figure(figsize=(16, 8.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    a = top.subplots(1, 2, width_ratios=[1.3, 1])
    plot.class_layer_lca_figure(
        np.asarray(results["per_class_layer"], float),
        layer_names=names,
        ax=a[0],
        title="per-class × per-layer LCA",
    )
    plot.lca_bars_figure(
        {"mean neuron specialisation": {n: results["layer_specialisation"][n] for n in names}},
        ax=a[1],
        ylabel="1 − H(class shares) / log C",
        colors=["tab:purple"],
        title="class specialisation of the neurons, by layer",
    )
    top.suptitle("§S6.2: class specialisation across layers", fontsize=11)
    b = bottom.subplots(1, 2)
    for ax, n in zip(b, (hidden[0], hidden[-1])):
        v = np.asarray(results["neuron_class_lca"][n], float)
        plot.class_layer_lca_figure(
            v,
            layer_names=[str(j) for j in range(v.shape[1])],
            ax=ax,
            annotate=False,
            title=f"{n}: per-class LCA of each neuron",
        )
        ax.set_xlabel("neuron")
        ax.tick_params(axis="x", labelsize=5)
    bottom.suptitle("Neurons specialising in classes (first and last hidden layer)", fontsize=11)
    return fig


def verdict(results: Mapping[str, Any]) -> tuple[str, str]:
    """Spearman r of the hidden layers' mean specialisation with depth (module docstring)."""
    hidden = _hidden(results["layers"])
    spec = [results["layer_specialisation"][n] for n in hidden]
    r = rank_trend(range(len(hidden)), spec)
    status = trend_status(r)
    text = (
        f"Mean neuron specialisation of the hidden layers {hidden}: "
        f"{[round(v, 3) for v in spec]} (output layer "
        f"{results['layer_specialisation'][results['layers'][-1]]:.3f}, left out); Spearman r "
        f"with depth {r:.2f} (rule: ≥ 0.5 agrees, ≤ −0.5 does not reproduce): {status}."
    )
    return status, text


CLAIM = (
    "It is generally known that earlier layers in a neuron network learn more general concepts "
    "than later layers. This is akin to measuring the degree to which individual neurons "
    "specialize in learning specific classes. We can now show precisely how specialized "
    "neurons are and how this pattern evolves as we go deeper in the network."
)

EXPERIMENT = register(
    Experiment(
        "class-specialisation",
        LAN_2019.at("§S6.2"),
        CLAIM,
        "scikit-learn's digits (1,437 training 8×8 images; quick: 300) and a 6-layer ReLU MLP "
        "64-64-64-64-64-64-10 (deeper than MNIST–FC, so that a trend over depth can be read) "
        "stand in for the paper's networks; 880 iterations of SGD with momentum 0.9, lr 0.05, "
        "batch 32 (quick: 20). Every step is allocated with RK4 / adaptive Simpson, tolerance "
        "0.001, per class × per layer over the whole training set, and per parameter for the "
        "loss of each class's examples; the specialisation index is ours (the text gives none).",
        run,
        figure,
        verdict,
    )
)
