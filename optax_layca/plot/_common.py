"""What every figure shares: lazy pyplot, depth colours, the axes a figure draws on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pyplot():
    """``matplotlib.pyplot``, imported on first use (matplotlib is an optional extra)."""
    import matplotlib.pyplot as plt

    return plt


def depth_colors(n: int) -> list:
    """Viridis by depth, first layer darkest (the papers' colouring)."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.0 if n == 1 else i / (n - 1)) for i in range(n)]


def figure_axes(ax, n: int = 1, *, width: float = 4.0, height: float = 3.2):
    """``(fig, [axes])``: the given axes (one, or a sequence of ``n``) or a new row of ``n``.

    A caller's axes are drawn on as they are; only a figure made here is laid out here.
    """
    if ax is not None:
        axes = list(np.ravel(ax)) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
        if len(axes) != n:
            raise ValueError(f"`ax=` must hold {n} axes for this figure; got {len(axes)}.")
        return axes[0].figure, axes
    fig, axes = pyplot().subplots(
        1, n, figsize=(width * n, height), squeeze=False, layout="constrained"
    )
    return fig, list(axes[0])


def ordered_layers(
    available: Sequence[str], layer_order: Sequence[str] | None, where: str
) -> list[str]:
    """``layer_order`` checked against the layers a measurement holds (default: all)."""
    if layer_order is None:
        return list(available)
    unknown = [p for p in layer_order if p not in available]
    if unknown:
        raise ValueError(
            f"`{where}(layer_order=...)` names unknown layers {unknown}; layers are "
            f"{list(available)}."
        )
    return list(layer_order)
