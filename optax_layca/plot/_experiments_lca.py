"""Figures of the Loss Change Allocation experiments (Lan et al., 2019, Tables 1, S1, S2,
Figs. 4–6, S13–S19, §S6.2) that :mod:`._lca` does not draw: grouped bars over layers (or runs),
the shifted baseline of synchronised moments, and the per-class × per-layer heat map."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._common import figure_axes, palette, side_colorbar

__all__ = ["class_layer_lca_figure", "lca_bars_figure", "moments_baseline_figure"]


def lca_bars_figure(
    values: Mapping[str, Mapping[str, float]],
    *,
    ax=None,
    categories: Sequence[str] | None = None,
    ylabel: str = "cumulative LCA (negative = helped)",
    colors: str | Sequence[Any] = "tab10",
    log_y: bool = False,
    title: str | None = None,
):
    """Grouped bars: one group per category (layer), one bar per series (run).

    Lan et al., 2019, Fig. 4 and S13 (cumulative LCA of each layer, baseline beside the run
    with a frozen layer), Table 1 / S1 / S2 drawn as bars. Non-finite values are left out;
    with ``log_y`` the bars show ``|value|``.

    Args:
      values: ``{series label: {category: value}}``; every series holds every category.
      ax: an axes, or None for a new figure.
      categories: the categories in order (default: the first series' keys).
      ylabel, title: labels.
      colors: a colormap name (one colour per series) or one colour per series.
      log_y: logarithmic y axis of the magnitudes.

    Returns:
      The ``matplotlib.figure.Figure``.

    Examples:
      >>> fig = lca_bars_figure({"baseline": {"Dense_0": -0.5, "Dense_1": -0.2},
      ...                        "frozen": {"Dense_0": 0.0, "Dense_1": -0.6}})
      >>> [round(float(p.get_height()), 2) for p in fig.axes[0].patches]
      [-0.5, -0.2, 0.0, -0.6]
    """
    if not values:
        raise ValueError("`lca_bars_figure` needs at least one series.")
    cats = list(categories) if categories is not None else list(next(iter(values.values())))
    for label, row in values.items():
        missing = [c for c in cats if c not in row]
        if missing:
            raise ValueError(f"`values[{label!r}]` lacks the categories {missing}.")
    fig, (axis,) = figure_axes(ax, width=max(4.0, 0.9 * len(cats) * max(1, len(values)) / 2 + 2))
    colours = palette(colors, len(values))
    width = 0.8 / len(values)
    x = np.arange(len(cats), dtype=float)
    for i, ((label, row), color) in enumerate(zip(values.items(), colours)):
        v = np.asarray([row[c] for c in cats], float)
        v = np.abs(v) if log_y else v
        keep = np.isfinite(v) & ((v > 0) if log_y else True)
        offset = (i - (len(values) - 1) / 2) * width
        axis.bar(x[keep] + offset, v[keep], width=width, color=color, label=label)
    if log_y:
        axis.set_yscale("log")
    else:
        axis.axhline(0.0, color="k", lw=0.8)
    axis.set_xticks(x, cats, rotation=30 if len(cats) > 4 else 0, fontsize=8)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize="x-small", frameon=False)
    if title:
        axis.set_title(title)
    return fig


def moments_baseline_figure(moments: Any, *, ax=None, label: str = "LCA", color: str = "tab:red"):
    """The number of synchronised moments of learning against the randomly shifted baseline
    (Lan et al., 2019, §5 and §S5: every layer's moments shifted one or two iterations
    earlier or later): a histogram of the baseline counts and the observed count.

    Requires: the ``Moments`` of :func:`optax_layca.lca.moments_of_learning`.

    Examples:
      >>> from optax_layca import lca
      >>> curves = -np.abs(np.sin(np.arange(60.0)))[:, None] * np.ones((1, 3))
      >>> fig = moments_baseline_figure(lca.moments_of_learning(curves, k=5, num_shuffles=20))
      >>> fig.axes[0].get_xlabel()
      'synchronised moments'
    """
    base = np.asarray(moments.baseline, float)
    fig, (axis,) = figure_axes(ax, width=4, height=3)
    lo, hi = (
        min(base.min(initial=0), moments.num_synchronized),
        max(base.max(initial=0), moments.num_synchronized),
    )
    bins = np.arange(np.floor(lo) - 0.5, np.ceil(hi) + 1.5)
    axis.hist(base, bins=bins, color="0.6", label="shifted ±1–2 iterations")
    axis.axvline(moments.num_synchronized, color=color, lw=2, label=f"observed ({label})")
    axis.set_xlabel("synchronised moments")
    axis.set_ylabel("baseline draws")
    axis.set_title(
        f"{label}: {moments.num_synchronized} vs baseline {base.mean():.1f} "
        f"(p = {moments.p_value:.3g})",
        fontsize=9,
    )
    axis.legend(fontsize="x-small", frameon=False)
    return fig


def class_layer_lca_figure(
    per_class: Any,
    *,
    class_names: Sequence[str] | None = None,
    layer_names: Sequence[str] | None = None,
    ax=None,
    title: str | None = None,
    annotate: bool = True,
):
    """Heat map of per-class × per-layer LCA (Lan et al., 2019, §S6.2): row ``c``, column
    ``l`` is the part of class ``c``'s loss change allocated to layer ``l`` (blue helped, red
    hurt, white 0, the colour scale symmetric).

    Args:
      per_class: ``[C, M]`` values, e.g. ``history.per_class.sum(0)`` (an
        :class:`~optax_layca.lca.LCAHistory` recorded with ``labels=``).
      class_names, layer_names: tick labels (default ``0 … C-1`` and ``0 … M-1``).
      ax: an axes, or None for a new figure.
      annotate: write each value in its cell.

    Examples:
      >>> fig = class_layer_lca_figure(np.array([[-1.0, 0.5], [-0.2, -0.3]]),
      ...                              layer_names=["Dense_0", "Dense_1"])
      >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
      ['Dense_0', 'Dense_1']
    """
    v = np.asarray(per_class, float)
    if v.ndim != 2:
        raise ValueError(f"`per_class` must be [C, M]; got shape {v.shape}.")
    c, m = v.shape
    rows = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    cols = list(layer_names) if layer_names is not None else [str(j) for j in range(m)]
    if len(rows) != c or len(cols) != m:
        raise ValueError(f"{len(rows)} class and {len(cols)} layer names for a {v.shape} map.")
    fig, (axis,) = figure_axes(ax, width=1.0 * m + 2.5, height=0.35 * c + 1.5)
    finite = v[np.isfinite(v)]
    lim = float(np.max(np.abs(finite))) if finite.size and np.any(finite) else 1.0
    im = axis.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    axis.set_xticks(range(m), cols, fontsize=8)
    axis.set_yticks(range(c), rows, fontsize=8)
    axis.set_xlabel("layer")
    axis.set_ylabel("class")
    if annotate:
        for i in range(c):
            for j in range(m):
                axis.text(j, i, f"{v[i, j]:.2g}", ha="center", va="center", fontsize=6)
    side_colorbar(fig, [axis], im, label="LCA (negative = helped)")
    if title:
        axis.set_title(title)
    return fig
