r"""Flat metrics for the loggers researchers already use: TensorBoard, W&B, ``clu``.

The measurements of :mod:`optax_layca.rotation` and :mod:`optax_layca.lca` are nested
(``{figure: {layer path: array}}``, dataclasses of per-layer arrays). A metric writer wants
one flat ``{name: number}`` dict per step. :func:`flatten` turns any of

* an optimizer state holding a :func:`~optax_layca.rotation.track_rotation` state (found
  anywhere inside it, as :meth:`RotationHistory.record <optax_layca.rotation.RotationHistory.record>`
  finds it; ``nnx.Optimizer`` states too): the figures after the last update;
* a :class:`~optax_layca.rotation.RotationHistory`: one record (the latest by default) or,
  with :func:`flatten_all`, every record;
* an :class:`~optax_layca.lca.LCAResult` or one row of an :class:`~optax_layca.lca.LCAHistory`

into :class:`Metrics`: scalars named ``<wing>/<figure>/<layer path>`` and histograms for
per-unit or stacked layers. :func:`write` sends them to a writer, one call per record:

* a ``clu.metric_writers.MetricWriter``: ``write_scalars(step, scalars)`` and
  ``write_histograms(step, histograms)``;
* a ``tensorboardX.SummaryWriter`` (or ``torch.utils.tensorboard.SummaryWriter``):
  ``add_scalar(name, value, global_step=step)`` and ``add_histogram(name, values,
  global_step=step)``;
* ``wandb`` (the module) or a ``wandb`` run: ``log({**scalars, name: wandb.Histogram(v)},
  step=step)``.

Names (``<path>`` is a layer path such as ``Dense_0/kernel``):

* ``rotation/cosine_distance/<path>``, ``rotation/step_angle/<path>``,
  ``rotation/cumulative_angle/<path>``, ``rotation/grad_norm/<path>``,
  ``rotation/weight_norm/<path>``, ``rotation/update_norm/<path>`` (every figure of
  :data:`~optax_layca.rotation.FIGURES`, and any ``extra=`` figure of the history); from a
  history recorded with ``params=`` at epoch ends, ``rotation/epoch_rotation/<path>`` at those
  records;
* ``lca/per_layer/<layer>``, ``lca/total``, ``lca/loss_change``, ``lca/loss_before``,
  ``lca/loss_after``, ``lca/error``, ``lca/num_splits``, ``lca/converged`` (0 or 1), any
  other scalar field of the result, ``lca/per_class`` (allocated total of each class's loss)
  and ``lca/class_loss_change`` with labels, ``lca/per_param/<leaf>`` histograms when the
  ``"grad"`` engine ran, ``lca/per_leaf/<leaf>`` with ``leaves=True``, and nested results
  (a test-set allocation) under ``lca/<field>/…``.

A value with more than ``max_split`` entries (per-unit figures, a long stack of layers)
becomes a histogram under its name; a shorter one becomes one scalar per entry,
``<name>/<i>`` (``<name>/<i>.<j>`` for 2-D: TensorBoard tags allow only ``[-/\w.]``, so not
the ``<name>[i]`` of the figures' legends). Non-finite entries are never dropped silently: scalars keep NaN/inf, and a histogram
(which cannot hold them) is made of the finite entries with ``<name>/num_nonfinite`` beside it.

Where it sits: this module reads both measurement wings (``rotation`` and ``lca``) and
imports nothing from ``plot``, so it lives beside them at the top level rather than inside
either (``rotation`` importing ``lca``, or the reverse, would tie two independent
measurements together). It needs only numpy: the writers are optional
(``pip install optax-layca[logging]``) and are never imported here, except ``wandb``, to
wrap histograms, when a W&B run is the writer.

Reading the state is a host sync: write every ``k`` steps, e.g. when
``RotationHistory.record`` keeps a record, not inside the jitted step.

Examples:
  >>> import jax.numpy as jnp, optax
  >>> from optax_layca import metrics, track_rotation
  >>> params = {"Dense_0": {"kernel": jnp.eye(2)}, "Dense_1": {"kernel": jnp.ones((2, 3))}}
  >>> tx = track_rotation(optax.sgd(0.1))
  >>> state = tx.init(params)
  >>> grads = {"Dense_0": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]])},
  ...          "Dense_1": {"kernel": jnp.zeros((2, 3))}}
  >>> _, state = tx.update(grads, state, params)
  >>> m = metrics.flatten(state)
  >>> m.step, round(m.scalars["rotation/step_angle/Dense_0/kernel"], 5)  # atan(0.1 / √2)
  (1, 0.07059)
  >>> sorted(k for k in m.scalars if k.startswith("rotation/cosine_distance/"))
  ['rotation/cosine_distance/Dense_0/kernel', 'rotation/cosine_distance/Dense_1/kernel']

Recipes (``step`` is the number of updates applied, the monitor's ``rotation_step``)::

  # TensorBoard (pip install tensorboardX): tensorboard --logdir runs
  from tensorboardX import SummaryWriter
  writer = SummaryWriter("runs/layca")
  if step % 100 == 0:
      metrics.write(writer, opt_state)                 # step read from the monitor
  metrics.write(writer, lca_result, step=step)         # an LCAResult needs its step
  metrics.write(writer, history, record=None)          # a whole RotationHistory, after the run

  # Weights & Biases (pip install wandb); WANDB_MODE=offline works without a network
  run = wandb.init(project="layca")
  metrics.write(run, opt_state)                        # or metrics.write(wandb, ...)

  # clu (needs TensorFlow for its SummaryWriter; LoggingWriter and AsyncWriter work alike)
  from clu import metric_writers
  writer = metric_writers.create_default_writer("runs/layca")
  metrics.write(writer, opt_state)
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from ._base import unwrap_variables
from ._layers import path_str
from .rotation import RotationHistory
from .rotation._monitor import FIGURES, find_monitor_state

__all__ = ["Metrics", "flatten", "flatten_all", "write"]

_SPLIT = 16  # default ``max_split``: 12 stacked transformer blocks stay scalars, units do not
# LCA fields with a dedicated treatment below, or not an allocation (a gradient, names).
_LCA_SPECIAL = frozenset(
    {
        "per_layer",
        "per_leaf",
        "per_class",
        "per_class_leaf",
        "class_loss_change",
        "per_param",
        "grad_before",
        "iterations",
        "layer_names",
        "leaf_names",
        "method",
    }
)
# Properties (not dataclass fields) an LCA result may expose: read if present.
_LCA_PROPERTIES = ("per_layer", "per_class", "layer_names", "relative_error")


class Metrics(NamedTuple):
    """One record, flat.

    Attributes:
      step: the training step of the record (None when the source does not know it, e.g. an
        :class:`~optax_layca.lca.LCAResult`; pass ``step=`` to :func:`write`).
      scalars: ``{name: float}``; NaN and inf kept.
      histograms: ``{name: float64 array}`` of the finite entries of longer vectors.
    """

    step: int | None
    scalars: dict[str, float]
    histograms: dict[str, np.ndarray]


class _Sink:
    """Collects ``(name, value)`` pairs into scalars and histograms by the ``max_split`` rule."""

    def __init__(self, max_split: int):
        self.max_split = max_split
        self.scalars: dict[str, float] = {}
        self.histograms: dict[str, np.ndarray] = {}

    def put(self, name: str, value: Any) -> None:
        a = np.asarray(value)
        if a.dtype == bool:
            a = a.astype(np.float64)
        if not np.issubdtype(a.dtype, np.number):
            return  # names, methods: not a metric
        a = a.astype(np.float64)
        if a.ndim == 0:
            self.scalars[name] = float(a)
        elif a.size <= self.max_split:
            for idx in np.ndindex(a.shape):
                self.scalars[f"{name}/{'.'.join(map(str, idx))}"] = float(a[idx])
        else:
            self.histogram(name, a)

    def histogram(self, name: str, values: Any) -> None:
        """The finite entries as a histogram; how many were not, as ``<name>/num_nonfinite``."""
        flat = np.asarray(values, np.float64).ravel()
        finite = flat[np.isfinite(flat)]
        if finite.size:
            self.histograms[name] = finite
        if finite.size < flat.size:
            self.scalars[f"{name}/num_nonfinite"] = float(flat.size - finite.size)

    def put_tree(self, prefix: str, tree: Mapping[str, Any]) -> None:
        for path, value in tree.items():
            self.put(f"{prefix}/{path}", value)

    def metrics(self, step: int | None) -> Metrics:
        return Metrics(None if step is None else int(step), self.scalars, self.histograms)


def _check_split(max_split: Any) -> int:
    if isinstance(max_split, bool) or not isinstance(max_split, (int, np.integer)):
        raise TypeError(f"`flatten(max_split=...)` must be an int >= 0; got {max_split!r}.")
    if max_split < 0:
        raise ValueError(f"`flatten(max_split=...)` must be an int >= 0; got {max_split}.")
    return int(max_split)


def _is_lca(obj: Any) -> bool:
    return all(hasattr(obj, name) for name in ("total", "loss_change", "per_layer"))


def _is_lca_history(obj: Any) -> bool:
    return _is_lca(obj) and np.ndim(obj.total) == 1


def _lca_fields(obj: Any) -> dict[str, Any]:
    """``{name: value}`` of a result's fields and of the properties it exposes."""
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
    elif hasattr(obj, "_fields"):
        names = list(obj._fields)
    else:
        names = [k for k in vars(obj) if not k.startswith("_")]
    out = {name: getattr(obj, name) for name in names}
    for name in _LCA_PROPERTIES:
        if name not in out and hasattr(obj, name):
            out[name] = getattr(obj, name)
    return out


def _by_name(values: Any, names: Any) -> dict[str, Any]:
    """A per-layer value as ``{name: number}``: a dict already, or an array over ``names``."""
    if isinstance(values, Mapping):
        return dict(values)
    values = np.asarray(values)
    if names is None or values.shape[-1:] != (len(names),):
        raise ValueError(f"Per-layer values of shape {values.shape} do not match names {names}.")
    return dict(zip(names, values))


def _lca_row(history: Any, t: int) -> dict[str, Any]:
    """Row ``t`` of an ``LCAHistory`` as result-like fields (per-layer arrays keyed by name)."""
    fields = _lca_fields(history)
    steps = len(history)
    row: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None or isinstance(value, (str, tuple)):
            continue
        if _is_lca_history(value):
            row[name] = _lca_row(value, t)
        elif isinstance(value, Mapping):
            row[name] = {k: np.asarray(v)[t] for k, v in value.items()}
        elif np.ndim(value) >= 1 and np.shape(value)[0] == steps:
            row[name] = np.asarray(value)[t]
    for kind in ("layer", "leaf"):  # per_layer[t] over layer_names, per_leaf[t] over leaf_names
        if f"per_{kind}" in row:
            row[f"per_{kind}"] = _by_name(row[f"per_{kind}"], fields.get(f"{kind}_names"))
    return row


def _flatten_lca(sink: _Sink, prefix: str, fields: Mapping[str, Any], leaves: bool) -> None:
    sink.put_tree(f"{prefix}/per_layer", _by_name(fields["per_layer"], fields.get("layer_names")))
    if leaves and fields.get("per_leaf") is not None:
        sink.put_tree(f"{prefix}/per_leaf", _by_name(fields["per_leaf"], fields.get("leaf_names")))
    per_class = fields.get("per_class")
    if per_class is None:
        per_class = fields.get("per_class_leaf")
    if per_class is not None:  # [C, K]: allocated total of each class's share of the loss
        sink.put(f"{prefix}/per_class", np.asarray(per_class, np.float64).sum(axis=-1))
    if fields.get("class_loss_change") is not None:
        sink.put(f"{prefix}/class_loss_change", fields["class_loss_change"])
    per_param = fields.get("per_param")
    if per_param is not None:
        flat = jax.tree_util.tree_flatten_with_path(jax.device_get(per_param))[0]
        for p, x in flat:
            sink.histogram(f"{prefix}/per_param/{path_str(p)}", x)
    for name, value in fields.items():
        if name in _LCA_SPECIAL or value is None:
            continue
        if _is_lca(value):  # a nested allocation (the test set along the same path)
            _flatten_lca(sink, f"{prefix}/{name}", _lca_fields(value), leaves)
        elif isinstance(value, Mapping) and "per_layer" in value:  # a nested history row
            _flatten_lca(sink, f"{prefix}/{name}", value, leaves)
        elif isinstance(value, Mapping):
            sink.put_tree(f"{prefix}/{name}", value)
        elif np.ndim(value) == 0:
            sink.put(f"{prefix}/{name}", value)


def _history_record(sink: _Sink, prefix: str, hist: RotationHistory, i: int) -> int:
    """Record ``i`` of a history into ``sink``; returns its step."""
    for name in hist.names:
        sink.put_tree(f"{prefix}/{name}", {p: v[i] for p, v in hist.get(name).items()})
    epoch = hist.epochs[i]
    if not np.isnan(epoch):
        try:
            epochs, rot = hist.per_epoch_rotation()
        except ValueError:  # no per-epoch rotation recorded (no params= at epoch ends)
            return int(hist.steps[i])
        # the record at the end of epoch e carries the rotation during epoch e
        if np.any(epochs == epoch):
            j = int(np.flatnonzero(epochs == epoch)[-1])
            sink.put_tree(f"{prefix}/epoch_rotation", {p: v[j] for p, v in rot.items()})
    return int(hist.steps[i])


def _record_index(record: Any, n: int, where: str) -> int:
    if isinstance(record, bool) or not isinstance(record, (int, np.integer)):
        raise TypeError(f"`{where}(record=...)` must be an int index; got {record!r}.")
    if not -n <= record < n:
        raise IndexError(f"`{where}(record={record})` is out of range for {n} records.")
    return int(record) % n


def flatten(
    source: Any,
    *,
    record: int = -1,
    prefix: str | None = None,
    max_split: int = _SPLIT,
    leaves: bool = False,
) -> Metrics:
    """One record of a measurement as flat :class:`Metrics`.

    Args:
      source: an optimizer state containing a ``track_rotation`` state (any nesting, also an
        ``nnx.Optimizer``'s ``opt_state``), a ``RotationHistory``, an ``LCAResult`` or an
        ``LCAHistory``.
      record: which record of a history (an index into its records, default the latest);
        ignored for a state or a single result.
      prefix: first part of every name (default ``"rotation"`` or ``"lca"``).
      max_split: values with at most this many entries become one scalar per entry, longer
        ones a histogram.
      leaves: also write LCA per parameter leaf (``lca/per_leaf/<leaf>``), when the result
        keeps that view beside the per-layer one.

    Returns:
      :class:`Metrics` ``(step, scalars, histograms)``; ``step`` is the monitor's
      ``rotation_step``, the history's step or the LCA history's iteration, None for a single
      ``LCAResult``.
    """
    sink = _Sink(_check_split(max_split))
    if isinstance(source, RotationHistory):
        i = _record_index(record, len(source), "flatten")
        step = _history_record(sink, prefix or "rotation", source, i)
        return sink.metrics(step)
    if _is_lca_history(source):
        i = _record_index(record, len(source), "flatten")
        _flatten_lca(sink, prefix or "lca", _lca_row(source, i), leaves)
        its = source.iterations if getattr(source, "iterations", None) is not None else None
        return sink.metrics(int(its[i]) if its is not None else i)
    if _is_lca(source):
        _flatten_lca(sink, prefix or "lca", _lca_fields(source), leaves)
        return sink.metrics(None)
    mon = find_monitor_state(unwrap_variables(source))
    if mon is None:
        raise TypeError(
            "`flatten(source=...)` must be an optimizer state containing a `track_rotation` "
            "state, a RotationHistory, an LCAResult or an LCAHistory; got "
            f"{type(source).__name__}."
        )
    figures, step = jax.device_get(({n: getattr(mon, n) for n in FIGURES}, mon.rotation_step))
    for name, per_layer in figures.items():
        sink.put_tree(f"{prefix or 'rotation'}/{name}", per_layer)
    return sink.metrics(int(step))


def flatten_all(source: Any, **kwargs: Any) -> Iterator[Metrics]:
    """Every record of a ``RotationHistory`` / ``LCAHistory`` as :class:`Metrics`, in order.

    A state or a single result gives its one record. Keyword arguments are those of
    :func:`flatten`.
    """
    if "record" in kwargs:
        raise TypeError("`flatten_all` takes every record: use `flatten(record=...)` for one.")
    many = isinstance(source, RotationHistory) or _is_lca_history(source)
    for i in range(len(source)) if many else [-1]:
        yield flatten(source, record=i, **kwargs)


def _is_wandb(writer: Any) -> bool:
    module = writer.__name__ if isinstance(writer, types.ModuleType) else type(writer).__module__
    return module.split(".")[0] == "wandb"


def _emit(writer: Any, m: Metrics) -> None:
    """Sends one record to a clu, TensorBoard or W&B writer."""
    if hasattr(writer, "write_scalars"):  # clu.metric_writers.MetricWriter
        if m.scalars:
            writer.write_scalars(m.step, m.scalars)
        if m.histograms:
            writer.write_histograms(m.step, m.histograms)
    elif hasattr(writer, "add_scalar"):  # tensorboardX / torch.utils.tensorboard
        for name, value in m.scalars.items():
            writer.add_scalar(name, value, global_step=m.step)
        for name, values in m.histograms.items():
            writer.add_histogram(name, values, global_step=m.step)
    elif _is_wandb(writer):
        import wandb  # the writer is a wandb run: wandb is installed

        hists = {name: wandb.Histogram(values) for name, values in m.histograms.items()}
        writer.log({**m.scalars, **hists}, step=m.step)
    else:
        raise TypeError(
            "`write(writer=...)` must be a clu MetricWriter (write_scalars), a TensorBoard "
            "SummaryWriter (add_scalar) or wandb / a wandb run; got "
            f"{type(writer).__name__}."
        )


def write(
    writer: Any,
    source: Any,
    step: int | None = None,
    *,
    record: int | None = -1,
    **kwargs: Any,
) -> int:
    """Writes a measurement to a clu, TensorBoard or W&B writer (see the module docstring).

    Args:
      writer: a ``clu.metric_writers.MetricWriter``, a ``tensorboardX`` /
        ``torch.utils.tensorboard`` ``SummaryWriter``, the ``wandb`` module or a ``wandb`` run.
      source: what :func:`flatten` takes.
      step: the step to write at (default: the record's own step; required for an
        ``LCAResult``). Only with a single record.
      record: index of the history record to write (default the latest), or None for every
        record of a history, each at its own step.
      **kwargs: ``prefix``, ``max_split``, ``leaves`` as for :func:`flatten`.

    Returns:
      The number of records written.
    """
    if record is None:
        if step is not None:
            raise ValueError("`write(step=...)` needs a single record; every record keeps its own.")
        records = list(flatten_all(source, **kwargs))
    else:
        records = [flatten(source, record=record, **kwargs)]
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
                raise TypeError(f"`write(step=...)` must be an int; got {step!r}.")
            records = [records[0]._replace(step=int(step))]
    for m in records:
        if m.step is None:
            raise ValueError(
                "`write(step=...)` is needed: an LCAResult does not know its training step."
            )
        _emit(writer, m)
    return len(records)
