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

from ._common import depth_colorbar, depth_colors, entries, figure_axes, ordered_layers, short_name

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
    return entries(np.moveaxis(np.asarray(values), 0, -1), path, tail=1)


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
    depth_colorbar(fig, axes, depth_colors(n))


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

    Carbonnelle & De Vleeschouwer, 2019, Fig. 2b/4/5 ("layer-wise angle deviation curves").
    Lines are coloured by depth (viridis, first layer darkest); y spans ``[0, 1]``.

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

    Carbonnelle & De Vleeschouwer, 2019, Fig. 10 row 1.

    **Requires** ``RotationHistory.record(..., epoch=e, params=params)`` at each epoch end
    (what ``RotationHistory.per_epoch_rotation`` returns).

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
    """Per-layer norms over training, one panel per figure name (Carbonnelle & De
    Vleeschouwer, 2019, Fig. 10 rows 2–3).

    **Requires** the ``grad_norm`` / ``weight_norm`` / ``update_norm`` figures of
    :func:`~optax_layca.rotation.track_rotation` in a ``RotationHistory`` (``grad_norm`` is
    the raw gradient when the monitor wraps the optimizer).

    Args:
      history: a ``RotationHistory`` (or the path of a saved one).
      names: figures to draw, one panel each.
      ax: a sequence of ``len(names)`` axes, or None.
      x: ``"step"`` or ``"epoch"``.
      log_y: logarithmic y axis.
      layer_order: layer paths in forward order (default: natural order of the history).
      legend: label the layers (when at most 12 lines), in the first panel.

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
    """Adam's second-moment estimate per layer: 10/50/90th percentiles (Carbonnelle & De
    Vleeschouwer, 2019, Fig. 11).

    For each layer index: a bullet at the median and a bar from the 10th to the 90th
    percentile; several snapshots (e.g. epochs 1, 10, 50) side by side, coloured with viridis.
    A stacked leaf (``layer_axis=``) gives one entry per stacked layer, in stack order.

    **Requires** what :func:`~optax_layca.rotation.second_moment_percentiles` returns with its
    default ``q=(10, 50, 90)``: one ``{layer path: (p10, p50, p90)}`` dict (``(n, 3)`` for
    stacked layers), or ``{label: that dict}`` for several snapshots.

    Args:
      percentiles: one snapshot, or ``{label: snapshot}``.
      ax: an axes, or None for a new figure.
      layer_order: layer paths in forward order (default: natural order).
      log_y: logarithmic y axis.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    from .._layers import natural_order

    if not percentiles:
        raise ValueError("`moment_percentiles_figure` needs at least one layer.")
    first = next(iter(percentiles.values()))
    snaps = dict(percentiles) if isinstance(first, Mapping) else {"": percentiles}
    table = {}
    for label, snap in snaps.items():
        paths = ordered_layers(natural_order(snap), layer_order, "moment_percentiles_figure")
        rows = []
        for p in paths:
            v = np.asarray(snap[p], float)
            if v.shape[-1:] != (3,):
                raise ValueError(
                    f"`moment_percentiles_figure` needs 3 percentiles (p10, p50, p90) per layer; "
                    f"{p!r} has shape {v.shape}."
                )
            rows += [x for _, x in entries(v, p, tail=1)]
        table[label] = np.stack(rows)
    fig, (axis,) = figure_axes(ax)
    colors = depth_colors(len(snaps))
    width = 0.6 / max(len(snaps), 1)
    for k, ((label, vals), color) in enumerate(zip(table.items(), colors)):
        xs = np.arange(len(vals)) + (k - (len(snaps) - 1) / 2) * width
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
    axis.set_xticks(np.arange(len(vals)))
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
    """Eq. 1 multipliers vs layer index, one line per α (Carbonnelle & De Vleeschouwer, 2019,
    Fig. 12).

    Lines for negative α (first layers prioritised) and positive α (last layers) share one
    axes, coloured with viridis in the order given.

    **Requires** no measurement: the α values and the number of layers; the multipliers are
    :func:`optax_layca.layer_multipliers`, as :func:`optax_layca.scale_by_layer_multipliers`
    applies them.

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

    Bars follow ``layer_order`` (default: natural order), coloured by depth; a stacked leaf
    (``layer_axis=``) or per-unit rates give one bar per stacked layer or unit, ``path[i]``.

    **Requires** what :func:`~optax_layca.rotation.layer_convergence_rate` returns:
    ``{layer path: C_l}``.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    from .._layers import natural_order

    if not rates:
        raise ValueError("`convergence_rates_figure` needs at least one layer.")
    paths = ordered_layers(natural_order(rates), layer_order, "convergence_rates_figure")
    bars = [(label, float(v)) for p in paths for label, v in entries(rates[p], short_name(p))]
    fig, (axis,) = figure_axes(ax)
    axis.bar(np.arange(len(bars)), [v for _, v in bars], color=depth_colors(len(bars)))
    axis.set_xticks(np.arange(len(bars)))
    axis.set_xticklabels([label for label, _ in bars], rotation=45, ha="right", fontsize="small")
    axis.set_ylabel("convergence rate C")
    axis.axhline(0.0, color="k", lw=0.5)
    return fig
