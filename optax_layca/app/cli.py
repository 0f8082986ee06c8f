"""The ``optax-layca`` command (also ``python -m optax_layca``): the library's main job.

Subcommands (``demo`` is the default when none is given)::

  optax-layca demo   [--dataset digits] [--model fc] [--epochs N] [--seed S] [--out DIR] [--quick]
  optax-layca sweep  ...   # rho(0) on the 3^k grid x alpha, vmapped over configurations
  optax-layca lca    ...   # Loss Change Allocation report of one training run

``demo`` trains one initialisation with SGD, SGD + weight decay, Adam, Layca (α = 0, high ρ),
Adam + Layca and the papers' LARS, prints a table (final train/test accuracy, final cosine
distance to the initialisation per layer: min/mean/max) and writes, under ``--out``
(default ``./optax_layca_out/``): ``rotation_curves.png`` (layer-wise angle deviation curves,
one panel per optimizer, one line per layer coloured by depth), ``epoch_rotation.png``,
``accuracy.png``, ``report.md`` embedding them, and ``results.json`` (every number of the
figures; ``timings`` is the only key that varies between runs with the same seed).

``sweep`` trains Layca (SGD direction) for every ``ρ(0) = 3^k`` (``--ks=-5,-4,-3,-2,-1``) and
``α`` (``--alphas=-0.8,-0.4,0,0.4,0.8``) in one ``jax.vmap``-ed, jitted run (same init, same
batches) and writes ``sweep_heatmap.png`` (test accuracy, Carbonnelle & De Vleeschouwer, 2019 Fig. 2a),
``sweep_curves.png`` (rotation curve grid, Fig. 2b), ``report.md`` and ``results.json``.

``lca`` trains the same initialisation with SGD (momentum 0.9, ``--lr``) and Adam for
``--iters`` iterations and allocates every step over the whole training set with
:mod:`optax_layca.lca` (RK4 and first order); it writes ``lca_curves.png`` (per-layer
cumulative LCA), ``lca_per_layer.png``, ``helping_fraction.png``, ``moments_raster.png``,
``report.md`` (with the first-order vs RK4 error table) and ``results.json``.

Training is one jitted ``lax.scan`` per epoch; batches come from
:func:`optax_layca.data.epoch_batches` (seeded, the last partial batch padded and masked, never
dropped). Progress bars (tqdm) go to stderr; ``--no-progress`` turns them off.

Bad flags, unknown datasets, unreadable ``.npz`` files, invalid values and unusable ``--out``
folders print one line ``optax-layca: error: …`` on stderr and return exit status 2, before
any training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..data import DataError

__all__ = ["CLIError", "build_parser", "main"]

PROG = "optax-layca"
DEFAULT_OUT = "optax_layca_out"


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise :class:`CLIError` (one line, no usage dump)."""

    def error(self, message: str):
        raise CLIError(message)


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines one training run (recorded in ``results.json``)."""

    dataset: str = "digits"
    model: str = "fc"
    epochs: int = 40
    batch_size: int = 32
    seed: int = 0
    num_train: int | None = None  # subset of the training set (quick runs)
    num_test: int | None = None
    decay_at: tuple[float, ...] = (0.7, 0.9)  # fractions of training; x decay_factor each
    decay_factor: float = 0.2


def _step_decay(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[Any], Any]:
    """Multiplier schedule ×``decay_factor`` at each fraction of training in ``decay_at``."""
    import optax

    total = cfg.epochs * steps_per_epoch
    bounds = {round(f * total): cfg.decay_factor for f in cfg.decay_at if 0 < f < 1}
    return optax.piecewise_constant_schedule(1.0, bounds)


DEMO_OPTIMIZERS = ("sgd", "sgd_wd", "adam", "layca", "adam_layca", "lars")


def demo_optimizers(
    order: Sequence[str],
    scale: Callable[[Any], Any],
    *,
    rho: float = 3.0**-3,
    sgd_lr: float = 0.1,
    weight_decay: float = 5e-3,
    adam_lr: float = 3.0**-6,
) -> dict[str, tuple[str, Any, dict[str, float]]]:
    """The optimizers the demo compares: ``{key: (label, GradientTransformation, hparams)}``.

    ``scale(step)`` multiplies every learning rate (the step-decay schedule). Layca, Adam +
    Layca and LARS use the same high, uniform rate ``ρ = 3^-3`` (α = 0) as Carbonnelle & De Vleeschouwer, 2019 §4.
    """
    import optax

    from .. import lars, layca

    sched = lambda base_lr: lambda step: base_lr * scale(step)
    return {
        "sgd": ("SGD", optax.sgd(sched(sgd_lr)), {"lr": sgd_lr}),
        "sgd_wd": (
            "SGD + weight decay",
            optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(sched(sgd_lr))),
            {"lr": sgd_lr, "weight_decay": weight_decay},
        ),
        "adam": ("Adam", optax.adam(sched(adam_lr)), {"lr": adam_lr}),
        "layca": (
            "Layca",
            layca(sched(rho), alpha=0.0, layer_order=order),
            {"rho": rho, "alpha": 0.0},
        ),
        "adam_layca": (
            "Adam + Layca",
            layca(sched(rho), base=optax.scale_by_adam(), alpha=0.0, layer_order=order),
            {"rho": rho, "alpha": 0.0},
        ),
        "lars": (
            "LARS (papers' variant)",
            lars(sched(rho), alpha=0.0, layer_order=order),
            {"rho": rho, "alpha": 0.0},
        ),
    }


# ----------------------------------------------------------------------------- training engine


def _flat_layers(params: Any, order: Sequence[str]) -> list[Any]:
    import jax.tree_util as jtu

    from .. import path_str

    flat = {path_str(p): x for p, x in jtu.tree_flatten_with_path(params)[0]}
    return [flat[p] for p in order]


def cosine_distances(params: Any, reference: Any, order: Sequence[str]):
    """``1 − cos(w_l, w_l^ref)`` for every layer in ``order``, a float32 vector (jit-friendly).

    Uses :func:`optax_layca.rotation.layer_rotation` (accurate for tiny rotations).
    """
    import jax.numpy as jnp

    from ..rotation import layer_rotation

    rot = layer_rotation(params, reference, is_layer=list(order))
    return jnp.stack([jnp.asarray(rot[p], jnp.float32).reshape(()) for p in order])


def _loss_fn(apply: Callable, params, x, y, mask):
    import jax.numpy as jnp
    import optax

    logits = apply(params, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    m = mask.astype(ce.dtype)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def _make_evaluate(apply: Callable, chunk: int = 1024):
    """``evaluate(params, x, y) -> (mean loss, accuracy)`` over all samples, jitted, in chunks
    of fixed size (the last one padded and masked)."""
    import jax
    import jax.numpy as jnp
    import optax

    def evaluate(params, x, y):
        n = x.shape[0]
        size = min(chunk, n)
        nb = -(-n // size)
        pad = nb * size - n
        xp = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(
            nb, size, *x.shape[1:]
        )
        yp = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)]).reshape(nb, size)
        mp = (jnp.arange(nb * size) < n).reshape(nb, size)

        def one(args):
            xb, yb, mb = args
            logits = apply(params, xb)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            ok = jnp.argmax(logits, -1) == yb
            return jnp.sum(ce * mb), jnp.sum(ok * mb)

        ce, ok = jax.lax.map(one, (xp, yp, mp))
        return jnp.sum(ce) / n, jnp.sum(ok) / n

    return jax.jit(evaluate)


def make_epoch_fn(apply: Callable, tx, order: Sequence[str]):
    """Jitted ``epoch(params, opt_state, params0, x, y, idx, mask)``: one ``lax.scan`` over
    the epoch's batches. Returns the new ``(params, opt_state)``, the per-step training losses
    ``(B,)`` and per-step cosine distances to ``params0`` ``(B, L)``."""
    import jax
    import optax

    grad_fn = jax.value_and_grad(lambda p, xb, yb, mb: _loss_fn(apply, p, xb, yb, mb))

    def epoch(params, opt_state, params0, x, y, idx, mask):
        def step(carry, batch):
            p, s = carry
            i, m = batch
            loss, g = grad_fn(p, x[i], y[i], m)
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), (loss, cosine_distances(p, params0, order))

        (params, opt_state), (losses, cds) = jax.lax.scan(step, (params, opt_state), (idx, mask))
        return params, opt_state, losses, cds

    return jax.jit(epoch)


@dataclasses.dataclass
class RunRecord:
    """What one optimizer's run leaves behind (numpy, host side)."""

    label: str
    hparams: dict[str, float]
    steps: np.ndarray  # (T+1,) step index of every cosine-distance sample, 0 = init
    cosine_distance: np.ndarray  # (T+1, L)
    epoch_rotation: np.ndarray  # (E, L): cosine distance between start and end of each epoch
    train_loss: np.ndarray  # (E,) mean over the epoch's steps
    train_acc: np.ndarray  # (E,) full training set, end of epoch
    test_acc: np.ndarray  # (E,)
    weight_norm: np.ndarray  # (E+1, L)
    seconds: float = 0.0

    def final(self) -> dict[str, float]:
        cd = self.cosine_distance[-1]
        return {
            "train_acc": float(self.train_acc[-1]) if len(self.train_acc) else math.nan,
            "test_acc": float(self.test_acc[-1]) if len(self.test_acc) else math.nan,
            "cos_min": float(cd.min()),
            "cos_mean": float(cd.mean()),
            "cos_max": float(cd.max()),
        }


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (a no-op object when disabled or tqdm is missing)."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass

    return _Null()


def train_run(
    apply: Callable,
    tx,
    params0: Any,
    order: Sequence[str],
    data,
    cfg: TrainConfig,
    *,
    label: str = "",
    hparams: dict | None = None,
    progress: bool = False,
    callback: Callable[[int, Any], None] | None = None,
) -> tuple[Any, RunRecord]:
    """Trains ``params0`` with ``tx`` for ``cfg.epochs`` epochs; returns final params and record.

    The batch order depends only on ``cfg.seed`` and the epoch, so every optimizer sees the
    same batches. ``callback(epoch, params)`` is called after each epoch (and with epoch 0 at
    the start).
    """
    import jax
    import jax.numpy as jnp

    from ..data import epoch_batches

    t0 = time.perf_counter()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    epoch_fn = make_epoch_fn(apply, tx, order)
    evaluate = _make_evaluate(apply)
    params, opt_state = params0, tx.init(params0)
    norms = lambda p: np.asarray([float(jnp.linalg.norm(w)) for w in _flat_layers(p, order)])
    cds, losses, tr_acc, te_acc, ep_rot, wn = (
        [np.zeros((1, len(order)), np.float32)],
        [],
        [],
        [],
        [],
        [norms(params)],
    )
    if callback is not None:
        callback(0, params)
    bar = _progress(cfg.epochs, label, progress)
    for e in range(cfg.epochs):
        idx, mask = epoch_batches(len(data.x_train), cfg.batch_size, cfg.seed, e)
        start = params
        params, opt_state, loss, cd = epoch_fn(params, opt_state, params0, x, y, idx, mask)
        _, acc = evaluate(params, x, y)
        _, tacc = evaluate(params, xt, yt)
        cds.append(np.asarray(cd))
        losses.append(float(np.mean(np.asarray(loss))))
        tr_acc.append(float(acc))
        te_acc.append(float(tacc))
        ep_rot.append(np.asarray(cosine_distances(params, start, order)))
        wn.append(norms(params))
        if callback is not None:
            callback(e + 1, params)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", test=f"{te_acc[-1]:.3f}")
    bar.close()
    cd_all = np.concatenate(cds, 0)
    rec = RunRecord(
        label=label,
        hparams=dict(hparams or {}),
        steps=np.arange(len(cd_all)),
        cosine_distance=cd_all,
        epoch_rotation=np.asarray(ep_rot).reshape(-1, len(order)),
        train_loss=np.asarray(losses),
        train_acc=np.asarray(tr_acc),
        test_acc=np.asarray(te_acc),
        weight_norm=np.asarray(wn),
        seconds=time.perf_counter() - t0,
    )
    jax.block_until_ready(params)
    return params, rec


# ----------------------------------------------------------------------------- shared setup


def _load(cfg: TrainConfig):
    from ..data import load_dataset

    data = load_dataset(cfg.dataset, seed=cfg.seed)
    if cfg.num_train or cfg.num_test:
        data = data.subset(cfg.num_train, cfg.num_test)
    return data


def _setup(cfg: TrainConfig):
    """Dataset, model, initial params, apply function and layer forward order."""
    import jax.numpy as jnp

    from .. import forward_order
    from ..models import apply_fn, get_model, init_params

    if cfg.epochs < 1:  # the parser rejects --epochs < 1; this guards direct calls
        raise CLIError(f"--epochs (TrainConfig.epochs) must be >= 1; got {cfg.epochs}")
    data = _load(cfg)
    model = get_model(cfg.model, num_classes=data.num_classes)
    params0 = init_params(model, data.input_shape, cfg.seed)
    apply = apply_fn(model)
    order = forward_order(apply, params0, jnp.zeros((1, *data.input_shape), jnp.float32))
    return data, model, params0, apply, order


def _prepare_out(out: str) -> None:
    """Creates the output folder up front, so a bad ``--out`` fails before any training."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create output folder {out!r}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK):
        raise CLIError(f"output folder {out!r} is not writable")


def _dataset_info(data) -> dict[str, Any]:
    return {
        "name": data.name,
        "train": len(data.x_train),
        "test": len(data.x_test),
        "input_shape": list(data.input_shape),
        "num_classes": int(data.num_classes),
    }


def _r(x: Any, digits: int = 6) -> Any:
    """Rounds floats (recursively, numpy included) for a compact, stable JSON file."""
    if isinstance(x, dict):
        return {k: _r(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_r(v, digits) for v in x]
    if isinstance(x, np.ndarray):
        return _r(x.tolist(), digits)
    if isinstance(x, (float, np.floating)):
        return round(float(x), digits) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(_r(obj), f, indent=1)
        f.write("\n")


def _write_outputs(
    out: str,
    results: dict[str, Any],
    figures: list[str],
    write_report: Callable[[dict[str, Any], str], None],
    t_start: float,
    **timings: float,
) -> None:
    """Adds ``figures`` and ``timings`` (``total_s`` since ``t_start``, then ``timings``) to
    ``results``; writes ``results.json`` and, with ``write_report(results, path)``,
    ``report.md`` under ``out``."""
    results["figures"] = figures
    results["timings"] = {"total_s": time.perf_counter() - t_start, **timings}
    _write_json(os.path.join(out, "results.json"), results)
    write_report(results, os.path.join(out, "report.md"))


def _print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Prints a table to stdout (rich when available, plain text otherwise)."""
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        Console(file=sys.stdout, width=max(100, len(" | ".join(header)) + 20)).print(table)
        return
    except ImportError:  # pragma: no cover
        pass
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(title)
    for r in [header, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


# ----------------------------------------------------------------------------- demo


def run_demo(
    cfg: TrainConfig, out: str, *, progress: bool = True, which: Sequence[str] | None = None
) -> dict[str, Any]:
    """The main job: trains the same initialisation with every demo optimizer, writes figures,
    ``report.md`` and ``results.json`` under ``out``; returns the results dictionary."""
    from . import _report

    t_start = time.perf_counter()
    _prepare_out(out)
    data, _model, params0, apply, order = _setup(cfg)
    steps_per_epoch = -(-len(data.x_train) // min(cfg.batch_size, len(data.x_train)))
    opts = demo_optimizers(order, _step_decay(cfg, steps_per_epoch))
    if which:
        opts = {k: v for k, v in opts.items() if k in which}
    records: dict[str, RunRecord] = {}
    for key, (label, tx, hp) in opts.items():
        _, records[key] = train_run(
            apply, tx, params0, order, data, cfg, label=label, hparams=hp, progress=progress
        )
    results = {
        "command": "demo",
        "config": dataclasses.asdict(cfg),
        "dataset": _dataset_info(data),
        "layers": list(order),
        "steps_per_epoch": steps_per_epoch,
        "optimizers": {k: _record_json(r) for k, r in records.items()},
    }
    figures = _report.demo_figures(results, out)
    _write_outputs(
        out,
        results,
        figures,
        _report.write_demo_report,
        t_start,
        **{k: r.seconds for k, r in records.items()},
    )
    _print_table(
        f"{data.name} / {cfg.model}, {cfg.epochs} epochs, seed {cfg.seed}: final cosine distance "
        "to init per layer",
        _report.DEMO_TABLE_HEADER,
        _report.demo_table_rows(results),
    )
    print(
        f"wrote {out}/report.md, results.json and {len(figures)} figures "
        f"in {results['timings']['total_s']:.1f} s"
    )
    return results


def _record_json(r: RunRecord) -> dict[str, Any]:
    return {
        "label": r.label,
        "hparams": r.hparams,
        "final": r.final(),
        "final_cosine_distance": r.cosine_distance[-1],
        "cosine_distance": {"step": r.steps, "values": r.cosine_distance},
        "epoch_rotation": r.epoch_rotation,
        "weight_norm": r.weight_norm,
        "train_loss": r.train_loss,
        "train_acc": r.train_acc,
        "test_acc": r.test_acc,
    }


# ----------------------------------------------------------------------------- sweep


def run_sweep(
    cfg: TrainConfig, out: str, *, ks: Sequence[int], alphas: Sequence[float], progress: bool = True
) -> dict[str, Any]:
    """Layca over the grid ``ρ(0) = 3^k`` × ``α``: all configurations in one vmapped, jitted
    run (same init, same batches); writes ``sweep_heatmap.png``, ``sweep_curves.png``,
    ``report.md`` and ``results.json``."""
    import jax
    import jax.numpy as jnp

    from .. import layca
    from ..data import epoch_batches
    from . import _report

    t_start = time.perf_counter()
    _prepare_out(out)
    data, _model, params0, apply, order = _setup(cfg)
    n = len(data.x_train)
    steps_per_epoch = -(-n // min(cfg.batch_size, n))
    scale = _step_decay(cfg, steps_per_epoch)
    grid = [(k, a) for k in ks for a in alphas]
    lrs = jnp.asarray([3.0**k for k, _ in grid], jnp.float32)
    als = jnp.asarray([a for _, a in grid], jnp.float32)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    xt, yt = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    evaluate = _make_evaluate(apply)

    def make_tx(lr, alpha):
        return layca(lambda step: lr * scale(step), alpha=alpha, layer_order=order)

    def init_one(lr, alpha):
        return make_tx(lr, alpha).init(params0)

    def epoch_one(lr, alpha, params, opt_state, idx, mask):
        tx = make_tx(lr, alpha)
        fn = make_epoch_fn(apply, tx, order)
        params, opt_state, loss, cd = fn(params, opt_state, params0, x, y, idx, mask)
        _, acc = evaluate(params, x, y)
        _, tacc = evaluate(params, xt, yt)
        return params, opt_state, jnp.mean(loss), cd[-1], acc, tacc

    v_epoch = jax.jit(jax.vmap(epoch_one, in_axes=(0, 0, 0, 0, None, None)))
    states = jax.jit(jax.vmap(init_one))(lrs, als)
    params = jax.tree.map(lambda w: jnp.broadcast_to(w, (len(grid), *w.shape)), params0)
    cds = [np.zeros((len(grid), len(order)), np.float32)]
    losses, accs, taccs = [], [], []
    bar = _progress(cfg.epochs, f"sweep ({len(grid)} configs, vmapped)", progress)
    for e in range(cfg.epochs):
        idx, mask = epoch_batches(n, cfg.batch_size, cfg.seed, e)
        params, states, loss, cd, acc, tacc = v_epoch(lrs, als, params, states, idx, mask)
        cds.append(np.asarray(cd))
        losses.append(np.asarray(loss))
        accs.append(np.asarray(acc))
        taccs.append(np.asarray(tacc))
        bar.update(1)
    bar.close()
    cds_a = np.stack(cds, 1)  # (C, E+1, L)
    results = {
        "command": "sweep",
        "steps_per_epoch": steps_per_epoch,
        "config": dataclasses.asdict(cfg),
        "dataset": _dataset_info(data),
        "layers": list(order),
        "ks": list(ks),
        "alphas": [float(a) for a in alphas],
        "configs": [
            {
                "k": k,
                "rho0": 3.0**k,
                "alpha": float(a),
                "train_acc": float(accs[-1][i]) if accs else math.nan,
                "test_acc": float(taccs[-1][i]) if taccs else math.nan,
                "train_loss": [float(l[i]) for l in losses],
                "epoch_cosine_distance": cds_a[i],
            }
            for i, (k, a) in enumerate(grid)
        ],
    }
    figures = _report.sweep_figures(results, out)
    _write_outputs(out, results, figures, _report.write_sweep_report, t_start)
    rows = [
        [
            f"3^{c['k']}",
            f"{c['alpha']:+.2f}",
            f"{c['train_acc']:.3f}",
            f"{c['test_acc']:.3f}",
            f"{float(np.min(c['epoch_cosine_distance'][-1])):.3f}",
        ]
        for c in results["configs"]
    ]
    _print_table(
        f"Layca sweep on {data.name} / {cfg.model}, {cfg.epochs} epochs",
        ["rho(0)", "alpha", "train acc", "test acc", "min cos dist"],
        rows,
    )
    print(f"wrote {out}/report.md, results.json in {results['timings']['total_s']:.1f} s")
    return results


# ----------------------------------------------------------------------------- lca


def lca_optimizers(lr: float, adam_lr: float = 0.002) -> dict[str, tuple[str, Any]]:
    """The LCA job's runs: Lan et al., 2019's MNIST-FC settings (SGD, momentum 0.9, lr 0.05; Adam
    0.002). The first one gets the full analysis, all of them the error table."""
    import optax

    return {
        "sgd": (f"SGD (momentum 0.9, lr {lr:g})", optax.sgd(lr, momentum=0.9)),
        "adam": (f"Adam (lr {adam_lr:g})", optax.adam(adam_lr)),
    }


def run_lca(
    cfg: TrainConfig,
    out: str,
    *,
    lr: float,
    max_iters: int,
    progress: bool = True,
    tol: float = 1e-3,
) -> dict[str, Any]:
    """Loss Change Allocation of the first ``max_iters`` training iterations (Lan et al., 2019).

    Each optimizer of :func:`lca_optimizers` trains the same initialisation on the same
    batches; every step is allocated twice over the *whole* training set, with RK4 (adaptive
    Simpson, tolerance ``tol``, per parameter and per class) and to first order. Writes
    ``lca_per_layer.png`` (cumulative LCA per layer over iterations, and totals),
    ``helping_fraction.png``, ``moments_raster.png``, ``report.md`` (with the first-order vs
    RK4 error table, Lan et al., 2019 Table S1) and ``results.json``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from .. import lca as lca_lib
    from ..data import epoch_batches
    from . import _report

    t_start = time.perf_counter()
    _prepare_out(out)
    data, _model, params0, apply, order = _setup(cfg)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    def per_example(p, batch):
        xb, yb = batch
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, xb), yb)

    evaluator = lca_lib.Evaluator(per_example, (data.x_train, data.y_train), labels=data.y_train)
    grad_fn = jax.grad(lambda p, xb, yb, mb: _loss_fn(apply, p, xb, yb, mb))
    n = len(data.x_train)
    runs: dict[str, Any] = {}
    for key, (label, tx) in lca_optimizers(lr).items():

        @jax.jit
        def step(p, s, i, m, tx=tx):
            u, s = tx.update(grad_fn(p, x[i], y[i], m), s, p)
            return optax.apply_updates(p, u), s

        recorders = {
            "rk4": lca_lib.LCARecorder(
                per_example, evaluator, method="rk4", tol=tol, store_per_param=key == "sgd"
            ),
            "first_order": lca_lib.LCARecorder(per_example, evaluator, method="first_order"),
        }
        for r in recorders.values():
            r.start(params0)
        params, state = params0, tx.init(params0)
        bar = _progress(max_iters, f"LCA {label}", progress)
        t, epoch = 0, 0
        while t < max_iters:
            idx, mask = epoch_batches(n, cfg.batch_size, cfg.seed, epoch)
            for i, m in zip(idx, mask):
                if t >= max_iters:
                    break
                params, state = step(params, state, i, m)
                for r in recorders.values():
                    r(params)
                t += 1
                bar.update(1)
            epoch += 1
        bar.close()
        runs[key] = {"label": label, **{m: r.history() for m, r in recorders.items()}}

    main_key = next(iter(runs))
    h = runs[main_key]["rk4"]
    cum = lca_lib.cumulative_per_layer(h)
    fractions = lca_lib.helping_fraction(h)
    # moments of learning per class and per layer (kernels in forward order; a bias moves
    # with its kernel and would count as a trivially synchronised "layer")
    kidx = [h.layer_names.index(p) for p in order]
    curves = h.per_class[:, :, kidx] if h.per_class is not None else h.per_layer[:, kidx]
    moments = lca_lib.moments_of_learning(
        curves, k=max(3, max_iters // 10), num_shuffles=100, seed=cfg.seed
    )
    rows, table_md = lca_lib.error_table(
        {
            runs[k]["label"]: {"rk4": runs[k]["rk4"], "first_order": runs[k]["first_order"]}
            for k in runs
        }
    )
    results = {
        "command": "lca",
        "config": {**dataclasses.asdict(cfg), "lr": lr, "iterations": max_iters, "tol": tol},
        "dataset": _dataset_info(data),
        "layers": list(order),
        "leaves": list(h.layer_names),
        "main_run": runs[main_key]["label"],
        "per_layer": h.per_layer,
        "loss_change": h.loss_change,
        "total": h.total,
        "error_rk4": h.error,
        "num_splits": h.num_splits,
        "cumulative_per_layer": {k: v[-1] for k, v in cum.items()},
        "helping_fraction": {
            "helping": fractions.helping,
            "hurting": fractions.hurting,
            "zero": fractions.zero,
        },
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
    figures = _report.lca_figures(h, moments, order, out)
    _write_outputs(
        out,
        results,
        figures,
        lambda res, path: _report.write_lca_report(res, table_md, path),
        t_start,
        full_dataset_passes=evaluator.num_evaluations,
    )
    total = sum(float(v) for v in results["cumulative_per_layer"].values())
    rows_out = [
        [name, f"{float(v):+.4f}", f"{100 * float(v) / total:.1f}%" if total else "-"]
        for name, v in results["cumulative_per_layer"].items()
    ]
    _print_table(
        f"LCA of {max_iters} iterations, {runs[main_key]['label']} on {data.name} / "
        f"{cfg.model} (negative = helped)",
        ["leaf", "cumulative LCA", "share"],
        rows_out,
    )
    print(table_md)
    print(f"helping fraction (mean over iterations): {results['helping_fraction_mean']:.3f}")
    print(f"wrote {out}/report.md, results.json in {results['timings']['total_s']:.1f} s")
    return results


# ----------------------------------------------------------------------------- argument parsing


def _int_at_least(name: str, low: int):
    """argparse type: an integer ``>= low``, else the one-line error ``name must be >= low``."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer; got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}; got {v}")
        return v

    return parse


def _list_of(kind: type, what: str):
    """argparse type: comma-separated values of ``kind`` (e.g. ``--ks=-5,-3,-1``)."""

    def parse(s: str) -> list:
        try:
            return [kind(v) for v in s.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}; got {s!r}"
            ) from None

    return parse


def _add_int(parser, flag: str, low: int, help: str, default: int | None = None) -> None:
    """Adds the integer option ``flag`` (``>= low``; the error names the flag)."""
    parser.add_argument(flag, type=_int_at_least(flag, low), default=default, help=help)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``optax-layca`` (errors raise :class:`CLIError`)."""
    from ..models import MODELS

    common = _Parser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument(
        "--dataset",
        default="digits",
        help="digits (default, sklearn 8x8), mnist1d, or a .npz with x_train, y_train, "
        "x_test, y_test",
    )
    g.add_argument(
        "--model",
        default="fc",
        choices=sorted(MODELS),
        help="reference model (default fc: in-100-50-10)",
    )
    _add_int(
        g,
        "--epochs",
        1,
        "training epochs (default: 40 for demo, 20 for sweep; fewer with --quick; lca uses "
        "--iters)",
    )
    _add_int(g, "--batch-size", 1, "minibatch size (default 32)", default=32)
    _add_int(g, "--seed", 0, "seed of the initialisation, split and batches", default=0)
    g.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT}/)")
    g.add_argument("--quick", action="store_true", help="small, fast configuration (CI)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")

    parser = _Parser(
        prog=PROG,
        description="Layer rotation and Loss Change Allocation experiments (Layca, LARS, LCA) "
        "on embedded data. Default subcommand: demo.",
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    command = lambda name, help: sub.add_parser(name, parents=[common], help=help)
    dm = command("demo", "SGD, SGD+wd, Adam, Layca, Adam+Layca, LARS: rotation curves and report")
    dm.add_argument(
        "--optimizers",
        help=f"comma-separated subset of {','.join(DEMO_OPTIMIZERS)} (default: all)",
    )
    sw = command("sweep", "Layca over rho(0)=3^k x alpha (vmapped): heat map + curve grid")
    sw.add_argument(
        "--ks",
        type=_list_of(int, "integers"),
        help="exponents k of rho(0)=3^k, e.g. --ks=-5,-3,-1 (default -5,-4,-3,-2,-1)",
    )
    sw.add_argument(
        "--alphas",
        type=_list_of(float, "numbers"),
        help="alpha values in [-1, 1], e.g. --alphas=-0.5,0,0.5 (default -0.8,-0.4,0,0.4,0.8)",
    )
    lc = command("lca", "train with SGD and write the Loss Change Allocation report")
    lc.add_argument(
        "--lr",
        type=float,
        default=0.05,
        help="SGD (momentum 0.9) learning rate (default 0.05, Lan et al., 2019's MNIST-FC)",
    )
    _add_int(lc, "--iters", 1, "training iterations analysed (default 150; 40 with --quick)")
    return parser


def _config(args: argparse.Namespace) -> TrainConfig:
    quick = args.quick
    default_epochs = {"demo": 40, "sweep": 20, "lca": 1}[args.command]
    epochs = (
        args.epochs
        if args.epochs is not None
        else ({"demo": 6, "sweep": 4, "lca": 1}[args.command] if quick else default_epochs)
    )
    return TrainConfig(
        dataset=args.dataset,
        model=args.model,
        epochs=epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``optax-layca``; returns the process exit status.

    Examples:
      >>> main(["demo", "--epochs", "-1"])
      2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo", "sweep", "lca"}
    if not any(a in commands for a in argv) and not any(a in ("-h", "--help") for a in argv):
        argv = ["demo", *argv]
    elif argv and argv[0] not in commands and argv[0] not in ("-h", "--help"):
        # options before the subcommand: move the subcommand first
        cmd = next(a for a in argv if a in commands) if any(a in commands for a in argv) else None
        if cmd is not None:
            argv.remove(cmd)
            argv = [cmd, *argv]
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return int(e.code or 0)
        cfg = _config(args)
        progress = not args.no_progress
        if args.command == "demo":
            which = None
            if args.optimizers:
                which = [k.strip() for k in args.optimizers.split(",") if k.strip()]
                unknown = [k for k in which if k not in DEMO_OPTIMIZERS]
                if unknown or not which:
                    raise CLIError(
                        f"--optimizers: unknown {unknown or args.optimizers!r}; choose from "
                        f"{', '.join(DEMO_OPTIMIZERS)}"
                    )
            run_demo(cfg, args.out, progress=progress, which=which)
        elif args.command == "sweep":
            ks = args.ks or ([-4, -3, -2] if args.quick else [-5, -4, -3, -2, -1])
            alphas = args.alphas or (
                [-0.5, 0.0, 0.5] if args.quick else [-0.8, -0.4, 0.0, 0.4, 0.8]
            )
            bad = [a for a in alphas if not -1.0 <= a <= 1.0]
            if bad:
                raise CLIError(f"--alphas must lie in [-1, 1]; got {bad}")
            run_sweep(cfg, args.out, ks=ks, alphas=alphas, progress=progress)
        else:
            if not args.lr > 0:
                raise CLIError(f"--lr must be > 0; got {args.lr}")
            iters = args.iters or (40 if args.quick else 150)
            run_lca(cfg, args.out, lr=args.lr, max_iters=iters, progress=progress)
        return 0
    except (CLIError, DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out not writable
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
