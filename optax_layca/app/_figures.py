"""Figure layouts shared by the commands and experiments: panels drawn by :mod:`optax_layca.plot`.

Nothing is plotted here: these helpers make grids of axes, hand them to the library's
``*_figure`` functions (``ax=``) and tidy the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["grid", "histories_panels", "tidy"]


def grid(n: int, ncols: int | None = None, size: float = 3.0, share: bool = True):
    """``(fig, [axes])``: ``n`` panels, at most ``ncols`` (default 3) a row; spares hidden."""
    import matplotlib.pyplot as plt

    ncols = ncols or min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(size * ncols + 1.2, size * nrows + 0.6),
        squeeze=False,
        sharex=share,
        sharey=share,
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def tidy(fig, axes: Sequence[Any], title: str) -> None:
    """Small panel titles (a long one broken before its last parenthesis), axis labels on the
    outer panels only, a light grid and a figure title."""
    for ax in axes:
        ax.grid(alpha=0.3)
        head, sep, tail = ax.get_title().rpartition(" (")
        if sep and len(head) + len(tail) > 26:
            ax.set_title(f"{head}\n({tail}")
        ax.title.set_fontsize(9)
        spec = ax.get_subplotspec()
        if spec is not None and not spec.is_last_row():
            ax.set_xlabel("")
        if spec is not None and not spec.is_first_col():
            ax.set_ylabel("")
    fig.suptitle(title, fontsize=11)


def histories_panels(
    kind: str,
    histories: Mapping[str, Any],
    order: Sequence[str],
    *,
    title: str,
    steps_per_epoch: int | None = None,
    accuracies: Mapping[str, float] | None = None,
    ncols: int | None = None,
):
    """One panel per run of :func:`optax_layca.plot.rotation_curves_figure` (``kind="curves"``)
    or :func:`~optax_layca.plot.epoch_rotation_figure` (``kind="epoch"``), colour bar by
    depth. Runs without records are left out."""
    from .. import plot

    has_epochs = lambda h: kind == "curves" or bool(np.isfinite(h.epochs).any())
    histories = {k: h for k, h in histories.items() if len(h) and has_epochs(h)}
    if not histories:
        raise ValueError(f"No run has the records a {kind!r} figure needs.")
    fig, axes = grid(len(histories), ncols)
    common = dict(ax=axes, layer_order=list(order), legend=False, colorbar=True)
    if kind == "curves":
        finite = {k: v for k, v in (accuracies or {}).items() if np.isfinite(v)}
        plot.rotation_curves_figure(
            histories, x="epoch", steps_per_epoch=steps_per_epoch, accuracies=finite, **common
        )
    else:
        plot.epoch_rotation_figure(histories, **common)
    tidy(fig, axes, title)
    return fig
