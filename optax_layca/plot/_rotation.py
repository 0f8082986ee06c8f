"""Layer-rotation figures: Carbonnelle & De Vleeschouwer (2019) Fig. 2b/4/5, 10, 11, 12;
Chen et al. (2023) layer-wise convergence rates.

Every function takes its measurement (a live :class:`~optax_layca.rotation.RotationHistory`
or one loaded with ``RotationHistory.load``, or plain dicts), accepts ``ax=`` and returns a
``matplotlib.figure.Figure``. Layers are coloured by depth with viridis, the first layer
darkest (as in the papers); matplotlib is imported inside each function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._common import depth_colors, figure_axes, ordered_layers

__all__ = [
    "convergence_rates_figure",
    "epoch_rotation_figure",
    "layer_multipliers_figure",
    "layer_norms_figure",
    "moment_percentiles_figure",
    "rotation_curves_figure",
]


def _history(obj: Any, where: str):
    from ..rotation import RotationHistory

    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        return RotationHistory.load(obj)
    if not isinstance(obj, RotationHistory):
        raise TypeError(
            f"`{where}` needs a RotationHistory (or the path of a saved one); got "
            f"{type(obj).__name__}."
        )
    return obj


def _lines(values: np.ndarray, path: str) -> list[tuple[str, np.ndarray]]:
    """One series per layer; vector figures (stacked layers, units) give one line per entry."""
    values = np.asarray(values)
    if values.ndim == 1:
        return [(path, values)]
    flat = values.reshape(values.shape[0], -1)
    return [(f"{path}[{i}]", flat[:, i]) for i in range(flat.shape[1])]


def _x_axis(hist, x: str, steps_per_epoch: int | None = None):
    if x == "step":
        return hist.steps.astype(float), np.ones(len(hist), bool), "step"
    if x == "epoch" and steps_per_epoch is not None:
        return hist.steps / float(steps_per_epoch), np.ones(len(hist), bool), "epoch"
    if x == "epoch":
        epochs = hist.epochs
        keep = ~np.isnan(epochs)
        if not keep.any():
            raise ValueError("`x='epoch'` needs records taken with `epoch=`; use `x='step'`.")
        return epochs[keep], keep, "epoch"
    raise ValueError(f"`x=` must be 'step' or 'epoch'; got {x!r}.")


def _plot_layers(ax, x, series: list[tuple[str, np.ndarray]], log_x: bool, legend: bool):
    colors = depth_colors(len(series))
    for (label, y), color in zip(series, colors):
        ax.plot(x, y, color=color, label=label, lw=1.5)
    if log_x:
        ax.set_xscale("log")
    if legend and len(series) <= 12:
        ax.legend(fontsize="x-small", frameon=False)


def _depth_colorbar(fig, axes, n: int) -> None:
    """One discrete colour per layer (the lines' viridis), ticks at the layer depths."""
    import matplotlib as mpl

    cmap = mpl.colors.ListedColormap(depth_colors(n))
    norm = mpl.colors.BoundaryNorm(np.arange(n + 1) - 0.5, n)
    bar = fig.colorbar(
        mpl.cm.ScalarMappable(cmap=cmap, norm=norm),
        ax=axes,
        fraction=0.03,
        pad=0.02,
        ticks=range(n),
    )
    bar.set_label("layer depth (0 = input)")


def rotation_curves_figure(
    history: Any,
    *,
    ax=None,
    log_x: bool = False,
    x: str = "step",
    accuracies: Mapping[str, float] | float | None = None,
    layer_order: Sequence[str] | None = None,
    legend: bool = True,
    title: str | None = None,
    steps_per_epoch: int | None = None,
    colorbar: bool = False,
):
    """Layer rotation curves: cosine distance to init vs step, one line per layer.

    Carbonnelle & De Vleeschouwer, 2019, Fig. 2b/4/5 ("layer-wise angle deviation curves"). Lines are coloured by depth
    (viridis, first layer darkest); y spans ``[0, 1]``.

    **Requires** the ``cosine_distance`` figure of :func:`~optax_layca.rotation.track_rotation`
    recorded in a :class:`~optax_layca.rotation.RotationHistory`.

    Args:
      history: a ``RotationHistory`` (or saved path), or ``{run name: history}`` for
        side-by-side panels, one per run.
      ax: an axes (one history) or a sequence of axes (one per run); None: a new figure.
      log_x: logarithmic x axis (records at step 0 are dropped there).
      x: ``"step"`` (all records) or ``"epoch"`` (records taken with ``epoch=``).
      accuracies: test accuracy per run (``{run name: acc}``, or one float), shown in the
        panel titles as ``"<name> (test acc. 91.2%)"``.
      layer_order: layer paths in forward order (default: natural order of the history).
      legend: label the layers (when at most 12 lines).
      title: title of a single panel.
      steps_per_epoch: with ``x="epoch"``, place every record at ``step / steps_per_epoch``
        (epochs as a fraction) instead of keeping only the records taken with ``epoch=``.
      colorbar: add one colour bar by depth (layer index, 0 = input) beside the panels.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    runs = dict(history) if isinstance(history, Mapping) else {title or "": history}
    if not runs:
        raise ValueError("`rotation_curves_figure` needs at least one history.")
    if accuracies is not None and not isinstance(accuracies, Mapping):
        if len(runs) != 1:
            raise ValueError("`accuracies=` must be a {run name: accuracy} dict for several runs.")
        accuracies = {next(iter(runs)): float(accuracies)}
    if steps_per_epoch is not None and not steps_per_epoch > 0:
        raise ValueError(f"`steps_per_epoch=` must be > 0; got {steps_per_epoch!r}.")
    fig, axes = figure_axes(ax, len(runs))
    num_lines = 0
    for panel, (name, hist) in zip(axes, runs.items()):
        hist = _history(hist, "rotation_curves_figure")
        xs, keep, xlabel = _x_axis(hist, x, steps_per_epoch)
        data = hist.get("cosine_distance")
        series = []
        for path in ordered_layers(list(data), layer_order, "rotation_curves_figure"):
            series += _lines(data[path][keep], path)
        if log_x:
            pos = xs > 0
            xs, series = xs[pos], [(lab, y[pos]) for lab, y in series]
        _plot_layers(panel, xs, series, log_x, legend and panel is axes[0])
        num_lines = max(num_lines, len(series))
        panel.set_ylim(0.0, 1.0)
        panel.set_xlabel(xlabel)
        panel.set_ylabel("cosine distance to init")
        label = str(name)
        if accuracies is not None and name in accuracies:
            acc = float(accuracies[name])
            label = f"{label} (test acc. {100 * acc if acc <= 1 else acc:.1f}%)".strip()
        if label:
            panel.set_title(label)
    if colorbar:
        _depth_colorbar(fig, axes, num_lines)
    return fig


def epoch_rotation_figure(
    history: Any,
    *,
    ax=None,
    log_y: bool = True,
    layer_order: Sequence[str] | None = None,
    legend: bool = True,
    colorbar: bool = False,
):
    """Rotation per epoch: cosine distance between each layer at the start and end of an epoch.

    Carbonnelle & De Vleeschouwer, 2019, Fig. 10 row 1. **Requires** ``RotationHistory.record(..., epoch=e,
    params=params)`` at each epoch end (see ``RotationHistory.per_epoch_rotation``).

    Args:
      history: a ``RotationHistory`` (or saved path), the ``(epochs, {layer path: array})``
        pair its ``per_epoch_rotation()`` returns, or ``{run name: either}`` for side-by-side
        panels, one per run, titled by run name.
      ax: an axes (one run) or a sequence of axes (one per run); None: a new figure.
      log_y: logarithmic y axis.
      layer_order: layer paths in forward order (default: natural order of the history).
      legend: label the layers (when at most 12 lines), in the first panel.
      colorbar: add one colour bar by depth (layer index, 0 = input) beside the panels.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    runs = dict(history) if isinstance(history, Mapping) else {"": history}
    if not runs:
        raise ValueError("`epoch_rotation_figure` needs at least one history.")
    fig, axes = figure_axes(ax, len(runs))
    num_lines = 0
    for panel, (name, hist) in zip(axes, runs.items()):
        if isinstance(hist, tuple) and len(hist) == 2:
            epochs, rot = np.asarray(hist[0]), dict(hist[1])
        else:
            epochs, rot = _history(hist, "epoch_rotation_figure").per_epoch_rotation()
        series = []
        for path in ordered_layers(list(rot), layer_order, "epoch_rotation_figure"):
            series += _lines(rot[path], path)
        _plot_layers(panel, epochs, series, False, legend and panel is axes[0])
        num_lines = max(num_lines, len(series))
        if log_y:
            panel.set_yscale("log")
        panel.set_xlabel("epoch")
        panel.set_ylabel("rotation per epoch (cosine distance)")
        if name:
            panel.set_title(str(name))
    if colorbar:
        _depth_colorbar(fig, axes, num_lines)
    return fig


def layer_norms_figure(
    history: Any,
    *,
    names: Sequence[str] = ("grad_norm", "weight_norm"),
    ax=None,
    x: str = "step",
    log_y: bool = True,
    layer_order: Sequence[str] | None = None,
    legend: bool = True,
):
    """Per-layer norms over training, one panel per figure name (Carbonnelle & De Vleeschouwer, 2019, Fig. 10 rows 2–3).

    **Requires** the ``grad_norm`` / ``weight_norm`` / ``update_norm`` figures of
    :func:`~optax_layca.rotation.track_rotation` in a ``RotationHistory`` (``grad_norm`` is
    the raw gradient when the monitor wraps the optimizer).

    Args:
      names: figures to draw, one panel each.
      ax: a sequence of ``len(names)`` axes, or None.
      x: ``"step"`` or ``"epoch"``.
      log_y: logarithmic y axis.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    hist = _history(history, "layer_norms_figure")
    names = [names] if isinstance(names, str) else list(names)
    fig, axes = figure_axes(ax, len(names))
    xs, keep, xlabel = _x_axis(hist, x)
    for panel, name in zip(axes, names):
        data = hist.get(name)
        series = []
        for path in ordered_layers(list(data), layer_order, "layer_norms_figure"):
            series += _lines(data[path][keep], path)
        _plot_layers(panel, xs, series, False, legend and panel is axes[0])
        if log_y:
            panel.set_yscale("log")
        panel.set_xlabel(xlabel)
        panel.set_ylabel(name.replace("_", " "))
    return fig


def moment_percentiles_figure(
    percentiles: Mapping[Any, Mapping[str, Any]] | Mapping[str, Any],
    *,
    ax=None,
    layer_order: Sequence[str] | None = None,
    log_y: bool = True,
):
    """Adam's second-moment estimate per layer: 10/50/90th percentiles (Carbonnelle & De Vleeschouwer, 2019, Fig. 11).

    For each layer index: a bullet at the median and a bar from the 10th to the 90th
    percentile; several snapshots (e.g. epochs 1, 10, 50) side by side, coloured with viridis.

    **Requires** :func:`~optax_layca.rotation.second_moment_percentiles` outputs: one
    ``{layer path: (p10, p50, p90)}`` dict, or ``{label: that dict}`` for several snapshots.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    if not percentiles:
        raise ValueError("`moment_percentiles_figure` needs at least one layer.")
    first = next(iter(percentiles.values()))
    snaps = dict(percentiles) if isinstance(first, Mapping) else {"": percentiles}
    fig, (axis,) = figure_axes(ax)
    colors = depth_colors(len(snaps))
    width = 0.6 / max(len(snaps), 1)
    for k, ((label, snap), color) in enumerate(zip(snaps.items(), colors)):
        from .._layers import natural_order

        paths = ordered_layers(natural_order(snap), layer_order, "moment_percentiles_figure")
        vals = np.stack([np.asarray(snap[p], float).reshape(-1, 3)[0] for p in paths])
        xs = np.arange(len(paths)) + (k - (len(snaps) - 1) / 2) * width
        axis.errorbar(
            xs,
            vals[:, 1],
            yerr=[vals[:, 1] - vals[:, 0], vals[:, 2] - vals[:, 1]],
            fmt="o",
            color=color,
            capsize=3,
            label=str(label) or None,
        )
    if log_y:
        axis.set_yscale("log")
    axis.set_xticks(np.arange(len(paths)))
    axis.set_xlabel("layer index")
    axis.set_ylabel("second moment estimate ν")
    if len(snaps) > 1:
        axis.legend(fontsize="x-small", frameon=False)
    return fig


def layer_multipliers_figure(
    alphas: Sequence[float] | float,
    num_layers: int,
    *,
    ax=None,
):
    """Eq. 1 multipliers vs layer index, one line per α (Carbonnelle & De Vleeschouwer, 2019, Fig. 12).

    Lines for negative α (first layers prioritised) and positive α (last layers) share one
    axes, coloured with viridis in the order given.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    from .._multipliers import layer_multipliers as multipliers

    alphas = [alphas] if np.ndim(alphas) == 0 else list(alphas)
    if not alphas:
        raise ValueError("`layer_multipliers_figure` needs at least one α.")
    fig, (axis,) = figure_axes(ax)
    for alpha, color in zip(alphas, depth_colors(len(alphas))):
        m = np.asarray(multipliers(alpha, num_layers))
        axis.plot(np.arange(num_layers), m, "o-", color=color, label=f"α = {alpha:g}", ms=3)
    axis.set_ylim(0.0, 1.05)
    axis.set_xlabel("layer index l")
    axis.set_ylabel("multiplier")
    axis.legend(fontsize="x-small", frameon=False)
    return fig


def convergence_rates_figure(
    rates: Mapping[str, Any],
    *,
    ax=None,
    layer_order: Sequence[str] | None = None,
):
    """Layer-wise convergence rate per layer as bars (Chen et al., 2023, Fig. 1 style).

    **Requires** :func:`~optax_layca.rotation.layer_convergence_rate` output
    ``{layer path: C_l}`` (a scalar per layer). Bars follow ``layer_order`` (default: natural
    order), coloured by depth.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    from .._layers import natural_order

    if not rates:
        raise ValueError("`convergence_rates_figure` needs at least one layer.")
    paths = ordered_layers(natural_order(rates), layer_order, "convergence_rates_figure")
    vals = [float(np.mean(rates[p])) for p in paths]
    fig, (axis,) = figure_axes(ax)
    axis.bar(np.arange(len(paths)), vals, color=depth_colors(len(paths)))
    axis.set_xticks(np.arange(len(paths)))
    axis.set_xticklabels(
        [p.split("/")[0] for p in paths], rotation=45, ha="right", fontsize="small"
    )
    axis.set_ylabel("convergence rate C")
    axis.axhline(0.0, color="k", lw=0.5)
    return fig
