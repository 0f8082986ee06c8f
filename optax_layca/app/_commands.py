"""The ``demo``, ``sweep`` and ``lca`` commands: training through :mod:`._train`, figures
through :mod:`optax_layca.plot`, records through :mod:`._report`. No measurement code here."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import _report
from ._train import Group, Run, RunResult, Task, TrainConfig, setup, train
from .cli import CLIError

__all__ = ["DEMO_OPTIMIZERS", "CommandError", "demo_groups", "run_demo", "run_lca", "run_sweep"]


class CommandError(CLIError):
    """A command failed in a way the user must hear about (one line, exit status 2), e.g. an
    optimizer diverged; what could be written has been written."""


# Learning rates: the best test accuracy of each optimizer on the 3^k grid after 30 epochs on
# MNIST-1D with the 6-layer MLP (seed 0); Layca, Adam + Layca and LARS at α = 0 as in the
# papers (Adam + Layca at the authors' 3^-5); the L2 penalty is the authors' 1e-3 (2e-3 · w
# on the gradient).
DEMO_OPTIMIZERS = {
    "sgd": ("SGD", "sgd", {"lr": 3.0**-1, "weight_decay": 0.0}),
    "sgd_wd": ("SGD + weight decay", "sgd", {"lr": 3.0**-1, "weight_decay": 2e-3}),
    "adam": ("Adam", "adam", {"lr": 3.0**-5}),
    "layca": ("Layca", "layca_sgd", {"rho": 3.0**-3, "alpha": 0.0}),
    "adam_layca": ("Adam + Layca", "layca_adam", {"rho": 3.0**-5, "alpha": 0.0}),
    "lars": ("LARS (papers' variant)", "lars_sgd", {"rho": 3.0**-3, "alpha": 0.0}),
}


def demo_groups(which: Sequence[str] | None = None) -> list[Group]:
    """The demo's optimizers, those sharing a builder in one vmapped group (SGD ± decay)."""
    from . import _train

    groups: dict[str, list[Run]] = {}
    for key, (label, builder, hp) in DEMO_OPTIMIZERS.items():
        if which is None or key in which:
            groups.setdefault(builder, []).append(Run(key, label, hp))
    return [
        Group(" / ".join(r.label for r in runs), getattr(_train, builder), tuple(runs))
        for builder, runs in groups.items()
    ]


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table on stdout (rich when installed, aligned plain text otherwise)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in the demo extra
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        print(title)
        for r in [header, *rows]:
            print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))
        return
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(file=sys.stdout, width=max(100, len(" | ".join(header)) + 20)).print(table)


def save_histories(results: Mapping[str, RunResult], out: str, folder: str = "runs") -> dict:
    """Saves every run's RotationHistory (one ``.npz`` per run) under ``out/folder``."""
    os.makedirs(os.path.join(out, folder), exist_ok=True)
    saved = {}
    for key, res in results.items():
        info = _report.save_history(res.history, os.path.join(out, folder, f"{key}.rotation.npz"))
        saved[key] = {**info, "file": f"{folder}/{info['file']}"}
    return saved


def runs_record(results: Mapping[str, RunResult], order: Sequence[str]) -> dict[str, Any]:
    """JSON-ready per-run numbers (the curves themselves are in the history files)."""
    return {
        key: {
            "label": r.run.label,
            "hparams": dict(r.run.hparams),
            "diverged_at": r.diverged_at,
            "final": r.final(order),
            "final_cosine_distance": dict(zip(order, r.final_cosine_distance(order))),
            "epoch_loss": r.epoch_loss,
            "eval_epochs": r.eval_epochs,
            "train_acc": r.train_acc,
            "test_acc": r.test_acc,
            "seconds": r.seconds,
        }
        for key, r in results.items()
    }


def check_diverged(results: Mapping[str, RunResult], out: str) -> None:
    """Raises :class:`CommandError` naming every run whose loss became non-finite."""
    bad = [f"{r.run.label} (epoch {r.diverged_at})" for r in results.values() if r.diverged_at]
    if bad:
        raise CommandError(
            f"diverged (non-finite training loss): {', '.join(bad)}; the other runs' results "
            f"and figures are in {out}"
        )


# ----------------------------------------------------------------------------- demo


def demo_figures(task: Task, results: Mapping[str, RunResult], out: str) -> list[str]:
    """Rotation curves, per-epoch rotation and accuracy per epoch, saved under ``out``."""
    from .. import plot
    from ._figures import histories_panels

    hists = {r.run.label: r.history for r in results.values()}
    accs = {r.run.label: float(r.test_acc[-1]) for r in results.values()}
    spe, order = task.steps_per_epoch, task.order
    names = [
        _report.save_figure(
            histories_panels(
                "curves",
                hists,
                order,
                title="Layer rotation curves",
                steps_per_epoch=spe,
                accuracies=accs,
            ),
            os.path.join(out, "rotation_curves.png"),
        ),
        _report.save_figure(
            histories_panels("epoch", hists, order, title="Rotation per epoch"),
            os.path.join(out, "epoch_rotation.png"),
        ),
    ]
    test = {r.run.label: (r.eval_epochs, r.test_acc) for r in results.values()}
    train = {r.run.label: (r.eval_epochs, r.train_acc) for r in results.values()}
    fig = plot.training_curves_figure(
        test,
        dashed=train,
        colors="tab10",
        ylabel="accuracy (test solid, train dashed)",
        title="Accuracy per epoch",
    )
    names.append(_report.save_figure(fig, os.path.join(out, "accuracy.png")))
    return names


DEMO_HEADER = ("optimizer", "train acc", "test acc", "cos min", "cos mean", "cos max")


def demo_rows(runs: Mapping[str, Any]) -> list[list[str]]:
    """One row per run under :data:`DEMO_HEADER` (3 decimals; "div." after divergence)."""
    keys = ("train_acc", "test_acc", "cos_min", "cos_mean", "cos_max")
    fmt = lambda v: f"{v:.3f}" if v is not None and math.isfinite(v) else "div."
    return [[r["label"], *(fmt(r["final"][k]) for k in keys)] for r in runs.values()]


def demo_report(record: Mapping[str, Any]) -> str:
    """The demo's ``report.md``."""
    ident, runs = record["identity"], record["runs"]
    cfg, ds = ident["config"], ident["dataset"]
    rows = [
        [*row, ", ".join(f"{k}={v:.4g}" for k, v in r["hparams"].items())]
        for row, r in zip(demo_rows(runs), runs.values())
    ]
    lines = [
        "# optax-layca demo report",
        "",
        f"Dataset **{ds['name']}** ({ds['train']} train / {ds['test']} test, input "
        f"{tuple(ds['input_shape'])}, {ds['num_classes']} classes, fingerprint "
        f"`{ds['fingerprint'][:12]}`), model **{cfg['model']}** ({len(ident['layers'])} layers), "
        f"{cfg['epochs']} epochs, batch size {cfg['batch_size']}, seed {cfg['seed']}; every "
        "optimizer starts from the same initialisation and sees the same batches. Learning "
        f"rates are multiplied by {cfg['decay_factor']} at "
        f"{', '.join(f'{f:.0%}' for f in cfg['decay_at'])} of training.",
        "",
        "Cosine distance between each layer's final and initial weights, over the layers "
        "(min / mean / max):",
        "",
        _report.md_table([*DEMO_HEADER, "hyperparameters"], rows),
        "",
        "![layer rotation curves](rotation_curves.png)",
        "",
        "![rotation per epoch](epoch_rotation.png)",
        "",
        "![accuracy](accuracy.png)",
        "",
        "Numbers: `results.json`; rotation histories (`RotationHistory.load`): `runs/`.",
        "",
    ]
    return "\n".join(lines)


def run_demo(
    config: TrainConfig, out: str, *, progress: bool = True, which: Sequence[str] | None = None
) -> dict[str, Any]:
    """Trains the same initialisation with every demo optimizer; writes ``report.md``,
    ``results.json``, the figures and ``runs/*.rotation.npz`` under ``out``."""
    t0 = time.perf_counter()
    _report.check_writable(out)
    task = setup(config)
    results = train(task, demo_groups(which), progress=progress)
    record = {
        "identity": _report.run_identity("demo", config, task),
        "runs": runs_record(results, task.order),
        "histories": save_histories(results, out),
        "figures": demo_figures(task, results, out),
    }
    record["timings"] = {"total_s": time.perf_counter() - t0}
    _report.write_json(os.path.join(out, "results.json"), record)
    _report.write_text(os.path.join(out, "report.md"), demo_report(record))
    print_table(
        f"{task.data.name} / {config.model}, {config.epochs} epochs, seed {config.seed}: final "
        "cosine distance to init per layer",
        DEMO_HEADER,
        demo_rows(record["runs"]),
    )
    print(
        f"wrote {out}/report.md, results.json, {len(record['figures'])} figures and runs/ "
        f"in {record['timings']['total_s']:.1f} s"
    )
    check_diverged(results, out)
    return record


# ----------------------------------------------------------------------------- sweep


def run_sweep(
    config: TrainConfig,
    out: str,
    *,
    ks: Sequence[int],
    alphas: Sequence[float],
    progress: bool = True,
) -> dict[str, Any]:
    """Layca over ``ρ(0) = 3^k × α`` in one vmapped group; writes ``sweep.png`` (Fig. 2a, 2b
    and 3 of the grid, as ``reproduce rotation-grid``), ``report.md``, ``results.json``."""
    from ._experiments import _rotation_grid as grid

    t0 = time.perf_counter()
    _report.check_writable(out)
    task = setup(config)
    results = train(task, [grid.grid_group(ks, alphas)], progress=progress)
    record = grid.grid_results(task, results, ks, alphas)
    record["identity"] = _report.run_identity("sweep", config, task)
    figure = _report.save_figure(grid.figure(record), os.path.join(out, "sweep.png"))
    record.update(
        histories=save_histories(results, out),
        figures=[figure],
        timings={"total_s": time.perf_counter() - t0},
    )
    table = grid.grid_table(record)
    _report.write_json(os.path.join(out, "results.json"), record)
    _report.write_text(
        os.path.join(out, "report.md"),
        f"# optax-layca sweep report\n\nLayca (SGD direction) on {task.data.name} / "
        f"{config.model}, {config.epochs} epochs, seed {config.seed}, every configuration from "
        f"the same initialisation in one `jax.vmap`.\n\n{table}\n\n![sweep]({figure})\n",
    )
    print(table)
    print(f"wrote {out}/report.md, results.json, {figure} in {time.perf_counter() - t0:.1f} s")
    return record


# ----------------------------------------------------------------------------- lca


def _sgd_momentum(task: Task, hp: Mapping[str, Any]):
    import optax

    return optax.sgd(hp["lr"], momentum=0.9)


def _adam_constant(task: Task, hp: Mapping[str, Any]):
    import optax

    return optax.adam(hp["lr"])


def lca_groups(lr: float, adam_lr: float = 0.002) -> list[Group]:
    """Lan et al., 2019's MNIST-FC settings: SGD (momentum 0.9) and Adam, constant rates."""
    return [
        Group("SGD", _sgd_momentum, (Run("sgd", f"SGD (momentum 0.9, lr {lr:g})", {"lr": lr}),)),
        Group("Adam", _adam_constant, (Run("adam", f"Adam (lr {adam_lr:g})", {"lr": adam_lr}),)),
    ]


def _lca_recorders(
    task: Task, groups: Sequence[Group], tol: float, per_class: bool
) -> dict[str, dict]:
    """Per run: an RK4 recorder (per-parameter LCA for the first run) and a first-order one,
    both over the whole training set (per class too if ``per_class``), started at the shared
    initialisation."""
    import optax

    from .. import lca

    def per_example(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(task.apply(params, x), y)

    data = (task.data.x_train, task.data.y_train)
    labels = task.data.y_train if per_class else None
    evaluator = lca.Evaluator(per_example, data, labels=labels)
    first = groups[0].runs[0].key
    recorders = {}
    for run in (r for g in groups for r in g.runs):
        recorders[run.key] = {
            "rk4": lca.LCARecorder(
                per_example, evaluator, method="rk4", tol=tol, store_per_param=run.key == first
            ),
            "first_order": lca.LCARecorder(per_example, evaluator, method="first_order"),
        }
        for r in recorders[run.key].values():
            r.start(task.params0)
    return recorders


def lca_layers(task: Task) -> list[str]:
    """The LCA "layers" (modules, Lan et al., 2019 §4) of the task's layers, in forward order."""
    from .._layers import module_path

    return list(dict.fromkeys(module_path(p) for p in task.order))


def lca_analysis(task: Task, runs: Mapping[str, Any], iters: int) -> tuple[dict, Any, Any, str]:
    """Per-layer cumulative LCA, helping fraction, moments of learning and the error table
    (Lan et al., 2019 §3–4, Table S1) of the first run; ``(numbers, history, moments, table)``."""
    from .. import lca

    main = next(iter(runs))
    h = runs[main]["rk4"]
    cum = lca.cumulative_per_layer(h)
    fractions = lca.helping_fraction(h)
    # moments per class and per layer (module: a bias moves with its kernel), forward order
    kidx = [h.layer_names.index(m) for m in lca_layers(task)]
    curves = h.per_class[:, :, kidx] if h.per_class is not None else h.per_layer[:, kidx]
    moments = lca.moments_of_learning(
        curves, k=max(3, iters // 10), num_shuffles=100, seed=task.config.seed
    )
    rows, table = lca.error_table(
        {runs[k]["label"]: {m: runs[k][m] for m in ("rk4", "first_order")} for k in runs}
    )
    numbers = {
        "main_run": runs[main]["label"],
        "layers": list(h.layer_names),
        "per_layer": h.per_layer,
        "loss_change": h.loss_change,
        "cumulative_per_layer": {k: v[-1] for k, v in cum.items()},
        "helping_fraction": {"helping": fractions.helping, "hurting": fractions.hurting},
        "helping_fraction_mean": float(np.mean(fractions.helping)),
        "moments": {
            "num_synchronized": moments.num_synchronized,
            "baseline_mean": float(np.mean(moments.baseline)),
            "p_value": moments.p_value,
        },
        "error_table": [r._asdict() for r in rows],
        "summary": {
            runs[k]["label"]: {m: runs[k][m].summary() for m in ("rk4", "first_order")}
            for k in runs
        },
    }
    return numbers, h, moments, table


def lca_figures(task: Task, history: Any, moments: Any, out: str) -> list[str]:
    """Cumulative LCA per layer (with the measured loss change), LCA per leaf, helping
    fraction and the moments raster, all from :mod:`optax_layca.plot`."""
    from .. import lca, plot

    cum = lca.cumulative_per_layer(history)
    it = np.arange(1, len(history) + 1)
    fig = plot.training_curves_figure(
        {m: (it, cum[m]) for m in lca_layers(task)},
        xlabel="iteration",
        ylabel="cumulative LCA (negative = helped)",
        title="Cumulative LCA per layer",
    )
    plot.training_curves_figure(
        {"measured loss change": (it, np.cumsum(history.loss_change))},
        ax=fig.axes[0],
        colors=["k"],
        xlabel="iteration",
        ylabel="cumulative LCA (negative = helped)",
    )
    save = lambda f, name: _report.save_figure(f, os.path.join(out, name))
    names = [
        save(fig, "lca_curves.png"),
        save(plot.lca_per_layer_figure(history, layers=lca_layers(task)), "lca_per_layer.png"),
    ]
    if history.per_param is not None:
        names.append(save(plot.helping_fraction_figure(history), "helping_fraction.png"))
    names.append(
        save(
            plot.moments_raster_figure(moments, layer_names=lca_layers(task)), "moments_raster.png"
        )
    )
    return names


def run_lca(
    config: TrainConfig,
    out: str,
    *,
    lr: float,
    iters: int | None,
    progress: bool = True,
    tol: float = 1e-3,
    per_class: bool = True,
) -> dict[str, Any]:
    """Loss Change Allocation of the first ``iters`` iterations (None: ``config.epochs``
    whole epochs) of SGD (momentum) and Adam from the same initialisation (Lan et al., 2019):
    every step allocated over the whole training set with RK4 (tolerance ``tol``) and to
    first order. ``per_class=False`` skips the per-class allocation (about ten times less
    work; the moments of learning are then found per layer only)."""
    t0 = time.perf_counter()
    _report.check_writable(out)
    task = setup(config)
    if iters is not None:  # just enough epochs to cover ``iters`` steps
        epochs = -(-iters // task.steps_per_epoch)
        task = dataclasses.replace(task, config=dataclasses.replace(config, epochs=epochs))
    iters = min(iters or task.total_steps, task.total_steps)
    config = task.config
    groups = lca_groups(lr)
    recorders = _lca_recorders(task, groups, tol, per_class)

    def on_step(run: Run, step: int, params: Any) -> None:
        for r in recorders[run.key].values():
            r(params)

    results = train(task, groups, progress=progress, on_step=on_step, max_steps=iters)
    runs = {
        g.runs[0].key: {
            "label": g.runs[0].label,
            **{m: r.history() for m, r in recorders[g.runs[0].key].items()},
        }
        for g in groups
    }
    numbers, history, moments, table = lca_analysis(task, runs, iters)
    record = {
        "identity": _report.run_identity(
            "lca", config, task, lr=lr, iterations=iters, tol=tol, per_class=per_class
        ),
        **numbers,
        "histories": save_histories(results, out),
        "figures": lca_figures(task, history, moments, out),
        "timings": {"total_s": time.perf_counter() - t0},
    }
    _report.write_json(os.path.join(out, "results.json"), record)
    _report.write_text(os.path.join(out, "report.md"), lca_report(record, table))
    print(table)
    print(f"helping fraction (mean over iterations): {record['helping_fraction_mean']:.3f}")
    print(f"wrote {out}/report.md, results.json in {record['timings']['total_s']:.1f} s")
    check_diverged(results, out)
    return record


def lca_report(record: Mapping[str, Any], error_table: str) -> str:
    """The LCA command's ``report.md``."""
    ident = record["identity"]
    cfg, ds = ident["config"], ident["dataset"]
    cum = record["cumulative_per_layer"]
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
    summary = record["summary"][record["main_run"]]["rk4"]
    figures = record["figures"]
    lines = [
        "# optax-layca LCA report",
        "",
        f"Loss Change Allocation (Lan et al., 2019) of the first {ident['iterations']} "
        f"iterations of **{record['main_run']}** on **{ds['name']}** ({ds['train']} training "
        f"examples, model **{cfg['model']}**, batch size {cfg['batch_size']}, seed {cfg['seed']}). "
        "Every step's loss change over the whole training set is split among the parameters "
        f"with RK4 / adaptive Simpson (tolerance {ident['tol']:g}). Negative LCA = helped.",
        "",
        f"Cumulative error {summary['cumulative_error_pct']:.3g}% of the total loss change; "
        f"{summary['num_unconverged']} iteration(s) did not reach the tolerance.",
        "",
        _report.md_table(["layer", "cumulative LCA", "share of the total", ""], rows),
        "",
        *(f"![{name[:-4]}]({name})\n" for name in figures),
        "## First-order vs RK4 error (Lan et al., 2019 Table S1)",
        "",
        error_table,
        "",
        f"Helping fraction (mean over iterations): {record['helping_fraction_mean']:.3f}. "
        f"Moments of learning synchronised across layers: "
        f"{record['moments']['num_synchronized']} (shifted baseline "
        f"{record['moments']['baseline_mean']:.1f}, p = {record['moments']['p_value']:.3g}).",
        "",
    ]
    return "\n".join(lines)
