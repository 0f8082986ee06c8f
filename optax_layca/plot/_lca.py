"""Loss Change Allocation figures (Lan et al., 2019, Figs. 2–6). Each takes what the matching
:mod:`optax_layca.lca` analysis returns (or the :class:`~optax_layca.lca.LCAHistory` it is
computed from) and returns a Figure."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._common import figure_axes, side_colorbar

__all__ = [
    "helping_fraction_figure",
    "lca_heatmap_figure",
    "lca_per_layer_figure",
    "moments_raster_figure",
]


def lca_per_layer_figure(cumulative: Any, *, ax=None, layers: Any = None):
    """Bars of each layer's total LCA over the run (Lan et al., 2019, Fig. 4, S11).

    **Requires** :func:`optax_layca.lca.cumulative_per_layer`'s ``{layer: [T] cumulative
    LCA}`` (the last value is drawn), or the ``LCAHistory`` it is computed from (modules:
    kernel + bias). Negative bars helped, positive bars hurt. ``layers``: optional subset and
    order of the layer names (e.g. forward order).
    """
    from ..lca import cumulative_per_layer

    if not isinstance(cumulative, Mapping):
        cumulative = cumulative_per_layer(cumulative)
    names = list(layers) if layers is not None else list(cumulative)
    unknown = [n for n in names if n not in cumulative]
    if unknown:
        raise ValueError(f"`layers=` names unknown layers {unknown}; layers: {list(cumulative)}.")
    totals = np.array([np.asarray(cumulative[n])[-1] for n in names])
    fig, (ax,) = figure_axes(ax, width=max(4, 0.6 * len(names)), height=3)
    colors = ["tab:blue" if v <= 0 else "tab:red" for v in totals]
    ax.bar(range(len(names)), totals, color=colors)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("cumulative LCA")
    ax.set_title("LCA per layer (negative = helped)")
    return fig


def helping_fraction_figure(fractions: Any, *, ax=None, zero_tol: float = 0.0):
    """Fractions of parameters helping / hurting / zero over iterations (Lan et al., 2019,
    Fig. 3a).

    **Requires** :func:`optax_layca.lca.helping_fraction`'s ``HelpingFractions``, or an
    ``LCAHistory`` with per-parameter LCA (``grad`` engine; ``store_per_param=True`` on disk),
    from which it is computed with ``zero_tol``.
    """
    from ..lca import HelpingFractions, helping_fraction

    f = fractions if isinstance(fractions, HelpingFractions) else helping_fraction(
        fractions, zero_tol=zero_tol
    )
    fig, (ax,) = figure_axes(ax, width=5, height=3)
    ax.stackplot(
        f.iterations,
        f.helping,
        f.zero,
        f.hurting,
        labels=["helping", "zero", "hurting"],
        colors=["tab:green", "lightgray", "tab:red"],
        alpha=0.8,
    )
    ax.axhline(0.5, color="k", lw=0.6, ls="--")
    ax.set_ylim(0, 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("fraction of parameters")
    ax.legend(loc="upper right", fontsize=7)
    return fig


def lca_heatmap_figure(history: Any, path: str, iteration: int = -1, *, ax=None, cumulative=False):
    """Heat map of one leaf's per-parameter LCA at an iteration (Lan et al., 2019, Fig. 2).

    **Requires** an ``LCAHistory`` with per-parameter LCA. A kernel ``[in, out]`` is shown as a
    matrix (other shapes are reshaped to ``[-1, last]``); blue helps, red hurts.
    ``cumulative`` sums up to ``iteration``.
    """
    from ..lca._analysis import as_history, require_per_param

    pp = require_per_param(as_history(history), "lca_heatmap_figure")
    if path not in pp:
        raise ValueError(f"`path={path!r}` is not a parameter leaf; leaves: {list(pp)}.")
    x = pp[path]
    t = iteration % x.shape[0]
    v = x[: t + 1].sum(0) if cumulative else x[t]
    v = v.reshape(1, -1) if v.ndim < 2 else v.reshape(-1, v.shape[-1])
    lim = float(np.max(np.abs(v))) or 1.0
    fig, (ax,) = figure_axes(ax, width=4, height=4)
    im = ax.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    side_colorbar(fig, [ax], im, label="LCA")
    ax.set_title(f"{path} @ iteration {t}" + (" (cumulative)" if cumulative else ""))
    ax.set_xlabel("output unit")
    ax.set_ylabel("input")
    return fig


def _raster_labels(layer_names: Any, num_layers: int, num_classes: int) -> list[str]:
    """One label per raster row: ``layer`` (one block) or ``class c: layer`` (per class)."""
    names = list(layer_names) if layer_names is not None else [f"layer {j}" for j in range(num_layers)]
    if len(names) != num_layers:
        raise ValueError(f"`layer_names` must name the {num_layers} layers; got {len(names)}.")
    if num_classes == 1:
        return names
    return [f"class {c}: {n}" for c in range(num_classes) for n in names]


def moments_raster_figure(moments: Any, *, ax=None, layer_names=None, class_index: int | None = None):
    """Raster of moments of learning per layer; synchronized moments in red (Lan et al., 2019,
    Fig. 6). Every row is labelled with its layer (and class).

    **Requires** the ``Moments`` of :func:`optax_layca.lca.moments_of_learning`; pass the
    curves' ``layer_names`` (e.g. ``history.layer_names``). For per-class moments pass
    ``class_index`` (default: all classes, one block of rows each).
    """
    m, s = np.asarray(moments.moments), np.asarray(moments.synchronized)
    if m.ndim == 2:
        m, s = m[None], s[None]
    classes = range(m.shape[0])
    if class_index is not None:
        classes = [range(m.shape[0])[class_index]]
        m, s = m[class_index : class_index + 1], s[class_index : class_index + 1]
    c, _, k = m.shape
    labels = _raster_labels(layer_names, k, c)
    if class_index is not None:
        labels = [f"class {classes[0]}: {n}" for n in labels]
    fig, (ax,) = figure_axes(ax, width=7, height=0.25 * c * k + 1.2)
    for ci in range(c):
        for j in range(k):
            row = ci * k + j
            ts = np.flatnonzero(m[ci, :, j])
            sync = s[ci, ts, j]
            ax.scatter(ts[~sync], np.full((~sync).sum(), row), s=8, c="k")
            ax.scatter(ts[sync], np.full(sync.sum(), row), s=10, c="tab:red")
    ax.set_yticks(range(c * k), labels, fontsize=7)
    ax.set_ylim(c * k - 0.5, -0.5)
    ax.set_xlabel("iteration")
    ax.set_title(
        f"moments of learning ({moments.num_synchronized} synchronized, "
        f"baseline {np.mean(moments.baseline):.1f}, p={moments.p_value:.3g})"
    )
    return fig
