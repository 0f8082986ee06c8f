"""Notebook displays: a per-layer table and a small inline figure for the measurements.

In Jupyter, a cell ending in a :class:`~optax_layca.rotation.RotationHistory`, an
:class:`~optax_layca.lca.LCAResult` or an :class:`~optax_layca.lca.LCAHistory` shows what
happened: one row per layer (the latest figures, or the LCA each layer took) and a PNG of the
curves. The measurement classes know nothing of this (measurement never imports the show
wing): the HTML comes from here, registered with IPython's ``text/html`` formatter by type
*name*, so neither the classes nor matplotlib are imported to register it. Importing
:mod:`optax_layca` (which imports :mod:`optax_layca.plot`) registers it in a running IPython;
:func:`register_display` does it by hand (e.g. after starting IPython later).
"""

from __future__ import annotations

import base64
import html
import io
import sys
from typing import Any

import numpy as np

from ._common import depth_colors

__all__ = ["lca_html", "register_display", "rotation_history_html"]

# (module, class name) of what gets a display; a test checks them against the classes.
DISPLAYED = {
    ("optax_layca.rotation._history", "RotationHistory"): "rotation_history_html",
    ("optax_layca.lca._result", "LCAResult"): "lca_html",
    ("optax_layca.lca._result", "LCAHistory"): "lca_html",
}
_STYLE = (
    "<style>.optax-layca table{border-collapse:collapse;font-size:12px}"
    ".optax-layca td,.optax-layca th{padding:1px 8px;text-align:right}"
    ".optax-layca td:first-child,.optax-layca th:first-child{text-align:left}</style>"
)


def _num(x: Any) -> str:
    """A number, or a vector summarised (a few entries listed, more as mean [min, max])."""
    a = np.asarray(x, np.float64)
    if a.ndim == 0:
        return f"{float(a):.4g}"
    if a.size <= 4:
        return ", ".join(f"{v:.4g}" for v in a.ravel())
    return f"{np.mean(a):.4g} [{np.min(a):.3g}, {np.max(a):.3g}] ({a.size})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(draw, width: float = 5.0, height: float = 2.6) -> str:
    """``<img>`` of what ``draw(ax)`` draws on a figure outside pyplot (never shown twice)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=80, layout="constrained")
    draw(fig.add_subplot())
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}"/>'


def _box(title: str, body: str) -> str:
    return f'<div class="optax-layca">{_STYLE}<p>{title}</p>{body}</div>'


def rotation_history_html(history: Any, *, figure: bool = True) -> str:
    """HTML of a ``RotationHistory``: its span, each layer's latest figures and rotation curves.

    **Requires** a :class:`~optax_layca.rotation.RotationHistory` (empty ones say so).

    Args:
      history: the history.
      figure: add the rotation curves (cosine distance to init vs step) as a PNG.

    Returns:
      An HTML string (a table and an ``<img>``).
    """
    from ._rotation import rotation_curves_figure

    if len(history) == 0:
        return _box("<b>RotationHistory</b>: empty (no record yet)", "")
    steps, epochs = history.steps, history.epochs
    ends = epochs[~np.isnan(epochs)]
    span = f"steps {steps[0]}–{steps[-1]}" + (
        f", epochs {ends[0]:g}–{ends[-1]:g}" if ends.size else ""
    )
    title = (
        f"<b>RotationHistory</b>: {len(history)} records, {span}, "
        f"{len(history.layers)} layers; latest record (step {steps[-1]}):"
    )
    names = list(history.names)
    figures = {n: history.get(n) for n in names}
    rows = [[p] + [_num(figures[n][p][-1]) for n in names] for p in history.layers]
    body = _table(["layer"] + [n.replace("_", " ") for n in names], rows)
    if figure and "cosine_distance" in names:
        legend = len(history.layers) <= 8
        body += _png(lambda ax: rotation_curves_figure(history, ax=ax, legend=legend))
    return _box(title, body)


def _lca_view(obj: Any) -> tuple[list[str], np.ndarray, bool]:
    """(layer names, per-layer LCA ``[T, M]`` or ``[M]``, is a history)."""
    names = list(obj.layer_names)
    per_layer = obj.per_layer
    if isinstance(per_layer, dict):
        return names, np.asarray([per_layer[n] for n in names], np.float64), False
    per_layer = np.asarray(per_layer, np.float64)
    return names, per_layer, per_layer.ndim == 2


def _lca_title(obj: Any, history: bool) -> str:
    method = html.escape(str(getattr(obj, "method", "")))
    change, total, error = (np.sum(getattr(obj, k)) for k in ("loss_change", "total", "error"))
    unconverged = int(np.sum(~np.asarray(obj.converged, bool)))
    what = f"<b>{type(obj).__name__}</b> ({method})"
    if history:
        its = getattr(obj, "iterations", None)
        its = np.arange(len(obj)) if its is None else np.asarray(its)
        what += f": {len(obj)} iterations ({its[0]}–{its[-1]})"
    return (
        f"{what}; measured ΔL = {change:.4g}, Σ LCA = {total:.4g}, error {error:.3g}, "
        f"{unconverged} not converged. Negative LCA helped (lowered the loss)."
    )


def lca_html(result: Any, *, figure: bool = True) -> str:
    """HTML of an ``LCAResult`` or ``LCAHistory``: the loss change, each layer's LCA, a figure.

    **Requires** an :class:`~optax_layca.lca.LCAResult` (one step: LCA per layer as bars) or an
    :class:`~optax_layca.lca.LCAHistory` (a run: cumulative LCA per layer over iterations,
    with their sum solid and the measured cumulative loss change dashed).

    Args:
      result: the result or history.
      figure: add the figure as a PNG.

    Returns:
      An HTML string (a table and an ``<img>``).
    """
    names, per_layer, history = _lca_view(result)
    totals = per_layer.sum(axis=0) if history else per_layer
    whole = float(np.sum(totals))
    header = ["layer", "cumulative LCA" if history else "LCA", "share of Σ LCA"]
    share = lambda v: f"{100 * v / whole:.1f}%" if whole else "–"
    rows = [[n, f"{v:.4g}", share(v)] for n, v in zip(names, totals)]
    if history:
        header.append("iterations helping")
        rows = [r + [f"{100 * np.mean(per_layer[:, k] < 0):.0f}%"] for k, r in enumerate(rows)]
    body = _table(header, rows)
    if figure and names:
        draw = _draw_cumulative if history else _draw_bars
        body += _png(lambda ax: draw(ax, result, names, per_layer))
    return _box(_lca_title(result, history), body)


def _draw_bars(ax, result, names, per_layer) -> None:
    colors = ["tab:blue" if v <= 0 else "tab:red" for v in per_layer]
    ax.barh(np.arange(len(names)), per_layer, color=colors)
    ax.set_yticks(np.arange(len(names)), names, fontsize="small")
    ax.invert_yaxis()
    ax.axvline(0.0, color="k", lw=0.6)
    ax.set_xlabel("LCA (negative helped)")


def _draw_cumulative(ax, result, names, per_layer) -> None:
    its = getattr(result, "iterations", None)
    its = np.arange(len(per_layer)) if its is None else np.asarray(its)
    for k, (name, color) in enumerate(zip(names, depth_colors(len(names)))):
        ax.plot(its, np.cumsum(per_layer[:, k]), color=color, label=name, lw=1.5)
    ax.plot(its, np.cumsum(per_layer.sum(axis=1)), "k-", lw=1, label="Σ LCA")
    ax.plot(its, np.cumsum(result.loss_change), "k--", lw=1, label="measured ΔL")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cumulative LCA")
    if len(names) <= 8:
        ax.legend(fontsize="x-small", frameon=False)


def register_display(shell: Any = None) -> bool:
    """Registers the displays with IPython's ``text/html`` formatter.

    Args:
      shell: an IPython shell (default: the running one, if IPython is already imported;
        IPython is never imported here).

    Returns:
      True if a shell was found and the formatters registered.
    """
    if shell is None:
        ipython = sys.modules.get("IPython")
        shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return False
    formatter = shell.display_formatter.formatters["text/html"]
    here = sys.modules[__name__]
    for (module, name), fn in DISPLAYED.items():
        formatter.for_type_by_name(module, name, getattr(here, fn))
    return True
