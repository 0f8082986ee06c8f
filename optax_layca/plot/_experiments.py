"""Figures of single paper experiments: accuracy per trained layer (Carbonnelle & De
Vleeschouwer, 2019, Fig. 1) and first-layer features drawn in input space (Carbonnelle & De
Vleeschouwer, extended version, 2019, Fig. 8).

Both take plain arrays and dicts (no training object), accept ``ax=`` and return a
``matplotlib.figure.Figure``; layers are coloured by depth with viridis, the first darkest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._common import depth_colors, figure_axes, pyplot

__all__ = ["features_figure", "layer_accuracy_figure"]


def layer_accuracy_figure(
    values: Any,
    *,
    ax=None,
    xlabel: str = "index of the trained layer",
    ylabel: str = "test accuracy",
    title: str | None = None,
):
    """An accuracy (or any score) per layer index: one point per repetition, their mean joined
    by a dashed line (Carbonnelle & De Vleeschouwer, 2019, Fig. 1: test accuracy when only
    layer ``l`` of an MLP is trained, averaged over repetitions).

    Points are coloured by layer depth (viridis, first layer darkest); repetitions are small
    and light, the mean large. NaN entries (a diverged run) are left out of the mean.

    Args:
      values: ``(layers,)`` or ``(repetitions, layers)`` scores, layer ``l`` in column ``l``.
      ax: an axes, or None for a new figure.
      xlabel, ylabel, title: labels.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    v = np.asarray(values, float)
    v = v[None] if v.ndim == 1 else v
    if v.ndim != 2 or v.shape[1] == 0:
        raise ValueError(
            f"`layer_accuracy_figure(values=...)` must be (layers,) or (repetitions, layers); "
            f"got shape {np.shape(values)}."
        )
    fig, (axis,) = figure_axes(ax)
    layers = np.arange(v.shape[1])
    colors = depth_colors(v.shape[1])
    finite = np.isfinite(v)
    counts = finite.sum(axis=0)
    mean = np.where(
        counts > 0, np.where(finite, v, 0.0).sum(axis=0) / np.maximum(counts, 1), np.nan
    )
    if v.shape[0] > 1:
        for row in v:
            axis.scatter(layers, row, c=colors, s=12, alpha=0.35, linewidths=0)
    axis.plot(layers, mean, ls="--", color="0.4", lw=1.2, zorder=1)
    axis.scatter(layers, mean, c=colors, s=60, zorder=2, edgecolors="k", linewidths=0.5)
    axis.set_xticks(layers)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if title:
        axis.set_title(title)
    return fig


def _feature_rows(
    features: Mapping[str, Any], shape: Sequence[int], units: Sequence[int] | None
) -> tuple[list[str], list[int], dict[str, np.ndarray]]:
    """Checked ``(row labels, unit indices, {label: (units, *shape)})``."""
    if not features:
        raise ValueError("`features_figure` needs at least one weight matrix.")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (1, 2) or min(shape) < 1:
        raise ValueError(f"`features_figure(shape=...)` must be (length,) or (h, w); got {shape}.")
    size = int(np.prod(shape))
    rows = {}
    for label, w in features.items():
        w = np.asarray(w, float)
        if w.ndim != 2 or w.shape[0] != size:
            raise ValueError(
                f"`features_figure`: weights {label!r} must be (inputs = {size}, units); got "
                f"shape {w.shape}."
            )
        rows[str(label)] = w.T.reshape((w.shape[1], *shape))
    num_units = min(r.shape[0] for r in rows.values())
    units = list(range(min(5, num_units))) if units is None else [int(u) for u in units]
    bad = [u for u in units if not 0 <= u < num_units]
    if not units or bad:
        raise ValueError(f"`features_figure(units=...)` must index [0, {num_units}); got {units}.")
    return list(rows), units, rows


def features_figure(
    features: Mapping[str, Any],
    *,
    shape: Sequence[int],
    units: Sequence[int] | None = None,
    annotations: Mapping[str, str] | None = None,
    ax=None,
    cmap: str = "viridis",
):
    """The first layer's features in input space: one row per weight matrix (e.g. the
    initialisation, then training at increasing layer rotation), one column per hidden unit
    (Carbonnelle & De Vleeschouwer, extended version, 2019, Fig. 8).

    A unit's incoming weights are drawn as an image when the input is an image (``shape =
    (h, w)``, e.g. the 8×8 digits) or as a line plot for a signal (``shape = (length,)``, e.g.
    MNIST-1D). Each image is scaled on its own (as the authors draw them): the figure shows
    a feature's pattern, not its norm.

    Args:
      features: ``{row label: kernel (inputs, units)}`` in Flax's layout; the same units are
        drawn from every row.
      shape: one unit's input shape, ``(h, w)`` or ``(length,)``.
      units: unit indices to draw (default the first five).
      annotations: ``{row label: text}`` written beside each row (e.g. the cosine distance to
        init and the test accuracy reached).
      ax: a ``(rows, units)`` grid of axes (nested lists or an array), or None.
      cmap: colour map of the images.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    labels, units, rows = _feature_rows(features, shape, units)
    if ax is None:
        fig, grid = pyplot().subplots(
            len(labels),
            len(units),
            figsize=(1.6 * len(units) + 1.8, 1.6 * len(labels) + 0.4),
            squeeze=False,
            layout="constrained",
        )
    else:
        grid = np.asarray(ax, dtype=object).reshape(-1)
        if grid.size != len(labels) * len(units):
            raise ValueError(
                f"`ax=` must hold {len(labels)} x {len(units)} axes for this figure; got "
                f"{grid.size}."
            )
        grid = grid.reshape(len(labels), len(units))
        fig = grid[0, 0].figure
    for i, label in enumerate(labels):
        for j, u in enumerate(units):
            panel, image = grid[i, j], rows[label][u]
            if image.ndim == 2:
                panel.imshow(image, cmap=cmap, interpolation="none")
            else:
                panel.plot(image, color=depth_colors(1)[0], lw=1.2)
            panel.set_xticks([])
            panel.set_yticks([])
            if i == 0:
                panel.set_title(f"unit {u}", fontsize=9)
        grid[i, 0].set_ylabel(label, fontsize=9)
        if annotations and label in annotations:
            grid[i, -1].annotate(
                annotations[label],
                xy=(1.08, 0.5),
                xycoords="axes fraction",
                va="center",
                ha="left",
                fontsize=9,
            )
    return fig
