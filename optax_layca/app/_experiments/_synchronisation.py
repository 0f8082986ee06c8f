"""``synchronisation``: moments of learning line up across layers (Lan et al., 2019, §5,
Fig. 6, S16–S19).

One run of the stand-in MNIST–FC (SGD, momentum 0.9, lr 0.05) with every step allocated per
layer and per class. A *moment of learning* is a negative local minimum of a layer's LCA per
iteration (the top ``k`` per curve: the paper's 20 of 880 iterations, scaled to the run's
length); it is *synchronised* when another layer has one at the same iteration
(:func:`optax_layca.lca.moments_of_learning`, with its shifted baseline: every layer's moments
moved one or two iterations earlier or later, 200 draws).

The gradient-only and motion-only variants (S16–S19) are not defined in the paper's text and
the authors' code for them is not public. Ours keep one factor of a layer's first-order LCA
``Σ_i g_i(t) Δθ_i(t)`` moving and hold the other at its average over the run:
``G_l(t) = Σ_i g_i(t) · mean_t Δθ_i`` (gradient only) and ``M_l(t) = Σ_i mean_t g_i · Δθ_i(t)``
(motion only), with ``g`` the full-dataset gradient at the start of each step; both are in
loss units and peak where that factor alone would make the layer learn.

Rules, fixed before any run:

* Fig. 6 / S17, learning is synchronised: the synchronised moments of the per-class ×
  per-layer LCA (Fig. 6) and of the per-layer LCA (S17) each outnumber the shifted baseline
  with p < 0.05: agrees; a count at or below the baseline's mean: does not reproduce;
  otherwise inconclusive;
* S18 / S19, the synchronisation "comes from both parameter motion and gradient": the
  iterations holding a synchronised moment of the gradient-only curves, and those of the
  motion-only curves, each overlap the LCA's by a Jaccard index below 0.5 (neither factor
  alone gives LCA's pattern): agrees; one overlap above 0.8: does not reproduce; otherwise
  inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import AGREES, INCONCLUSIVE, NOT_REPRODUCED, Experiment, ExperimentConfig, register
from ._common import combine
from ._lca_runs import ITERS, LAN_2019, STAND_IN, loss_curve, record_one_sgd_run

__all__ = ["factor_curves", "figure", "jaccard", "run", "verdict"]

P_SIGNIFICANT = 0.05
DIFFERENT, SAME = 0.5, 0.8  # Jaccard overlap of synchronised iterations
SHUFFLES = 200
PAPER_K = 20  # the paper's top-20 moments per curve over 880 iterations


def moments_per_curve(iters: int) -> int:
    """The paper's 20 moments per 880 iterations, scaled to ``iters`` (at least 3)."""
    return max(3, round(PAPER_K * iters / ITERS))


def factor_curves(
    grads: Mapping[str, np.ndarray], motion: Mapping[str, np.ndarray], names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """``(G, M)``, both ``[T, layers]``: the gradient-only and motion-only curves of the
    module docstring, per module ``names`` (``grads``, ``motion``: ``{leaf path: [T, ...]}``).

    Examples:
      >>> g = {"a/kernel": np.array([[1.0], [3.0]])}
      >>> m = {"a/kernel": np.array([[2.0], [0.0]])}
      >>> G, M = factor_curves(g, m, ["a"])
      >>> G.ravel().tolist(), M.ravel().tolist()
      ([1.0, 3.0], [4.0, 0.0])
    """
    from ..._layers import module_path

    t = len(next(iter(grads.values())))
    G, M = np.zeros((t, len(names))), np.zeros((t, len(names)))
    for leaf, g in grads.items():
        j = list(names).index(module_path(leaf))
        g = np.asarray(g, np.float64).reshape(t, -1)
        m = np.asarray(motion[leaf], np.float64).reshape(t, -1)
        G[:, j] += g @ m.mean(0)
        M[:, j] += m @ g.mean(0)
    return G, M


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard index of the iterations holding a synchronised moment in ``a`` and in ``b``
    (``[T, layers]`` bool); NaN when neither has one.

    Examples:
      >>> a = np.array([[1, 1], [0, 0], [1, 1]], bool)
      >>> b = np.array([[1, 1], [1, 1], [0, 0]], bool)
      >>> jaccard(a, b)
      0.3333333333333333
    """
    sa, sb = np.asarray(a).any(axis=1), np.asarray(b).any(axis=1)
    union = np.sum(sa | sb)
    return float(np.sum(sa & sb) / union) if union else math.nan


def _moments_numbers(m: Any) -> dict[str, Any]:
    return {
        "moments": m.moments,
        "synchronized": m.synchronized,
        "num_moments": int(np.sum(m.moments)),
        "num_synchronized": m.num_synchronized,
        "baseline": m.baseline,
        "baseline_mean": float(np.mean(m.baseline)),
        "p_value": m.p_value,
    }


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Trains one run with every step allocated per layer and class; returns Fig. 6 and
    S16–S19's numbers."""
    from ... import lca

    r, h, names, idx, identity = record_one_sgd_run(
        "synchronisation", config, per_class=True, store_grads=True, trajectory=True
    )
    k = moments_per_curve(len(h))
    seed = config.seed
    moments = lambda curves: lca.moments_of_learning(curves, k=k, num_shuffles=SHUFFLES, seed=seed)
    G, M = factor_curves(h.grad_before, lca.motion_from_trajectory(r.trajectory), names)
    per_layer = h.per_layer[:, idx]
    results = {
        "identity": identity,
        "layers": names,
        "k": k,
        "per_layer_lca": {n: per_layer[:, j] for j, n in enumerate(names)},
        "gradient_only": {n: G[:, j] for j, n in enumerate(names)},
        "motion_only": {n: M[:, j] for j, n in enumerate(names)},
        "train_loss": loss_curve(h),
        "rk4_summary": h.summary(),
        "class_layer": _moments_numbers(moments(h.per_class[:, :, idx])),
        "layer": _moments_numbers(moments(per_layer)),
        "gradient": _moments_numbers(moments(G)),
        "motion": _moments_numbers(moments(M)),
        "histories": {"sgd": r.result.history},
    }
    results["overlap"] = {
        v: jaccard(results["layer"]["synchronized"], results[v]["synchronized"])
        for v in ("gradient", "motion")
    }
    results["table"] = _table(results)
    return results


VIEWS = {
    "class_layer": "per-class × per-layer LCA (Fig. 6)",
    "layer": "per-layer LCA (S17)",
    "gradient": "gradient only (S18)",
    "motion": "motion only (S19)",
}


def _table(results: Mapping[str, Any]) -> str:
    from .._report import md_table

    rows = [
        [
            label,
            results[v]["num_moments"],
            results[v]["num_synchronized"],
            f"{results[v]['baseline_mean']:.1f}",
            f"{results[v]['p_value']:.3g}",
        ]
        for v, label in VIEWS.items()
    ]
    head = ["curves", "moments", "synchronised", "shifted baseline (mean)", "p"]
    return (
        f"Moments of learning (top {results['k']} per curve):\n\n"
        + md_table(head, rows)
        + f"\n\nOverlap (Jaccard) of the synchronised iterations with the LCA's: gradient "
        f"only {results['overlap']['gradient']:.2f}, motion only "
        f"{results['overlap']['motion']:.2f}."
    )


# ----------------------------------------------------------------------------- figure


class _Moments:
    """The fields :func:`optax_layca.plot.moments_raster_figure` reads, from the JSON."""

    def __init__(self, d: Mapping[str, Any]):
        self.moments = np.asarray(d["moments"], bool)
        self.synchronized = np.asarray(d["synchronized"], bool)
        self.num_synchronized = int(d["num_synchronized"])
        self.baseline = np.asarray(d["baseline"], float)
        self.p_value = float(d["p_value"])


def figure(results: Mapping[str, Any]):
    """S17 (per-layer LCA curves) with the shifted baselines, Fig. 6 (moments per class and
    layer, synchronised in red), and the rasters of S17 (per layer), S18 (gradient only) and
    S19 (motion only)."""
    import matplotlib.pyplot as plt

    from ... import plot

    names = results["layers"]
    fig = plt.figure(figsize=(16, 16), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.0, 1.6, 1.0])
    a = top.subplots(1, 3)
    t = np.arange(len(results["per_layer_lca"][names[0]]))
    plot.training_curves_figure(
        {n: (t, results["per_layer_lca"][n]) for n in names},
        ax=a[0],
        xlabel="iteration",
        ylabel="LCA per iteration",
        title="S17: per-layer LCA (dark = first layer)",
    )
    plot.moments_baseline_figure(
        _Moments(results["class_layer"]), ax=a[1], label="per class × layer"
    )
    plot.moments_baseline_figure(_Moments(results["layer"]), ax=a[2], label="per layer")
    top.suptitle(
        "Per-layer LCA curves; synchronised moments against the shifted baseline", fontsize=11
    )
    ax = middle.subplots()
    plot.moments_raster_figure(_Moments(results["class_layer"]), ax=ax)
    ax.set_ylabel(f"class (blocks of {len(names)} layers: {', '.join(names)})")
    middle.suptitle(
        "Fig. 6: moments of learning per class and layer (red: synchronised)", fontsize=11
    )
    b = bottom.subplots(1, 3, sharex=True)
    for axis, v in zip(b, ("layer", "gradient", "motion")):
        plot.moments_raster_figure(_Moments(results[v]), ax=axis, layer_names=names)
        axis.set_title(
            f"{VIEWS[v]}: {results[v]['num_synchronized']} synchronised "
            f"(p = {results[v]['p_value']:.3g})",
            fontsize=9,
        )
    bottom.suptitle(
        "S17, S18, S19: moments of the LCA, of the gradient alone, of the motion alone", fontsize=11
    )
    return fig


# ----------------------------------------------------------------------------- verdict


def _sync_status(d: Mapping[str, Any]) -> str:
    if d["p_value"] < P_SIGNIFICANT:
        return AGREES
    return NOT_REPRODUCED if d["num_synchronized"] <= d["baseline_mean"] else INCONCLUSIVE


def verdict(results: Mapping[str, Any]) -> tuple[str, str]:
    """The rules of the module docstring."""
    s6, s17 = _sync_status(results["class_layer"]), _sync_status(results["layer"])
    ov = results["overlap"]
    vals = [ov["gradient"], ov["motion"]]
    if not all(math.isfinite(v) for v in vals):
        s_factor = INCONCLUSIVE
    elif all(v < DIFFERENT for v in vals):
        s_factor = AGREES
    else:
        s_factor = NOT_REPRODUCED if any(v > SAME for v in vals) else INCONCLUSIVE
    d = lambda v: (
        f"{results[v]['num_synchronized']} synchronised of "
        f"{results[v]['num_moments']} moments vs baseline "
        f"{results[v]['baseline_mean']:.1f}, p = {results[v]['p_value']:.3g}"
    )
    text = (
        f"Top {results['k']} moments per curve. Per class × layer (Fig. 6): {d('class_layer')}: "
        f"{s6}. Per layer (S17): {d('layer')}: {s17}. The synchronised iterations of the "
        f"gradient-only curves overlap the LCA's by {ov['gradient']:.2f}, of the motion-only "
        f"curves by {ov['motion']:.2f} (both below {DIFFERENT}: {s_factor})."
    )
    return combine([s6, s17, s_factor]), text


CLAIM = (
    "Whenever learning is synchronized across layers (dots that are vertically aligned) they "
    "are marked in red. [...] We find that the number synchronized moments is significantly "
    "more than that of such a baseline [...] By plotting in the same fashion of identified "
    "local peaks, we observe the synchronization pattern in gradients per layer is clearly "
    "different from that in LCA [...] We therefore conclude that the synchronization of "
    "learning, demonstrated by synchronized behavior in LCA movement (Figure 6), is strong, and "
    "comes from both parameter motion and gradient."
)

EXPERIMENT = register(
    Experiment(
        "synchronisation",
        LAN_2019.at("§5, Fig. 6, S16–S19"),
        CLAIM,
        STAND_IN + " SGD with momentum 0.9 (lr 0.05); per-class LCA over the 10 digit "
        "classes; the top 20 moments per curve of the paper's 880 iterations scaled to the "
        "run's length (at least 3); the gradient-only and motion-only curves are ours (the "
        "paper's are not defined in its text).",
        run,
        figure,
        verdict,
    )
)
