"""Loss Change Allocation figures (Lan et al., 2019 Figs. 2–6). Each takes an
:class:`optax_layca.lca.LCAHistory` (or what the docstring names) and returns a Figure."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import figure_axes

__all__ = ["helping_fraction_figure", "lca_heatmap_figure", "lca_per_layer_figure", "moments_raster_figure"]


def lca_per_layer_figure(history: Any, *, ax=None, layers: Any = None):
    """Bars of each leaf's cumulative LCA over the run (Lan et al., 2019 Fig. 4, S11).

    Requires: an ``LCAHistory`` (``per_layer``). Negative bars helped, positive bars hurt.
    ``layers``: optional subset/order of leaf paths (e.g. kernels in forward order).
    """
    from ..lca._analysis import _history

    h = _history(history)
    names = list(layers) if layers is not None else list(h.layer_names)
    idx = [h.layer_names.index(n) for n in names]
    totals = h.per_layer[:, idx].sum(axis=0)
    fig, (ax,) = figure_axes(ax, width=max(4, 0.6 * len(names)), height=3)
    colors = ["tab:blue" if v <= 0 else "tab:red" for v in totals]
    ax.bar(range(len(names)), totals, color=colors)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("cumulative LCA")
    ax.set_title("LCA per layer (negative = helped)")
    return fig


def helping_fraction_figure(history: Any, *, ax=None, zero_tol: float = 0.0):
    """Fractions of parameters helping / hurting / zero over iterations (Lan et al., 2019 Fig. 3a).

    Requires: per-parameter LCA (``grad`` engine, ``store_per_param=True`` on disk).
    """
    from ..lca._analysis import _history
    from ..lca._analysis import helping_fraction as fractions

    h = _history(history)
    f = fractions(h, zero_tol=zero_tol)
    t = h._iters()
    fig, (ax,) = figure_axes(ax, width=5, height=3)
    ax.stackplot(
        t,
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
    """Heat map of one leaf's per-parameter LCA at an iteration (Lan et al., 2019 Fig. 2).

    Requires: per-parameter LCA. A kernel ``[in, out]`` is shown as a matrix (other shapes are
    reshaped to ``[-1, last]``); blue helps, red hurts. ``cumulative`` sums up to ``iteration``.
    """
    from ..lca._analysis import _history, _per_param

    pp = _per_param(_history(history), "lca_heatmap_figure")
    if path not in pp:
        raise ValueError(f"`path={path!r}` is not a parameter leaf; leaves: {list(pp)}.")
    x = pp[path]
    t = iteration % x.shape[0]
    v = x[: t + 1].sum(0) if cumulative else x[t]
    v = v.reshape(1, -1) if v.ndim < 2 else v.reshape(-1, v.shape[-1])
    lim = float(np.max(np.abs(v))) or 1.0
    fig, (ax,) = figure_axes(ax, width=4, height=4)
    im = ax.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="LCA")
    ax.set_title(f"{path} @ iteration {t}" + (" (cumulative)" if cumulative else ""))
    ax.set_xlabel("output unit")
    ax.set_ylabel("input")
    return fig


def moments_raster_figure(moments: Any, *, ax=None, layer_names=None, class_index: int | None = None):
    """Raster of moments of learning per layer; synchronized moments in red (Lan et al., 2019 Fig. 6).

    Requires: the ``Moments`` of :func:`optax_layca.lca.moments_of_learning`. For per-class
    moments pass ``class_index`` (default: all classes, one row block each).
    """
    m, s = np.asarray(moments.moments), np.asarray(moments.synchronized)
    if m.ndim == 2:
        m, s = m[None], s[None]
    if class_index is not None:
        m, s = m[class_index : class_index + 1], s[class_index : class_index + 1]
    c, _, k = m.shape
    fig, (ax,) = figure_axes(ax, width=7, height=0.25 * c * k + 1.2)
    for ci in range(c):
        for j in range(k):
            row = ci * (k + 1) + j
            ts = np.flatnonzero(m[ci, :, j])
            sync = s[ci, ts, j]
            ax.scatter(ts[~sync], np.full((~sync).sum(), row), s=8, c="k")
            ax.scatter(ts[sync], np.full(sync.sum(), row), s=10, c="tab:red")
    if layer_names is not None and c == 1:
        ax.set_yticks(range(k), list(layer_names), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("iteration")
    ax.set_title(
        f"moments of learning ({moments.num_synchronized} synchronized, "
        f"baseline {np.mean(moments.baseline):.1f}, p={moments.p_value:.3g})"
    )
    return fig
