"""What every figure shares: lazy pyplot, depth colours, the axes a figure draws on."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np

from .._layers import LAYER_NAMES

# Figures made by `figure_axes`: only these may be laid out (colour bars taking space, ...).
_OWN_FIGURES: weakref.WeakSet = weakref.WeakSet()


def pyplot():
    """``matplotlib.pyplot``, imported on first use (matplotlib is an optional extra)."""
    import matplotlib.pyplot as plt

    return plt


def depth_colors(n: int) -> list:
    """Viridis by depth, first layer darkest (the papers' colouring)."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.0 if n == 1 else i / (n - 1)) for i in range(n)]


def palette(colors: str | Sequence, n: int) -> list:
    """``n`` colours: ``"viridis"`` by depth (:func:`depth_colors`), another colormap name
    cycled, or the ``n`` colours given."""
    if colors == "viridis":
        return depth_colors(n)
    if isinstance(colors, str):
        from matplotlib import colormaps

        cmap = colormaps[colors]
        return [cmap(i % cmap.N) for i in range(n)]
    colors = list(colors)
    if len(colors) != n:
        raise ValueError(f"`colors=` must give one colour per series ({n}); got {len(colors)}.")
    return colors


def figure_axes(ax, n: int = 1, *, width: float = 4.0, height: float = 3.2):
    """``(fig, [axes])``: the given axes (one, or a sequence of ``n``) or a new row of ``n``.

    A caller's axes are drawn on as they are; only a figure made here is laid out here
    (constrained layout, so that labels, legends and colour bars fit inside it when saved with
    ``savefig``'s defaults): see :func:`owns_layout`.
    """
    if ax is not None:
        axes = list(np.ravel(ax)) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
        if len(axes) != n:
            raise ValueError(f"`ax=` must hold {n} axes for this figure; got {len(axes)}.")
        return axes[0].figure, axes
    fig, axes = pyplot().subplots(
        1, n, figsize=(width * n, height), squeeze=False, layout="constrained"
    )
    _OWN_FIGURES.add(fig)
    return fig, list(axes[0])


def owns_layout(fig) -> bool:
    """Whether ``fig`` was made by :func:`figure_axes` (else it is the caller's to lay out)."""
    return fig in _OWN_FIGURES


def side_colorbar(fig, axes: Sequence, mappable, **kwargs):
    """``fig.colorbar(mappable)`` beside ``axes`` without moving any axes of a caller.

    In a figure made here, or one with a layout engine, the engine makes room for it. On the
    axes of a caller's figure without one, it is a new axes just right of the panels' bounding
    box: no axes of the caller moves or shrinks.
    """
    if owns_layout(fig) or fig.get_layout_engine() is not None:
        return fig.colorbar(mappable, ax=list(axes), fraction=0.03, pad=0.02, **kwargs)
    boxes = [ax.get_position() for ax in axes]
    x1 = max(b.x1 for b in boxes)
    y0, y1 = min(b.y0 for b in boxes), max(b.y1 for b in boxes)
    cax = fig.add_axes([x1 + 0.015, y0, 0.015, y1 - y0], label="<colorbar>")  # as matplotlib
    return fig.colorbar(mappable, cax=cax, **kwargs)


def depth_colorbar(fig, axes: Sequence, colors: Sequence, label: str = "layer depth (0 = input)"):
    """A discrete colour bar, one colour per depth, ticks at the depths, beside ``axes``
    (placed as :func:`side_colorbar` places it)."""
    import matplotlib as mpl

    n = len(colors)
    cmap = mpl.colors.ListedColormap(list(colors))
    norm = mpl.colors.BoundaryNorm(np.arange(n + 1) - 0.5, n)
    bar = side_colorbar(fig, axes, mpl.cm.ScalarMappable(cmap=cmap, norm=norm), ticks=range(n))
    bar.set_label(label)
    return bar


def short_name(path: str) -> str:
    """A layer path without its trailing leaf name: ``"Dense_0/kernel"`` -> ``"Dense_0"``."""
    head, _, leaf = path.rpartition("/")
    return head if head and leaf in LAYER_NAMES else path


def entries(values, path: str, tail: int = 0) -> list[tuple[str, np.ndarray]]:
    """One ``(label, value)`` per layer that ``values`` holds.

    ``values`` has shape ``(*lead, *item)`` with ``tail`` trailing axes per item (0 for a
    scalar per layer, 1 for percentiles ``(p10, p50, p90)``). No leading axis: one layer,
    labelled ``path``; leading axes (stacked layers, units): one item per slice, labelled
    ``path[i]`` (row-major over the leading axes), as the figures' legends name them.
    """
    values = np.asarray(values)
    lead = values.shape[: values.ndim - tail]
    if not lead:
        return [(path, values)]
    flat = values.reshape((-1, *values.shape[values.ndim - tail :]))
    return [(f"{path}[{i}]", flat[i]) for i in range(flat.shape[0])]


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
