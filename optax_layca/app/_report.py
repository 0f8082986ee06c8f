"""Figures and Markdown reports of the ``optax-layca`` command (matplotlib imported lazily).

The figure functions take the ``results`` dictionary that the command writes to
``results.json`` (a live dict or the loaded file), so a report can be redrawn from the file
alone. Each returns a ``matplotlib.figure.Figure`` and never calls ``plt.show()``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEMO_TABLE_HEADER",
    "accuracy_figure",
    "demo_figures",
    "demo_table_rows",
    "epoch_rotation_figure",
    "lca_curves_figure",
    "lca_figures",
    "rotation_curves_figure",
    "rotation_histories",
    "sweep_curves_figure",
    "sweep_figures",
    "sweep_heatmap_figure",
    "uniformity",
    "write_demo_report",
    "write_lca_report",
    "write_sweep_report",
]


def _plt():
    import matplotlib

    if "matplotlib.pyplot" not in __import__("sys").modules:
        matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
    import matplotlib.pyplot as plt

    return plt


def _depth_colors(n: int) -> list:
    """Viridis colours by depth, first layer darkest: those of :mod:`optax_layca.plot`."""
    from ..plot._common import depth_colors as _colors

    return _colors(n)


def _panels(n: int, ncols: int | None = None, size: float = 3.0):
    """A grid of ``n`` panels (at most 3 a row) sharing x and y; the spare cells hidden."""
    plt = _plt()
    ncols = ncols or min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(size * ncols + 1.0, size * nrows + 0.6),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _tidy_panels(fig, axes, title: str) -> None:
    """Axis labels on the outer panels only (shared axes), small titles (a long one broken
    before its last parenthesis), a figure title."""
    for ax in axes:
        ax.grid(alpha=0.3)
        head, sep, tail = ax.get_title().rpartition(" (")
        if sep and len(head) + len(tail) > 26:
            ax.set_title(f"{head}\n({tail}")
        ax.title.set_fontsize(9)
        if not ax.get_subplotspec().is_last_row():
            ax.set_xlabel("")
        if not ax.get_subplotspec().is_first_col():
            ax.set_ylabel("")
    fig.suptitle(title, fontsize=11)


def _cosine_history(steps: Sequence[int], values: Any, layers: Sequence[str]):
    """A :class:`~optax_layca.rotation.RotationHistory` of the cosine distance to init,
    ``values[t, l]`` of layer ``layers[l]`` recorded at ``steps[t]``."""
    from ..rotation import RotationHistory

    hist = RotationHistory()
    for step, row in zip(steps, np.asarray(values, np.float32)):
        hist.record(int(step), {"cosine_distance": dict(zip(layers, row))})
    return hist


def rotation_histories(results: dict[str, Any]) -> dict[str, Any]:
    """``{optimizer label: RotationHistory}`` of the cosine distance to init at every step.

    Rebuilt from ``results["optimizers"][k]["cosine_distance"]`` (``step``, ``values``) and
    ``results["layers"]`` with :meth:`optax_layca.rotation.RotationHistory.record`, so the
    figures of :mod:`optax_layca.plot` draw them (from a live run or ``results.json``).
    """
    return {
        run["label"]: _cosine_history(
            run["cosine_distance"]["step"], run["cosine_distance"]["values"], results["layers"]
        )
        for run in results["optimizers"].values()
    }


def rotation_curves_figure(results: dict[str, Any], *, log_x: bool = False):
    """Layer-wise angle deviation curves, one panel per optimizer, one line per layer.

    Draws :func:`optax_layca.plot.rotation_curves` over :func:`rotation_histories`. Requires
    ``results["optimizers"][k]["cosine_distance"]`` (``step``, ``values``), ``["final"]`` and
    ``results["layers"]``. x: epochs, y: cosine distance to the initial weights (Carbonnelle & De Vleeschouwer, 2019 §3.1).
    """
    from .. import plot

    runs = results["optimizers"].values()
    fig, axes = _panels(len(runs))
    plot.rotation_curves_figure(
        rotation_histories(results),
        ax=axes,
        x="epoch",
        steps_per_epoch=results.get("steps_per_epoch", 1),
        log_x=log_x,
        accuracies={r["label"]: r["final"]["test_acc"] for r in runs},
        layer_order=results["layers"],
        legend=False,
        colorbar=True,
    )
    _tidy_panels(fig, axes, "Layer rotation curves")
    return fig


def epoch_rotation_figure(results: dict[str, Any]):
    """Per-epoch rotation (cosine distance between the start and end of each epoch, Carbonnelle & De Vleeschouwer, 2019
    Fig. 10), one panel per optimizer, one line per layer, log y.

    Draws :func:`optax_layca.plot.epoch_rotation`. Requires
    ``results["optimizers"][k]["epoch_rotation"]`` (epochs × layers) and ``results["layers"]``.
    """
    from .. import plot

    layers = results["layers"]
    runs = {}
    for run in results["optimizers"].values():
        rot = np.asarray(run["epoch_rotation"], float).reshape(-1, len(layers))
        epochs = np.arange(1, len(rot) + 1)
        runs[run["label"]] = (epochs, {p: rot[:, l] for l, p in enumerate(layers)})
    fig, axes = _panels(len(runs))
    plot.epoch_rotation_figure(runs, ax=axes, layer_order=layers, legend=False, colorbar=True)
    _tidy_panels(fig, axes, "Per-epoch layer rotation")
    return fig


def _single_axes(fig, ax, xlabel: str, ylabel: str):
    """Finishes a one-axes figure: labels, light grid, small legend, tight layout."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def accuracy_figure(results: dict[str, Any]):
    """Train (dashed) and test (solid) accuracy per epoch, one line per optimizer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    cmap = plt.get_cmap("tab10")
    for i, run in enumerate(results["optimizers"].values()):
        te, tr = np.asarray(run["test_acc"], float), np.asarray(run["train_acc"], float)
        ep = np.arange(1, len(te) + 1)
        ax.plot(ep, te, color=cmap(i), label=run["label"])
        ax.plot(ep, tr, color=cmap(i), ls="--", lw=0.8)
    ax.set_title("Accuracy per epoch", fontsize=11)
    return _single_axes(fig, ax, "epoch", "accuracy (test solid, train dashed)")


def _save(fig, out: str, name: str) -> str:
    fig.savefig(os.path.join(out, name), dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return name


def demo_figures(results: dict[str, Any], out: str) -> list[str]:
    """Draws and saves the demo's figures under ``out``; returns their file names."""
    return [
        _save(rotation_curves_figure(results), out, "rotation_curves.png"),
        _save(epoch_rotation_figure(results), out, "epoch_rotation.png"),
        _save(accuracy_figure(results), out, "accuracy.png"),
    ]


def _write_markdown(path: str, parts: Sequence[str], *, footer: bool = False) -> None:
    """Writes the lines ``parts`` (ending with "All numbers are in `results.json`." if
    ``footer``)."""
    if footer:
        parts = [*parts, "All numbers are in `results.json`.", ""]
    with open(path, "w") as f:
        f.write("\n".join(parts))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def uniformity(values: Sequence[float]) -> float:
    """How uniform the layers' rotations are: ``min / max`` over layers (1 = all equal).

    Scale-free, so a run that rotates every layer more is not called more uniform for that
    alone (Carbonnelle & De Vleeschouwer, 2019 compares *relative* rotation rates across layers).

    Examples:
      >>> uniformity([0.2, 0.4])
      0.5
    """
    v = np.asarray(values, float)
    return float(v.min() / v.max()) if v.max() > 0 else 1.0


DEMO_TABLE_HEADER = ("optimizer", "train acc", "test acc", "cos min", "cos mean", "cos max")


def demo_table_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per optimizer under :data:`DEMO_TABLE_HEADER`: label, final train/test
    accuracy, min/mean/max over layers of the final cosine distance to init (3 decimals)."""
    keys = ("train_acc", "test_acc", "cos_min", "cos_mean", "cos_max")
    return [
        [r["label"], *(f"{r['final'][k]:.3f}" for k in keys)]
        for r in results["optimizers"].values()
    ]


def write_demo_report(results: dict[str, Any], path: str) -> None:
    """Writes the demo's ``report.md`` (table, figures, the papers' finding checked)."""
    cfg, ds = results["config"], results["dataset"]
    runs = results["optimizers"]
    rows = [
        [*row, ", ".join(f"{k}={v:g}" for k, v in r["hparams"].items())]
        for row, r in zip(demo_table_rows(results), runs.values())
    ]
    parts = [
        "# optax-layca demo report",
        "",
        (
            f"Dataset **{ds['name']}** ({ds['train']} train / {ds['test']} test, input "
            f"{tuple(ds['input_shape'])}, {ds['num_classes']} classes), model **{cfg['model']}** "
            f"({len(results['layers'])} layers: {', '.join(results['layers'])}), "
            f"{cfg['epochs']} epochs, batch size {cfg['batch_size']}, seed {cfg['seed']}; every "
            f"optimizer starts from the same initialisation and sees the same batches. Learning "
            f"rates are multiplied by {cfg['decay_factor']} at "
            f"{', '.join(f'{f:.0%}' for f in cfg['decay_at'])} of training."
        ),
        "",
        "## Final accuracy and layer rotation",
        "",
        (
            "Cosine distance between each layer's final and initial weights, over the layers "
            "(min / mean / max)."
        ),
        "",
        _md_table([*DEMO_TABLE_HEADER, "hyperparameters"], rows),
        "",
    ]
    if "sgd" in runs and "layca" in runs:
        s, l = runs["sgd"]["final"], runs["layca"]["final"]
        us = uniformity(runs["sgd"]["final_cosine_distance"])
        ul = uniformity(runs["layca"]["final_cosine_distance"])
        parts += [
            "## The papers' qualitative finding",
            "",
            (
                f"Layca rotates its least-rotated layer {'more' if l['cos_min'] > s['cos_max'] else 'not more'} "
                f"than SGD its most-rotated one (cosine distance {l['cos_min']:.3f} vs "
                f"{s['cos_max']:.3f}), and {'more' if ul > us else 'less'} uniformly across layers "
                f"(min / max over layers {ul:.2f} vs {us:.2f}). Carbonnelle & De Vleeschouwer, 2019 (§4–5) relates large, "
                "uniform layer rotation to good generalisation."
            ),
            "",
        ]
    parts += [
        "## Layer rotation curves",
        "",
        "One panel per optimizer, one line per layer (dark = first layer, yellow = last).",
        "",
        "![layer rotation curves](rotation_curves.png)",
        "",
        "## Per-epoch rotation",
        "",
        "![per-epoch rotation](epoch_rotation.png)",
        "",
        "## Accuracy",
        "",
        "![accuracy](accuracy.png)",
        "",
    ]
    _write_markdown(path, parts, footer=True)


# ----------------------------------------------------------------------------- sweep


def sweep_heatmap_figure(results: dict[str, Any]):
    """Test accuracy as a function of α (x) and ρ(0) = 3^k (y), Carbonnelle & De Vleeschouwer, 2019 Fig. 2a."""
    plt = _plt()
    ks, alphas = results["ks"], results["alphas"]
    acc = np.full((len(ks), len(alphas)), np.nan)
    for c in results["configs"]:
        acc[ks.index(c["k"]), alphas.index(c["alpha"])] = (
            np.nan if c["test_acc"] is None else c["test_acc"]
        )
    fig, ax = plt.subplots(figsize=(1.0 * len(alphas) + 2.2, 0.7 * len(ks) + 1.6))
    im = ax.imshow(acc, cmap="magma", origin="lower", aspect="auto")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(ks)), [f"$3^{{{k}}}$" for k in ks])
    ax.set_xlabel("α  (<0: first layers faster, >0: last layers faster)")
    ax.set_ylabel("ρ(0)")
    for i in range(len(ks)):
        for j in range(len(alphas)):
            if np.isfinite(acc[i, j]):
                ax.text(
                    j,
                    i,
                    f"{acc[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="w" if acc[i, j] < np.nanmean(acc) else "k",
                )
    fig.colorbar(im, ax=ax, label="test accuracy")
    ax.set_title("Layca: test accuracy vs layer rotation rates", fontsize=10)
    fig.tight_layout()
    return fig


def sweep_curves_figure(results: dict[str, Any]):
    """Layer rotation curves of every configuration (rows ρ(0), columns α), Carbonnelle & De Vleeschouwer, 2019 Fig. 2b.

    Draws :func:`optax_layca.plot.rotation_curves` (one panel per configuration) from
    ``results["configs"][i]["epoch_cosine_distance"]`` (epochs + 1 × layers); the number in
    each panel is its test accuracy.
    """
    from .. import plot

    ks, alphas, layers = results["ks"], results["alphas"], results["layers"]
    fig, grid = _plt().subplots(
        len(ks),
        len(alphas),
        figsize=(1.9 * len(alphas) + 1.6, 1.5 * len(ks) + 0.8),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    configs = results["configs"]
    axes = [grid[len(ks) - 1 - ks.index(c["k"]), alphas.index(c["alpha"])] for c in configs]
    histories = {}
    for c in configs:
        cd = c["epoch_cosine_distance"]
        histories[f"3^{c['k']}, {c['alpha']:g}"] = _cosine_history(range(len(cd)), cd, layers)
    plot.rotation_curves_figure(
        histories,
        ax=axes,
        x="epoch",
        steps_per_epoch=1,
        layer_order=layers,
        legend=False,
        colorbar=True,
    )
    for ax, c in zip(axes, configs):
        acc = c["test_acc"]
        ax.set(title="", xlabel="", ylabel="")
        ax.text(
            0.03,
            0.92,
            f"{acc:.2f}" if acc is not None else "nan",
            transform=ax.transAxes,
            fontsize=7,
            va="top",
        )
    for j, a in enumerate(alphas):
        grid[0, j].set_title(f"α={a:g}", fontsize=8)
        grid[-1, j].set_xlabel("epoch", fontsize=8)
    for i, k in enumerate(reversed(ks)):
        grid[i, 0].set_ylabel(f"ρ(0)=$3^{{{k}}}$", fontsize=8)
    fig.suptitle("Layer rotation curves (cosine distance to init; number = test acc)", fontsize=10)
    return fig


def sweep_figures(results: dict[str, Any], out: str) -> list[str]:
    """Draws and saves the sweep's figures under ``out``; returns their file names."""
    return [
        _save(sweep_heatmap_figure(results), out, "sweep_heatmap.png"),
        _save(sweep_curves_figure(results), out, "sweep_curves.png"),
    ]


def write_sweep_report(results: dict[str, Any], path: str) -> None:
    """Writes the sweep's ``report.md``."""
    cfg, ds = results["config"], results["dataset"]
    best = max(results["configs"], key=lambda c: -1 if c["test_acc"] is None else c["test_acc"])
    rows = [
        [f"3^{c['k']}", f"{c['alpha']:+g}", f"{c['train_acc']:.3f}", f"{c['test_acc']:.3f}"]
        for c in results["configs"]
    ]
    parts = [
        "# optax-layca sweep report",
        "",
        (
            f"Layca (SGD direction) on **{ds['name']}** / **{cfg['model']}**, {cfg['epochs']} epochs, "
            f"seed {cfg['seed']}: every configuration ρ(0) = 3^k × α trained from the same "
            "initialisation on the same batches, all configurations in one `jax.vmap`."
        ),
        "",
        (
            f"Best test accuracy {best['test_acc']:.3f} at ρ(0) = 3^{best['k']}, α = {best['alpha']:g}. "
            "Carbonnelle & De Vleeschouwer, 2019's rules of thumb: uniform rotation (α = 0) and ρ(0) as high as training "
            "allows."
        ),
        "",
        "![test accuracy heat map](sweep_heatmap.png)",
        "",
        "![rotation curve grid](sweep_curves.png)",
        "",
        _md_table(["ρ(0)", "α", "train acc", "test acc"], rows),
        "",
    ]
    _write_markdown(path, parts)


# ----------------------------------------------------------------------------- lca


def lca_curves_figure(history: Any, layers: Sequence[str]):
    """Cumulative LCA of each layer over iterations (one line per layer, coloured by depth),
    the layer's own "loss curve" (Lan et al., 2019 §4). Requires an ``LCAHistory``."""
    plt = _plt()
    from ..lca import cumulative_per_layer

    cum = cumulative_per_layer(history)
    colors = _depth_colors(len(layers))
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    it = np.arange(1, len(history) + 1)
    for l, name in enumerate(layers):
        ax.plot(it, cum[name], color=colors[l], label=name)
    ax.plot(
        it, np.cumsum(history.loss_change), color="k", ls="--", lw=1, label="measured loss change"
    )
    ax.axhline(0, color="gray", lw=0.6)
    return _single_axes(fig, ax, "iteration", "cumulative LCA (negative = helped)")


def lca_figures(history: Any, moments: Any, layers: Sequence[str], out: str) -> list[str]:
    """Draws and saves the LCA job's figures under ``out``; returns their file names.

    Uses :mod:`optax_layca.plot` (per-layer bars, helping fraction, moments raster) and
    :func:`lca_curves_figure`.
    """
    from .. import plot

    names = [_save(lca_curves_figure(history, layers), out, "lca_curves.png")]
    names.append(_save(plot.lca_per_layer_figure(history), out, "lca_per_layer.png"))
    if history.per_param is not None:
        names.append(_save(plot.helping_fraction_figure(history), out, "helping_fraction.png"))
    names.append(_save(plot.moments_raster_figure(moments, layer_names=layers), out, "moments_raster.png"))
    return names


def write_lca_report(results: dict[str, Any], error_table_md: str, path: str) -> None:
    """Writes the LCA job's ``report.md``."""
    cfg, ds = results["config"], results["dataset"]
    cum = results["cumulative_per_layer"]
    total = sum(float(v) for v in cum.values())
    rows = [
        [
            k,
            f"{float(v):+.5f}",
            f"{100 * float(v) / total:.1f}%" if total else "-",
            "hurt" if float(v) > 0 else "helped",
        ]
        for k, v in cum.items()
    ]
    hurting = [k for k, v in cum.items() if float(v) > 0]
    mom = results["moments"]
    summary = results["summary"][results["main_run"]]["rk4"]
    figs = results.get("figures", [])
    parts = [
        "# optax-layca LCA report",
        "",
        (
            f"Loss Change Allocation (Lan et al., 2019) of the first {cfg['iterations']} iterations "
            f"of **{results['main_run']}** on **{ds['name']}** ({ds['train']} training examples, "
            f"model **{cfg['model']}**, batch size {cfg['batch_size']}, seed {cfg['seed']}). Every "
            "step's loss change over the *whole* training set is split among the parameters with "
            f"RK4 / adaptive Simpson (tolerance {cfg['tol']:g} per iteration). Negative LCA = the "
            "parameter helped (lowered the loss), positive = it hurt."
        ),
        "",
        (
            f"Cumulative error {summary['cumulative_error_pct']:.3g}% of the total loss change "
            f"({summary['cumulative_loss_change']:+.4f}); {summary['num_unconverged']} iteration(s) "
            "did not reach the tolerance."
        ),
        "",
        "## Per-layer cumulative LCA",
        "",
        _md_table(["leaf", "cumulative LCA", "share of the total", ""], rows),
        "",
        (
            "Leaves that *hurt* overall: " + ", ".join(hurting) + "."
            if hurting
            else "Every leaf helped overall."
        ),
        "",
        "![cumulative LCA per layer](lca_curves.png)",
        "",
        "![LCA per leaf](lca_per_layer.png)",
        "",
    ]
    if "helping_fraction.png" in figs:
        parts += [
            "## Helping fraction",
            "",
            (
                f"On average {100 * results['helping_fraction_mean']:.1f}% of the parameters help "
                "in an iteration (Lan et al., 2019 §3: barely more than half)."
            ),
            "",
            "![helping fraction](helping_fraction.png)",
            "",
        ]
    parts += [
        "## First-order vs RK4 error (Lan et al., 2019 Table S1)",
        "",
        error_table_md,
        "",
        "## Moments of learning",
        "",
        (
            "Local minima of each class's per-layer LCA curve (kernels only; one block of rows "
            "per class, one row per layer, input first). "
            f"{mom['num_synchronized']} moments are synchronised across layers, against "
            f"{mom['baseline_mean']:.1f} when each layer is shifted by ±1–2 iterations "
            f"(p = {mom['p_value']:.3g})."
        ),
        "",
        "![moments of learning](moments_raster.png)",
        "",
    ]
    _write_markdown(path, parts, footer=True)
