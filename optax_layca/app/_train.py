"""The one training loop of ``optax-layca``: demo, sweep, lca and every paper experiment.

Runs are trained in *groups*. A :class:`Group` is a set of :class:`Run`\\ s whose optimizers
share one structure (the same ``build`` function, different hyperparameters, e.g. SGD with and
without weight decay, or Layca over a grid of ``ρ(0) × α``): they start from the same
initialisation, see the same batches, and are trained together under ``jax.vmap`` over the
hyperparameters, by one compiled program (hyperparameters are traced, never baked in).

What is measured, and by which instrument of the library (nothing is measured here):

* layer rotation, per-epoch rotation, weight and gradient norms:
  :func:`optax_layca.rotation.track_rotation` wraps every optimizer (so ``grad_norm`` is the raw
  minibatch gradient, without the weight-decay term) and its figures are kept, per run, in a
  :class:`optax_layca.rotation.RotationHistory`: ``records_per_epoch`` times per epoch, plus at
  each epoch end with the parameters (for :meth:`~optax_layca.rotation.RotationHistory.per_epoch_rotation`);
* full train/test accuracy: :class:`optax_layca.lca.Evaluator` over a per-example 0/1 error;
* training loss per epoch: the mean of the epoch's minibatch losses (what the papers' Keras
  histories plot, Carbonnelle & De Vleeschouwer, 2019, Fig. 3).

An epoch is one jitted ``lax.scan`` over its batches (``per_step=True``: one jitted step per
call, for callers that look at every step, such as LCA), with the parameters and optimizer
states donated. The batch order depends only on the seed and the epoch
(:func:`optax_layca.data.epoch_batches`). The host synchronises once per call, to read the
losses (a non-finite loss marks the run as diverged: its records stop there, the other runs go
on) and the rotation figures.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Group",
    "Run",
    "RunResult",
    "Task",
    "TrainConfig",
    "adam",
    "lars_sgd",
    "layca_adam",
    "layca_sgd",
    "setup",
    "sgd",
    "train",
]

MAX_STEPS = 2**31 - 1  # optax's step counters are int32


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines the training of a command (recorded with its results).

    Attributes:
      dataset, model: names for :func:`~optax_layca.data.load_dataset` and
        :func:`~optax_layca.models.get_model` (or a ``.npz`` path for ``dataset``).
      epochs, batch_size, seed: training length, minibatch size, seed of the initialisation,
        of the data split and of the batch order.
      num_train, num_test: keep only the first examples (quick runs); None keeps all.
      decay_at, decay_factor: every learning rate is multiplied by ``decay_factor`` at each
        fraction of training in ``decay_at`` (the papers' step decay).
      records_per_epoch: rotation records per epoch (besides the one at each epoch end).
      eval_every: full-dataset accuracy every ``eval_every`` epochs (and at the last one).
      validation: fraction of the training set held out for hyperparameter selection (the
        authors' 10%); its accuracy is measured with the others. 0: none.
    """

    dataset: str = "mnist1d"
    model: str = "deep"
    epochs: int = 40
    batch_size: int = 32
    seed: int = 0
    num_train: int | None = None
    num_test: int | None = None
    decay_at: tuple[float, ...] = (0.7, 0.9)
    decay_factor: float = 0.2
    records_per_epoch: int = 4
    eval_every: int = 1
    validation: float = 0.0


@dataclasses.dataclass(frozen=True)
class Task:
    """What every run of a command shares: data, model, initial parameters, layer order."""

    config: TrainConfig
    data: Any  # optax_layca.data.Dataset
    apply: Callable[[Any, Any], Any]
    params0: Any
    order: tuple[str, ...]
    x_val: Any = None
    y_val: Any = None

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.data.x_train)
        return -(-n // min(self.config.batch_size, n))

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def schedule(self, base_lr: Any) -> Callable[[Any], Any]:
        """``step -> base_lr × decay(step)``; ``base_lr`` may be traced (vmapped groups)."""
        import optax

        cfg, total = self.config, self.total_steps
        bounds = {round(f * total): cfg.decay_factor for f in cfg.decay_at if 0 < f < 1}
        decay = optax.piecewise_constant_schedule(1.0, bounds)
        return lambda step: base_lr * decay(step)

    def loss(self, params: Any, x: Any, y: Any, mask: Any) -> Any:
        """Mean softmax cross-entropy over the unmasked examples of a batch."""
        import jax.numpy as jnp
        import optax

        ce = optax.softmax_cross_entropy_with_integer_labels(self.apply(params, x), y)
        m = mask.astype(ce.dtype)
        return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def setup(config: TrainConfig) -> Task:
    """Loads the data, builds the model, its initial parameters and traced layer order."""
    import jax.numpy as jnp

    from .. import forward_order
    from ..data import load_dataset
    from ..models import apply_fn, get_model, init_params

    data = load_dataset(config.dataset, seed=config.seed)
    if config.num_train or config.num_test:
        data = data.subset(config.num_train, config.num_test)
    data, x_val, y_val = _hold_out(data, config.validation, config.seed)
    model = get_model(config.model, num_classes=data.num_classes)
    params0 = init_params(model, data.input_shape, config.seed)
    apply = apply_fn(model)
    order = forward_order(apply, params0, jnp.zeros((1, *data.input_shape), jnp.float32))
    return Task(config, data, apply, params0, tuple(order), x_val, y_val)


def _hold_out(data: Any, fraction: float, seed: int):
    """``(data without the held-out examples, x_val, y_val)``: a seeded random ``fraction`` of
    the training set (None, None when ``fraction`` is 0)."""
    if not fraction:
        return data, None, None
    n = len(data.x_train)
    k = round(fraction * n)
    if not 0 < k < n:
        raise ValueError(f"`validation={fraction}` leaves no training or validation example.")
    perm = np.random.default_rng((seed, 0x5EED)).permutation(n)
    val, keep = np.sort(perm[:k]), np.sort(perm[k:])
    x, y = data.x_train, data.y_train
    kept = dataclasses.replace(data, x_train=x[keep], y_train=y[keep])
    return kept, x[val], y[val]


@dataclasses.dataclass(frozen=True)
class Run:
    """One optimizer configuration: a key (file names, JSON), a label (figures) and its
    hyperparameters (floats, the arguments of its group's ``build``)."""

    key: str
    label: str
    hparams: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Group:
    """Runs sharing one optimizer structure, trained together under ``jax.vmap``.

    ``build(task, hparams) -> GradientTransformation`` receives the hyperparameters as traced
    scalars (``{name: jax.Array}``, the keys of every run's ``hparams``); ``name`` labels the
    progress bar.
    """

    name: str
    build: Callable[[Task, Mapping[str, Any]], Any]
    runs: tuple[Run, ...]

    def __post_init__(self):
        keys = {tuple(sorted(r.hparams)) for r in self.runs}
        if not self.runs or len(keys) != 1:
            raise ValueError(
                f"Group {self.name!r}: runs must share hyperparameter names; got {keys}."
            )


@dataclasses.dataclass
class RunResult:
    """What one run leaves: its rotation history and its training curves (numpy, host side).

    Attributes:
      epoch_loss: ``(E,)`` mean minibatch loss of each epoch (NaN from divergence on).
      eval_epochs: epochs at which the accuracies were measured (0 = initialisation).
      train_acc, test_acc, val_acc: full-dataset accuracies at ``eval_epochs`` (NaN after
        divergence; ``val_acc`` NaN without a validation split).
      diverged_at: first epoch with a non-finite training loss, or None.
      params: the final parameters (numpy).
    """

    run: Run
    history: Any  # optax_layca.rotation.RotationHistory
    epoch_loss: np.ndarray
    eval_epochs: np.ndarray
    train_acc: np.ndarray
    test_acc: np.ndarray
    val_acc: np.ndarray
    diverged_at: int | None
    seconds: float
    params: Any = None

    def final(self, order: Sequence[str]) -> dict[str, float]:
        """Final accuracies and the min/mean/max over layers of the final cosine distance."""
        cd = self.final_cosine_distance(order)
        return {
            "train_acc": float(self.train_acc[-1]),
            "test_acc": float(self.test_acc[-1]),
            "val_acc": float(self.val_acc[-1]),
            "cos_min": float(cd.min()),
            "cos_mean": float(cd.mean()),
            "cos_max": float(cd.max()),
        }

    def final_cosine_distance(self, order: Sequence[str]) -> np.ndarray:
        """Cosine distance to init of each layer (in ``order``) at the last record."""
        cd = self.history.get("cosine_distance", list(order))
        return np.asarray([cd[p][-1] for p in order], np.float64)


# ----------------------------------------------------------------------------- optimizers
# ``build(task, hp)`` functions for :class:`Group`: every learning rate follows the task's step
# decay; Layca freezes biases as the authors' code does ("only kernels are optimized"); LARS
# keeps the library's default treatment of non-layer leaves (the authors' code, App. A.2).


def sgd(task: Task, hp: Mapping[str, Any]):
    """SGD with weight decay ``hp["weight_decay"]`` (0: none) added to the gradient."""
    import optax

    return optax.chain(
        optax.add_decayed_weights(hp["weight_decay"]), optax.sgd(task.schedule(hp["lr"]))
    )


def adam(task: Task, hp: Mapping[str, Any]):
    """Adam with learning rate ``hp["lr"]``."""
    import optax

    return optax.adam(task.schedule(hp["lr"]))


def layca_sgd(task: Task, hp: Mapping[str, Any]):
    """Layca in SGD's direction, rate ``hp["rho"]``, prioritisation ``hp["alpha"]``."""
    from .. import layca

    return layca(
        task.schedule(hp["rho"]), alpha=hp["alpha"], layer_order=task.order, non_layer="freeze"
    )


def layca_adam(task: Task, hp: Mapping[str, Any]):
    """Layca in Adam's direction, rate ``hp["rho"]``, prioritisation ``hp["alpha"]``."""
    import optax

    from .. import layca

    return layca(
        task.schedule(hp["rho"]),
        base=optax.scale_by_adam(),
        alpha=hp["alpha"],
        layer_order=task.order,
        non_layer="freeze",
    )


def lars_sgd(task: Task, hp: Mapping[str, Any]):
    """The papers' LARS (Layca without ops 1 and 4, norm growth capped), SGD direction."""
    from .. import lars

    return lars(task.schedule(hp["rho"]), alpha=hp["alpha"], layer_order=task.order)


def _error_fn(apply: Callable):
    """Per-example 0/1 error of ``apply`` (the Evaluator's mean of it is 1 − accuracy)."""
    import jax.numpy as jnp

    def error(params, batch):
        x, y = batch
        return (jnp.argmax(apply(params, x), axis=-1) != y).astype(jnp.float32)

    return error


class _Evaluators:
    """Full train, test (and validation) accuracy in one pass of one
    :class:`optax_layca.lca.Evaluator`: the sets are concatenated and each example's *class*
    is its set, so the per-class means of the 0/1 error are the three error rates (one compile,
    one pass per call)."""

    def __init__(self, task: Task):
        from .. import lca

        d = task.data
        sets = [(d.x_train, d.y_train), (d.x_test, d.y_test)]
        if task.x_val is not None:
            sets.append((task.x_val, task.y_val))
        self.sizes = np.asarray([len(x) for x, _ in sets], np.float64)
        x = np.concatenate([x for x, _ in sets])
        y = np.concatenate([y for _, y in sets])
        which = np.repeat(np.arange(len(sets)), self.sizes.astype(int))
        self.evaluator = lca.Evaluator(_error_fn(task.apply), (x, y), labels=which)

    def accuracies(self, params: Any) -> tuple[float, float, float]:
        """(train, test, validation) accuracy; validation NaN without a held-out set."""
        ev = self.evaluator.evaluate(params, grad=False)
        # class_loss[s] = (1/N) Σ_{i in set s} err_i; its mean over set s is class_loss × N/N_s
        err = np.asarray(ev.class_loss, np.float64) * ev.num_examples / self.sizes
        acc = 1.0 - err
        return float(acc[0]), float(acc[1]), float(acc[2]) if len(acc) > 2 else math.nan


def _compile_group(task: Task, group: Group):
    """``(init, chunk)``: jitted, vmapped over the runs' hyperparameters.

    ``chunk(hp, params, states, idx, mask, x, y)`` scans the batches ``idx, mask`` and returns
    the new params and states, the losses ``(C, n)`` and the monitor's figures after every step
    ``{figure: {layer: (C, n, ...)}}``.
    """
    import jax
    import optax

    from ..rotation import FIGURES, track_rotation

    grad_fn = jax.value_and_grad(task.loss)
    make_tx = lambda hp: track_rotation(group.build(task, hp))

    def init_one(hp, params0):
        return make_tx(hp).init(params0)

    def chunk_one(hp, params, state, idx, mask, x, y):
        tx = make_tx(hp)

        def step(carry, batch):
            p, s = carry
            i, m = batch
            loss, g = grad_fn(p, x[i], y[i], m)
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), (loss, {name: getattr(s, name) for name in FIGURES})

        (params, state), (losses, figs) = jax.lax.scan(step, (params, state), (idx, mask))
        return params, state, losses, figs

    init = jax.jit(jax.vmap(init_one, in_axes=(0, None)))
    chunk = jax.jit(
        jax.vmap(chunk_one, in_axes=(0, 0, 0, None, None, None, None)), donate_argnums=(1, 2)
    )
    return init, chunk


@dataclasses.dataclass
class _RunState:
    """Host-side bookkeeping of one run of a group during training."""

    history: Any
    losses: list = dataclasses.field(default_factory=list)
    evals: list = dataclasses.field(default_factory=list)
    diverged_at: int | None = None


def _take(tree: Any, c: int) -> Any:
    return _jax().tree.map(lambda a: a[c], tree)


@functools.cache
def _take_on_device():
    """``(tree, c) -> tree[c]`` jitted: one dispatch for a whole device tree (leaf by leaf,
    a state of hundreds of leaves costs hundreds of dispatches per run)."""
    jax = _jax()
    return jax.jit(lambda tree, c: jax.tree.map(lambda a: a[c], tree))


def _jax():
    import jax

    return jax


def _light(states: Any) -> Any:
    """The monitor's state without the wrapped optimizer's (what a record needs)."""
    import optax

    return states._replace(tracked_state=optax.EmptyState())


class _GroupTrainer:
    """Trains one :class:`Group`; see :func:`train`."""

    def __init__(
        self,
        task: Task,
        group: Group,
        evaluators: _Evaluators,
        per_step: bool,
        max_steps: int | None,
    ):
        import jax
        import jax.numpy as jnp

        from ..rotation import RotationHistory

        self.task, self.group, self.evaluators, self.per_step = task, group, evaluators, per_step
        self.max_steps = task.total_steps if max_steps is None else min(max_steps, task.total_steps)
        names = sorted(group.runs[0].hparams)
        self.hp = {k: jnp.asarray([r.hparams[k] for r in group.runs], jnp.float32) for k in names}
        self.x = jnp.asarray(task.data.x_train)
        self.y = jnp.asarray(task.data.y_train)
        self.init, self.chunk = _compile_group(task, group)
        every = max(1, task.steps_per_epoch // max(1, task.config.records_per_epoch))
        self.runs = [_RunState(RotationHistory(every=every)) for _ in group.runs]
        c = len(group.runs)
        self.params = jax.tree.map(lambda w: jnp.broadcast_to(w, (c, *w.shape)), task.params0)
        self.params = jax.tree.map(jnp.copy, self.params)  # own buffers: they are donated
        self.states = self.init(self.hp, task.params0)
        self.step = 0

    def done(self) -> bool:
        return self.step >= self.max_steps or not self.alive()

    def alive(self) -> list[int]:
        return [c for c, r in enumerate(self.runs) if r.diverged_at is None]

    def record_start(self) -> None:
        light = jax_get(_light(self.states))
        for c, r in enumerate(self.runs):
            r.history.record(0, _take(light, c))
        self.evaluate(0)

    def run_chunk(self, idx: np.ndarray, mask: np.ndarray, epoch: int) -> np.ndarray:
        """Trains every run over the batches ``idx, mask``; records; returns losses (C, n)."""
        self.params, self.states, losses, figs = self.chunk(
            self.hp, self.params, self.states, idx, mask, self.x, self.y
        )
        losses, figs = jax_get((losses, figs))
        first = self.step
        self.step += len(idx)
        closes = self.step % self.task.steps_per_epoch == 0 or self.done()
        for c in self.alive():
            r = self.runs[c]
            if not np.all(np.isfinite(losses[c])):
                r.diverged_at = epoch
                continue
            r.losses.append(losses[c])
            for j in range(len(idx)):
                t = first + j + 1
                if r.history.should_record(t) and not (closes and t == self.step):
                    r.history.record(t, _figures_at(figs, c, j))
        return losses

    def end_epoch(self, epoch: int) -> None:
        """The epoch-end record (with the per-epoch rotation) and, when due, accuracies."""
        alive = self.alive()
        if alive:
            light, params = jax_get((_light(self.states), self.params))
            for c in alive:
                self.runs[c].history.record(
                    self.step, _take(light, c), epoch=epoch, params=_take(params, c)
                )
        cfg = self.task.config
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs or self.done():
            self.evaluate(epoch)

    def evaluate(self, epoch: int) -> None:
        for c, r in enumerate(self.runs):
            if r.diverged_at is None:
                r.evals.append((epoch, *self.evaluators.accuracies(_take(self.params, c))))
            else:
                r.evals.append((epoch, math.nan, math.nan, math.nan))

    def results(self, seconds: float) -> list[RunResult]:
        out = []
        spe, epochs = self.task.steps_per_epoch, self.task.config.epochs
        params = jax_get(self.params)
        for c, (run, r) in enumerate(zip(self.group.runs, self.runs)):
            steps = np.concatenate(r.losses) if r.losses else np.zeros(0)
            per_epoch = [steps[e * spe : (e + 1) * spe].mean() for e in range(len(steps) // spe)]
            loss = np.full(epochs, np.nan)
            loss[: len(per_epoch)] = per_epoch
            ev = np.asarray(r.evals, np.float64).reshape(-1, 4)
            out.append(
                RunResult(
                    run=run,
                    history=r.history,
                    epoch_loss=loss,
                    eval_epochs=ev[:, 0].astype(int),
                    train_acc=ev[:, 1],
                    test_acc=ev[:, 2],
                    val_acc=ev[:, 3],
                    diverged_at=r.diverged_at,
                    seconds=seconds / len(self.runs),
                    params=_take(params, c),
                )
            )
        return out


def jax_get(tree: Any) -> Any:
    """``jax.device_get``: one transfer of a whole tree to numpy."""
    return _jax().device_get(tree)


def _figures_at(figs: dict, c: int, j: int) -> dict:
    """``{figure: {layer: value}}`` of run ``c`` after step ``j`` of a chunk (host arrays), in
    the monitor's order of figures (a traced dict comes back with sorted keys)."""
    from ..rotation import FIGURES

    return {name: {p: v[c, j] for p, v in figs[name].items()} for name in FIGURES}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        disable=not enabled,
    )


def _train_group(
    trainer: _GroupTrainer,
    *,
    progress: bool,
    on_step: Callable[[Run, int, Any], None] | None,
    on_epoch: Callable[[Run, int, Any, Any], None] | None = None,
) -> None:
    from ..data import epoch_batches

    task, cfg = trainer.task, trainer.task.config
    bar = _progress(cfg.epochs, trainer.group.name, progress)
    trainer.record_start()
    with bar:
        for epoch in range(1, cfg.epochs + 1):
            idx, mask = epoch_batches(len(task.data.x_train), cfg.batch_size, cfg.seed, epoch - 1)
            size = 1 if trainer.per_step else len(idx)
            for start in range(0, len(idx), size):
                losses = trainer.run_chunk(
                    idx[start : start + size], mask[start : start + size], epoch
                )
                if on_step is not None:
                    for c in trainer.alive():
                        on_step(trainer.group.runs[c], trainer.step, _take(trainer.params, c))
                if trainer.done():
                    break
            trainer.end_epoch(epoch)
            if on_epoch is not None:
                take = _take_on_device()
                for c in trainer.alive():
                    params, state = take((trainer.params, trainer.states), c)
                    on_epoch(trainer.group.runs[c], epoch, params, state)
            bar.update(1)
            bar.set_postfix(loss=f"{np.nanmean(losses):.3f}")
            if trainer.done():
                break


def train(
    task: Task,
    groups: Sequence[Group],
    *,
    progress: bool = True,
    on_step: Callable[[Run, int, Any], None] | None = None,
    on_epoch: Callable[[Run, int, Any, Any], None] | None = None,
    max_steps: int | None = None,
) -> dict[str, RunResult]:
    """Trains every run of every group from ``task.params0``; returns ``{run key: result}``.

    Args:
      task: data, model and initialisation (:func:`setup`).
      groups: the runs, grouped by optimizer structure.
      progress: a tqdm bar per group on stderr.
      on_step: ``on_step(run, step, params)`` after every step of every live run (switches to
        one jitted step per call).
      on_epoch: ``on_epoch(run, epoch, params, opt_state)`` after every epoch of every live
        run, with that run's parameters and optimizer state (the ``track_rotation`` state
        wrapping its optimizer's), e.g. to read Adam's ``ν`` or probe the network; epochs stay
        one jitted call each.
      max_steps: stop every group after this many steps (the epoch in progress is closed with
        its records, at that step).
    """
    keys = [r.key for g in groups for r in g.runs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Run keys must be unique; got {keys}.")
    if task.total_steps > MAX_STEPS:
        raise ValueError(
            f"{task.config.epochs} epochs of {task.steps_per_epoch} steps exceed optax's int32 "
            f"step counter ({MAX_STEPS} steps)."
        )
    evaluators = _Evaluators(task)
    out: dict[str, RunResult] = {}
    for group in groups:
        t0 = time.perf_counter()
        trainer = _GroupTrainer(task, group, evaluators, on_step is not None, max_steps)
        _train_group(trainer, progress=progress, on_step=on_step, on_epoch=on_epoch)
        for res in trainer.results(time.perf_counter() - t0):
            out[res.run.key] = res
    return out
