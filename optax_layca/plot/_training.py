"""Training-curve figures: loss and accuracy curves (Carbonnelle & De Vleeschouwer, 2019,
Fig. 3, Fig. 6) and the accuracy heat map over a hyperparameter grid (Fig. 2a)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._common import figure_axes, palette

__all__ = ["accuracy_heatmap_figure", "training_curves_figure"]


def training_curves_figure(
    series: Mapping[str, Any],
    *,
    ax=None,
    xlabel: str = "epoch",
    ylabel: str = "",
    log_x: bool = False,
    log_y: bool = False,
    colors: str | Sequence[Any] = "viridis",
    dashed: Mapping[str, Any] | None = None,
    title: str | None = None,
    legend: bool = True,
):
    """Curves ``y(x)``, one per run: loss or accuracy per epoch, accuracy vs a hyperparameter.

    Carbonnelle & De Vleeschouwer, 2019, Fig. 3 (training loss per epoch for several ``α`` and
    ``ρ(0)``) and Fig. 2a (test accuracy vs ``α`` and vs ``ρ(0)``). Non-finite points (a
    diverged run) are left out of the line.

    Args:
      series: ``{label: (x, y)}``, drawn in this order.
      ax: an axes, or None for a new figure.
      xlabel, ylabel, title: axis labels and title.
      log_x, log_y: logarithmic axes.
      colors: ``"viridis"`` (ordered runs, e.g. increasing ``α``: first darkest, as the
        papers' depth colouring), ``"tab10"`` (unordered runs) or one colour per series.
      dashed: more curves ``{label: (x, y)}`` drawn dashed in the colour of the same label
        (e.g. training accuracy beside the solid test accuracy); not in the legend.
      legend: label the curves.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    if not series:
        raise ValueError("`training_curves_figure` needs at least one series.")
    fig, (axis,) = figure_axes(ax)
    colours = palette(colors, len(series))
    for (label, (x, y)), color in zip(series.items(), colours):
        x, y = np.asarray(x, float), np.asarray(y, float)
        axis.plot(x, np.where(np.isfinite(y), y, np.nan), color=color, label=label, lw=1.5)
        if dashed and label in dashed:
            dx, dy = (np.asarray(v, float) for v in dashed[label])
            axis.plot(dx, np.where(np.isfinite(dy), dy, np.nan), color=color, ls="--", lw=0.9)
    if log_x:
        axis.set_xscale("log")
    if log_y:
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    if title:
        axis.set_title(title)
    if legend:
        axis.legend(fontsize="x-small", frameon=False)
    return fig


def accuracy_heatmap_figure(
    values: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    ax=None,
    xlabel: str = "α",
    ylabel: str = "ρ(0)",
    cbar_label: str = "test accuracy",
    missing: str = "div.",
):
    """Accuracy over a two-hyperparameter grid, each cell annotated (Fig. 2a as a heat map).

    Rows are drawn bottom-up (``row_labels[0]`` at the bottom, e.g. increasing ``ρ(0)``);
    NaN cells (diverged runs) are blank and annotated ``missing``.

    Args:
      values: ``(rows, cols)`` accuracies in ``[0, 1]``.
      row_labels, col_labels: tick labels.
      ax: an axes, or None for a new figure.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    acc = np.asarray(values, float)
    if acc.shape != (len(row_labels), len(col_labels)):
        raise ValueError(
            f"`values` must have shape ({len(row_labels)}, {len(col_labels)}); got {acc.shape}."
        )
    fig, (axis,) = figure_axes(
        ax, width=0.9 * len(col_labels) + 2.5, height=0.6 * len(row_labels) + 1.6
    )
    im = axis.imshow(acc, cmap="magma", origin="lower", aspect="auto", vmin=0.0, vmax=1.0)
    axis.set_xticks(range(len(col_labels)), list(col_labels))
    axis.set_yticks(range(len(row_labels)), list(row_labels))
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            v = acc[i, j]
            text = f"{v:.2f}" if np.isfinite(v) else missing
            axis.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=7,
                color="w" if not np.isfinite(v) or v < 0.5 else "k",
            )
    fig.colorbar(im, ax=axis, label=cbar_label)
    return fig
