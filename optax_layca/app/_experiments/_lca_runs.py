"""What the Loss Change Allocation experiments share (Lan, Liu, Zhou & Yosinski, 2019): the
stand-in task, per-layer optimizers, training through the one loop with every step allocated,
and the verdict rules on LCA numbers.

The stand-in for the paper's MNIST–FC (784-100-50-10, 880 iterations of batch 250 on MNIST)
is the same fully connected net on scikit-learn's digits, ``64-100-50-10``, batch 32, 880
iterations (20 epochs of the 1,437 training images; quick: 20 iterations on 300 images). The
paper's learning rates for MNIST–FC are kept: SGD 0.5 without momentum, SGD 0.05 with momentum
0.9, Adam 0.002 (Lan et al., 2019, §S7), constant, no weight decay.

Every step of every run is allocated over the whole training set with RK4 / adaptive Simpson
(tolerance 0.001, the paper's) by one :class:`optax_layca.lca.LCARecorder` per run; all the
recorders of an experiment share one :class:`optax_layca.lca.Evaluator` (one compile).

A *layer* is a module: ``Dense_0`` sums the LCA of ``Dense_0/kernel`` and ``Dense_0/bias``
(the paper: "sum LCA over all parameters within each layer").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import Reference

__all__ = [
    "LAN_2019",
    "LCARun",
    "layer_names",
    "layer_table",
    "layerwise_sgd",
    "lca_train_config",
    "record_lca",
    "record_one_sgd_run",
    "run_numbers",
    "sgd_hparams",
]

LAN_2019 = Reference(
    "Lan, Liu, Zhou & Yosinski",
    2019,
    "",
    title="LCA: Loss Change Allocation for Neural Network Training",
)
"""Lan, Liu, Zhou, Yosinski, `LCA: Loss Change Allocation for Neural Network Training`,
NeurIPS 2019 (use ``LAN_2019.at("Fig. 4")``)."""

ITERS, QUICK_ITERS = 880, 20  # the paper's MNIST–FC runs are 880 iterations (Table S3)
QUICK_TRAIN = 300
TOL = 1e-3  # the paper's per-iteration tolerance on |ΔL − Σ LCA|
SGD_LR, SGD0_LR, ADAM_LR, MOMENTUM = 0.05, 0.5, 0.002, 0.9  # Lan et al., 2019, §S7

STAND_IN = (
    "scikit-learn's digits (1,437 training 8×8 images) and the paper's fully connected net "
    "scaled to them, 64-100-50-10, stand in for MNIST and 784-100-50-10; 880 iterations of "
    "batch 32 (the paper's MNIST–FC length; batch 250 on 50,000 images there) with the "
    "paper's MNIST–FC learning rates, constant, no weight decay (quick: 20 iterations on "
    "300 images). Every step is allocated over the whole training set with RK4 / adaptive "
    "Simpson, tolerance 0.001, as in the paper; a layer is a module (kernel + bias)."
)


def lca_train_config(config: Any, iters: int | None = None, model: str = "fc"):
    """``(TrainConfig, iterations)`` of the stand-in: enough epochs of batch 32 on digits to
    cover the iterations (``iters`` default: 880, quick 20)."""
    from .._train import TrainConfig

    iters = iters or (QUICK_ITERS if config.quick else ITERS)
    n = QUICK_TRAIN if config.quick else None
    tc = TrainConfig(
        dataset="digits",
        model=model,
        epochs=1,
        batch_size=32,
        seed=config.seed,
        num_train=n,
        records_per_epoch=1,
        eval_every=10**6,  # accuracies at the start and the end only
    )
    return tc, iters


def layer_names(task: Any) -> list[str]:
    """The LCA layers (modules) of a task, in forward order."""
    from .._commands import lca_layers

    return lca_layers(task)


def _module_labels(params: Any, first: str, last: str) -> Any:
    """``"first"``, ``"last"`` or ``"middle"`` per leaf, by its module."""
    import jax

    from ..._layers import module_path, path_str

    def label(path, _):
        m = module_path(path_str(path))
        return "first" if m == first else ("last" if m == last else "middle")

    return jax.tree_util.tree_map_with_path(label, params)


def layerwise_sgd(task: Any, hp: Mapping[str, Any]):
    """SGD whose first and last layers get their own learning-rate factor and momentum (the
    authors' ``--freeze_layers`` / ``--opt2_layers``): ``hp`` holds ``lr``, ``momentum``,
    ``first_scale``, ``last_scale`` and ``last_momentum`` (traced: one vmapped group).

    A factor 0 freezes a layer exactly: its update is ``-0 · trace = 0``, so its parameters,
    its motion and its LCA stay exactly 0.
    """
    import optax

    names = layer_names(task)
    first, last = names[0], names[-1]
    sgd = lambda scale, mom: optax.sgd(hp["lr"] * scale, momentum=mom)
    transforms = {
        "first": sgd(hp["first_scale"], hp["momentum"]),
        "middle": sgd(1.0, hp["momentum"]),
        "last": sgd(hp["last_scale"], hp["last_momentum"]),
    }
    return optax.multi_transform(transforms, lambda p: _module_labels(p, first, last))


def sgd_hparams(
    lr: float = SGD_LR,
    momentum: float = MOMENTUM,
    *,
    first_scale: float = 1.0,
    last_scale: float = 1.0,
    last_momentum: float | None = None,
) -> dict[str, float]:
    """The hyperparameters of :func:`layerwise_sgd` (the last layer's momentum defaults to
    everyone's)."""
    return {
        "lr": lr,
        "momentum": momentum,
        "first_scale": first_scale,
        "last_scale": last_scale,
        "last_momentum": momentum if last_momentum is None else last_momentum,
    }


def adam_constant(task: Any, hp: Mapping[str, Any]):
    """Adam at the constant rate ``hp["lr"]`` (the paper uses no decay)."""
    import optax

    return optax.adam(hp["lr"])


@dataclasses.dataclass
class LCARun:
    """What one run leaves: its LCA histories (``"rk4"``, and ``"first_order"`` when asked),
    the parameter snapshots ``θ_0 … θ_T`` when asked (for the motion), the training result of
    the loop, the final test loss when asked, and, when asked, per class ``c`` an
    ``LCAResult`` whose ``per_param`` is the run's cumulative per-parameter LCA of class
    ``c``'s share of the loss (``(N_c / N) L_c``, so the classes sum to the loss)."""

    label: str
    histories: dict[str, Any]
    trajectory: list | None
    result: Any
    test_loss: float = math.nan
    class_totals: list | None = None


def record_lca(
    name: str,
    config: Any,
    groups: Sequence[Any],
    *,
    iters: int | None = None,
    model: str = "fc",
    first_order: bool = False,
    per_class: bool = False,
    store_per_param: bool = False,
    store_grads: bool = False,
    trajectory: bool = False,
    test_loss: bool = False,
    class_params: bool = False,
) -> tuple[Any, dict[str, LCARun], dict[str, Any]]:
    """Trains ``groups`` on the stand-in task, allocating every step; returns ``(task,
    {run key: LCARun}, identity)``.

    Args:
      name: the experiment (recorded in the identity).
      config: the :class:`ExperimentConfig`.
      groups: the runs (:class:`~optax_layca.app._train.Group`), trained by the one loop.
      iters: iterations (default 880, quick 20).
      first_order: also allocate every step to first order (Table S1).
      per_class: per-class × per-layer LCA (the training labels).
      store_per_param, store_grads: keep the per-parameter LCA / the full-dataset gradient at
        the start of each step.
      trajectory: keep the parameters after every step (host copies).
      test_loss: measure each run's final loss on the test set.
      class_params: per class, allocate every step of the loss of that class's examples
        (one recorder per class, a fixed batch shape: one compile) and sum its per-parameter
        LCA over the run (:attr:`LCARun.class_totals`).
    """
    from ... import lca
    from .. import _report, _train

    tc, iters = lca_train_config(config, iters, model)
    task = _train.setup(tc)
    epochs = -(-iters // task.steps_per_epoch)
    tc = dataclasses.replace(tc, epochs=epochs)
    task = dataclasses.replace(task, config=tc)
    loss = _per_example_loss(task.apply)
    data = (task.data.x_train, task.data.y_train)
    evaluator = lca.Evaluator(loss, data, labels=task.data.y_train if per_class else None)
    recorders, snapshots = {}, {}
    for run in (r for g in groups for r in g.runs):
        recs = {
            "rk4": lca.LCARecorder(
                loss, evaluator, tol=TOL, store_per_param=store_per_param, store_grads=store_grads
            )
        }
        if first_order:
            recs["first_order"] = lca.LCARecorder(loss, evaluator, method="first_order")
        for r in recs.values():
            r.start(task.params0)
        recorders[run.key] = recs
        snapshots[run.key] = [_train.jax_get(task.params0)] if trajectory else None
    classes = {k: _ClassTotals(task, loss, task.params0) for k in recorders} if class_params else {}

    def on_step(run, step, params):
        for r in recorders[run.key].values():
            r(params)
        if trajectory:
            snapshots[run.key].append(_train.jax_get(params))
        if class_params:
            classes[run.key](params)

    results = _train.train(task, groups, progress=config.progress, on_step=on_step, max_steps=iters)
    test = lca.Evaluator(loss, (task.data.x_test, task.data.y_test)) if test_loss else None
    runs = {
        run.key: LCARun(
            run.label,
            {m: r.history() for m, r in recorders[run.key].items()},
            snapshots[run.key],
            results[run.key],
            test.evaluate(results[run.key].params, grad=False).loss if test else math.nan,
            classes[run.key].results() if class_params else None,
        )
        for run in (r for g in groups for r in g.runs)
    }
    identity = _report.run_identity(
        "reproduce", tc, task, experiment=name, quick=config.quick, iterations=iters, tol=TOL
    )
    return task, runs, identity


class _ClassTotals:
    """Per class, a recorder of the loss of that class's training examples, and the running
    sum of its per-parameter LCA weighted by ``N_c / N``."""

    # Every class's examples are read as batches of one shape (the last one padded and
    # masked by the Evaluator): the kernels compile once for all classes, whatever their sizes.
    BATCH = 64

    def __init__(self, task: Any, loss: Any, params0: Any):
        from ... import lca

        x, y = task.data.x_train, task.data.y_train
        self.recorders, self.weights = [], []
        for c in range(int(task.data.num_classes)):
            sel = y == c
            if not np.any(sel):
                continue
            xc, yc = x[sel], y[sel]
            batches = [
                (xc[i : i + self.BATCH], yc[i : i + self.BATCH])
                for i in range(0, len(yc), self.BATCH)
            ]
            rec = lca.LCARecorder(loss, batches, tol=TOL, batch_size=self.BATCH)
            rec.start(params0)
            self.recorders.append(rec)
            self.weights.append(float(np.mean(sel)))
        self.sums: list = [None] * len(self.recorders)
        self.last: list = [None] * len(self.recorders)

    def __call__(self, params: Any) -> None:
        import jax

        for i, rec in enumerate(self.recorders):
            res = rec(params)
            self.last[i] = res
            self.sums[i] = (
                res.per_param
                if self.sums[i] is None
                else jax.tree.map(lambda a, b: a + b, self.sums[i], res.per_param)
            )

    def results(self) -> list:
        """Per class, the last step's ``LCAResult`` carrying the weighted run totals."""
        import jax

        out = []
        for w, res, tot in zip(self.weights, self.last, self.sums):
            per_param = jax.tree.map(
                lambda a, w=w: np.asarray(a, np.float64) * w, jax.device_get(tot)
            )
            out.append(dataclasses.replace(res, per_param=per_param))
        return out


def record_one_sgd_run(name: str, config: Any, **kwargs: Any):
    """One run of SGD with momentum 0.9 (lr 0.05) through :func:`record_lca`; returns
    ``(LCARun, its RK4 history, layer names, their columns in the history, identity)``."""
    from .._train import Group, Run

    label = f"SGD, mom={MOMENTUM:g} (lr {SGD_LR:g})"
    group = Group("SGD", layerwise_sgd, (Run("sgd", label, sgd_hparams()),))
    task, runs, identity = record_lca(name, config, [group], **kwargs)
    run, names = runs["sgd"], layer_names(task)
    h = run.histories["rk4"]
    return run, h, names, [h.layer_names.index(n) for n in names], identity


def _per_example_loss(apply):
    """``loss(params, (x, y)) -> [B]`` per-example cross-entropy, what LCA allocates."""
    import optax

    def per_example(params, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y)

    return per_example


# ----------------------------------------------------------------------------- numbers


def per_layer_totals(history: Any, names: Sequence[str]) -> dict[str, float]:
    """``{layer: cumulative LCA over the run}`` in the order ``names``."""
    from ... import lca

    cum = lca.cumulative_per_layer(history)
    return {n: float(cum[n][-1]) for n in names}


def loss_curve(history: Any) -> dict[str, list]:
    """The full training-set loss before every step and after the last (what LCA measured)."""
    loss = np.concatenate([history.loss_before[:1], history.loss_after])
    return {"iteration": np.arange(len(loss)).tolist(), "loss": loss.tolist()}


def run_numbers(run: LCARun, names: Sequence[str]) -> dict[str, Any]:
    """JSON-ready numbers of a run: label, cumulative LCA per layer, the training-set loss
    curve LCA measured, the final loss and the error budget."""
    h = run.histories["rk4"]
    return {
        "label": run.label,
        "per_layer": per_layer_totals(h, names),
        "train_loss": loss_curve(h),
        "final_train_loss": float(h.loss_after[-1]),
        "rk4_summary": h.summary(),
    }


def layer_table(
    runs: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    lead: Sequence[str],
    row_lead: Any,
    tail: Mapping[str, str],
) -> str:
    """Markdown table, a row per run: ``row_lead(run)`` cells, the cumulative LCA of each
    layer, then the ``tail`` fields (``{header: key}``)."""
    from .._report import md_table

    rows = [
        [
            *row_lead(r),
            *(f"{r['per_layer'][n]:+.4f}" for n in names),
            *(f"{r[k]:.4f}" for k in tail.values()),
        ]
        for r in runs.values()
    ]
    return md_table([*lead, *(f"LCA {n}" for n in names), *tail], rows)
