"""Full-dataset evaluation: loss, per-class losses, gradients and directional derivatives.

The mean over the **whole** dataset is exact: the data are cut into fixed-size batches and the
last partial batch is never dropped (the authors' code drops it, Lan et al. 2019 say "the
entire training set"). How it is evaluated depends on whether ``loss_fn`` couples the
examples of a batch (``LCAOptions.bn_mode``):

* per-example losses (``"inference"``: no BatchNorm, or BatchNorm on fixed running
  averages): the last batch is padded with copies of real rows and masked, so every batch has
  one shape and one compile;
* coupled losses (``"batch"``: BatchNorm on the statistics of the batch, dropout off — what
  the authors' ``adaptive_calc_gradients.py`` evaluates, with ``batchnorm_learning_phase=1``
  and ``learning_phase=0``): no padded row may enter a batch statistic, so the last
  ``N mod B`` examples are evaluated unpadded as a batch of their own.

``"auto"`` (the default) evaluates the last partial batch under two different paddings once;
if its real examples' losses change, the loss is coupled and ``"batch"`` is used. When ``N``
is a multiple of the batch size nothing is padded and both modes are the same computation.

Per-example losses come back to the host and are summed in float64; gradients are summed on
device in float32 (see :mod:`._engines`). In-memory data stay on the devices, stacked, and one
jitted step per batch indexes them; an iterable of batches runs the same step per batch.

Data parallelism: the batch axis is sharded over all local devices with
``NamedSharding(Mesh(devices, ("batch",)), P(None, "batch"))`` and the parameters replicated;
XLA partitions the per-batch work and all-reduces the sums.

.. note::
   With BatchNorm in inference mode the running averages are state outside ``params``: keep
   them fixed inside ``loss_fn`` for a whole step (or the step's measured loss change
   contains a part no parameter is credited with, which shows up as integration error).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._engines import Kernels, Quantities, get_kernels
from ._options import EVALUATOR_FIELDS, LCAOptions, check_names

DEFAULT_BATCH_SIZE = 2048
# Coupling check: the real rows of a per-example loss are computed by the same program on
# the same values under both paddings, so they agree to the last bit; BatchNorm statistics
# of a batch in which 1 row of B changes move the losses by O(1/B) of their size. 1e-5
# relative separates the two with margin on either side.
COUPLING_RTOL = 1e-5


class Evaluation(NamedTuple):
    """Full-dataset means at one point.

    Attributes:
      loss: mean loss ``L(θ)`` (Python float from a float64 host sum).
      grad: ``∇L(θ)`` (pytree like params, float32) or None.
      class_loss: ``[C]`` per-class shares ``L_c = (1/N) Σ_{y_i = c} ℓ_i`` (they sum to
        ``loss``), or None.
      num_examples: ``N``.
    """

    loss: float
    grad: Any
    class_loss: np.ndarray | None
    num_examples: int


class Point:
    """Full-dataset *sums* at one point ``θ(s)``, fetched lazily.

    A launched point holds device arrays; :func:`fetch` brings a whole list of points to the
    host with one synchronisation (so the points of a step run back to back on the device).

    Attributes (host float64 once fetched, except ``carry``):
      n: number of examples ``N``.
      loss: ``Σ_n ℓ_n``; abs_loss: ``Σ_n |ℓ_n|``; class_loss: ``[C]`` or None.
      carry: device float32 sums ``{"grad": pytree, "class_grads": pytree}`` (requested ones).
      post: ``dots [K]``, ``absdot``, ``class_dots [C, K]`` of ``carry`` with the evaluated Δθ.
      jvp: ``jvp_layers [K]``, ``jvp_classes [C, K]`` (requested ones).
    """

    def __init__(
        self, ev: Any, carry: dict, raw: Any, masks: list, base: Any = None, jvp: Any = None
    ):
        self.ev, self.carry, self._raw, self._masks = ev, carry, raw, masks
        self._base, self._jvp_point = base, jvp  # a reused point: sums of `base`, new direction
        self._sums: dict | None = None

    def redirect(self, raw_post: Any, jvp_point: Any) -> Point:
        """This point's sums along a new direction: new dot products (``raw_post``, device)
        and directional derivatives (``jvp_point``, a launched point), either may be None."""
        return Point(self.ev, self.carry, (raw_post, None), [], base=self, jvp=jvp_point)

    def _fill(self, host: Any) -> None:
        post, smalls = host
        if self._base is None:
            sums = self.ev.reduce(smalls, self._masks)
        else:
            sums = {k: v for k, v in self._base.sums.items() if not k.startswith(("jvp", "post"))}
            if self._jvp_point is not None:
                sums.update({k: v for k, v in self._jvp_point.sums.items() if k.startswith("jvp")})
            post = self._base.sums["post"] if post is None else post
        sums["post"] = {k: np.asarray(v, np.float64) for k, v in post.items()}
        self._sums = sums

    @property
    def sums(self) -> dict:
        if self._sums is None:
            fetch([self])
        return self._sums

    n = property(lambda self: self.sums["n"])
    loss = property(lambda self: self.sums["loss"])
    abs_loss = property(lambda self: self.sums["abs_loss"])
    class_loss = property(lambda self: self.sums.get("class_loss"))
    post = property(lambda self: self.sums["post"])
    jvp = property(lambda self: {k: v for k, v in self.sums.items() if k.startswith("jvp")})


def fetch(points: Sequence[Point]) -> None:
    """Brings every not yet fetched point (and what reused points depend on) to the host with
    one ``jax.device_get``."""
    deps = [p._jvp_point for p in points if p._jvp_point is not None]
    first = [p for p in deps + [p for p in points if p._base is None] if p._sums is None]
    later = [p for p in points if p._base is not None and p._sums is None]
    todo = list(dict.fromkeys(first + later))
    hosts = jax.device_get([p._raw for p in todo])
    for p, h in zip(todo, hosts):
        p._fill(h)


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _kind(data: Any) -> str:
    """``"arrays"`` (a pytree of arrays with a shared leading axis) or ``"batches"``."""
    if isinstance(data, list) or callable(data):
        return "batches"
    leaves = jax.tree.leaves(data)
    if leaves and all(_is_array(x) for x in leaves):
        return "arrays"
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, tuple, dict)):
        return "batches"
    if not leaves:
        raise ValueError("`data` is empty: it holds no arrays.")
    raise TypeError(
        "`data` must be a pytree of arrays sharing a leading example axis (e.g. `(x, y)` or a "
        "dict), a list/iterable of such batches, or a callable returning a fresh iterator of "
        f"batches; got {type(data).__name__} with leaves of types "
        f"{sorted({type(x).__name__ for x in leaves})}."
    )


def _leading(batch: Any, what: str) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError(f"{what} holds no arrays.")
    sizes = set()
    for x in leaves:
        if not _is_array(x) or np.ndim(x) == 0:
            raise ValueError(
                f"{what}: every leaf must be an array with a leading example axis; got "
                f"{type(x).__name__} of shape {np.shape(x)}."
            )
        sizes.add(int(np.shape(x)[0]))
    if len(sizes) != 1:
        raise ValueError(f"{what}: leaves disagree on the example axis length: {sorted(sizes)}.")
    return sizes.pop()


def _check_finite(batch: Any, what: str) -> None:
    for x in jax.tree.leaves(batch):
        if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            raise ValueError(f"{what} contains NaN or inf values; LCA needs a finite dataset.")


def _pad_rows(x: np.ndarray, rows: int, fill: np.ndarray) -> np.ndarray:
    """``x`` followed by rows of ``fill`` (cycled) up to ``rows`` rows."""
    n = x.shape[0]
    if rows == n:
        return x
    idx = np.arange(rows - n) % fill.shape[0]
    return np.concatenate([x, fill[idx]], axis=0)


def hash_tree(tree: Any, h: Any = None) -> Any:
    """Feeds the structure, shapes, dtypes and bytes of ``tree``'s leaves into a blake2b."""
    h = h or hashlib.blake2b(digest_size=16)
    h.update(str(jax.tree.structure(tree)).encode())
    for x in jax.tree.leaves(jax.device_get(tree)):
        x = np.ascontiguousarray(np.asarray(x))
        h.update(f"{x.shape}{x.dtype.str}".encode())
        h.update(x.view(np.uint8).reshape(-1))
    return h


def _host(batch: Any) -> Any:
    return jax.tree.map(np.asarray, batch)


@dataclasses.dataclass
class Layout:
    """Device-resident in-memory data: ``xs``/``mask`` ``[nb, B, ...]`` and an optional
    unpadded remainder batch ``rem = (batch, mask)``."""

    xs: Any
    mask: Any
    host_mask: np.ndarray
    rem: Any
    padded: bool


class Evaluator:
    """Loss, per-class losses and gradients over a whole dataset, data-parallel, compiled once.

    Args:
      loss_fn: ``loss_fn(params, batch) -> [B]`` per-example float losses (the mean is taken
        here). A BatchNorm model may run in batch-statistics mode (the authors' choice;
        dropout off) or inference mode: see ``LCAOptions.bn_mode`` and the module note.
      data: a pytree of arrays sharing a leading example axis (``(x, y)``, a dict, …); or a
        ``list``/re-iterable of such batches (the last may be smaller); or a zero-argument
        callable returning a fresh iterator of batches (for generators). A ``list`` is always
        read as a sequence of batches: pass a tuple for ``(x, y)``.
      labels: ``[N]`` integer class of each example (in-memory ``data`` only), enabling
        per-class losses.
      devices: devices to shard the batch axis over (default ``jax.local_devices()``).
      options: an :class:`LCAOptions`; its ``batch_size``, ``bn_mode``, ``class_fn`` and
        ``num_classes`` are used (also accepted as keyword arguments). The default batch size
        cuts in-memory data into the fewest batches of at most 2048 examples, of equal size
        (no padding waste); with ``bn_mode="inference"`` the batch size is rounded up to a
        multiple of the device count (padding is harmless there), with ``"batch"`` it is kept.

    Attributes:
      kernels: the compiled functions, shared by every Evaluator of the same ``loss_fn``.
      bn_mode: ``"batch"`` or ``"inference"`` once a partial batch was checked, else the option.
      num_evaluations: full-dataset passes so far.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> x = np.arange(10.0, dtype=np.float32)
      >>> ev = Evaluator(lambda w, b: (w * b - 1.0) ** 2, x, batch_size=4)
      >>> e = ev.evaluate(jnp.float32(0.5))
      >>> round(e.loss, 4), np.asarray(e.grad, float).round(4).tolist(), e.num_examples
      (3.625, 19.5, 10)
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], jax.Array],
        data: Any,
        *,
        labels: Any = None,
        devices: Sequence[Any] | None = None,
        options: LCAOptions | None = None,
        **overrides: Any,
    ):
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable(params, batch); got {loss_fn!r}.")
        check_names(overrides, "Evaluator")
        extra = sorted(set(overrides) - set(EVALUATOR_FIELDS))
        if extra:
            raise TypeError(f"`Evaluator` takes the options {EVALUATOR_FIELDS}, not {extra}.")
        self.options = dataclasses.replace(options or LCAOptions(), **overrides)
        o = self.options
        if labels is not None and o.class_fn is not None:
            raise ValueError("Pass either `labels=` or `class_fn=`, not both.")
        if o.class_fn is not None and o.num_classes is None:
            raise ValueError("`class_fn=` needs `num_classes=`.")
        self.loss_fn = loss_fn
        self.devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = Mesh(np.array(self.devices), ("batch",))
        self._default_device_only = self.devices == jax.devices()[:1]
        self._replicated = NamedSharding(self.mesh, P())
        self.kind = _kind(data)
        self.num_evaluations = 0  # full-dataset passes so far (for tests and benchmarks)
        self.labels = self._check_labels(labels)
        self.num_classes = int(self.options.num_classes or 0)
        self._data = data
        self._fingerprint = None
        self.bn_mode = o.bn_mode  # resolved to "batch"/"inference" when a partial batch shows
        self._bn_checked = False
        if self.kind == "arrays":
            self._init_arrays(data)
        else:
            self._init_batches()
        self.kernels: Kernels = get_kernels(
            loss_fn, o.class_fn, self.num_classes, labels_in_batch=self.labels is not None
        )
        self.layout: Layout | None = None  # in-memory data on the devices, after prepare()

    # ------------------------------------------------------------------ construction

    def _check_labels(self, labels):
        if labels is None:
            return None
        if self.kind != "arrays":
            raise ValueError("`labels=` needs in-memory `data`; use `class_fn=` with batches.")
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"`labels` must be a 1-d integer array [N]; got {labels.dtype} {labels.shape}."
            )
        if labels.size and labels.min() < 0:
            raise ValueError("`labels` must be >= 0.")
        if self.options.num_classes is None:
            self.options = self.options.replace(
                num_classes=int(labels.max()) + 1 if labels.size else 1
            )
        elif labels.size and labels.max() >= self.options.num_classes:
            raise ValueError(
                f"Some class labels lie outside [0, num_classes={self.options.num_classes})."
            )
        return labels.astype(np.int32)

    def _init_arrays(self, data):
        n = _leading(data, "`data`")
        if n == 0:
            raise ValueError("`data` is empty: its leading (example) axis has length 0.")
        if self.labels is not None and self.labels.shape[0] != n:
            raise ValueError(f"`labels` has {self.labels.shape[0]} entries but `data` {n}.")
        host = _host(data)
        _check_finite(host, "`data`")
        self._host_data = host if self.labels is None else (host, self.labels)
        self.num_examples = n
        if self.options.batch_size is None:  # as few batches as fit, equal sizes: no padding waste
            self.batch_size = math.ceil(n / math.ceil(n / DEFAULT_BATCH_SIZE))
        else:
            self.batch_size = min(self.options.batch_size, n)
        self.requested_batch_size = self.batch_size

    def _init_batches(self):
        it = self._iterator()
        try:
            first = next(it)
        except StopIteration:
            raise ValueError("`data` is empty: the batch iterable yielded no batch.") from None
        n0 = _leading(first, "the first batch of `data`")
        self.batch_size = self.options.batch_size or n0
        self.requested_batch_size = self.batch_size
        self._treedef = jax.tree.structure(first)
        self._first_rows = _host(first)
        self.num_examples = None  # counted on each pass

    def _iterator(self):
        if callable(self._data):
            it = self._data()
        else:
            it = iter(self._data)
            if it is self._data:
                raise TypeError(
                    "`data` is a one-shot iterator, but LCA reads the dataset several times per "
                    "step: pass a list, a re-iterable dataset, or a callable returning a fresh "
                    "iterator."
                )
        return iter(it)

    def _sharding(self, rows: int, stacked: bool) -> NamedSharding:
        """Batch axis split over the devices when it divides evenly, else replicated."""
        if rows % len(self.devices):
            return self._replicated
        return NamedSharding(self.mesh, P(None, "batch") if stacked else P("batch"))

    # ------------------------------------------------------------------ bn_mode

    def _coupled(self, params: Any, rows: Any, m: int, b: int, fill: Any) -> bool:
        """Do the losses of the ``m`` real rows of ``rows`` change with the padding?

        Coupling is a property of the loss function's structure (BatchNorm on the batch), so
        the answer is cached with the compiled kernels, per batch shape.
        """
        key = (jax.tree.structure(rows), m, b) + tuple(
            (np.shape(x)[1:], np.dtype(x.dtype).str) for x in jax.tree.leaves(rows)
        )
        if key not in self.kernels.coupling:
            self.kernels.coupling[key] = self._padding_changes_losses(params, rows, m, b, fill)
        return self.kernels.coupling[key]

    def _padding_changes_losses(self, params, rows, m, b, fill) -> bool:
        first = jax.tree.map(lambda x, f: _pad_rows(x[:m], b, f[:1]), rows, fill)

        def shifted(x):  # the padding rows' floating values moved by 1
            if not np.issubdtype(x.dtype, np.inexact):
                return x
            return np.concatenate([x[:m], x[m:] + np.ones((), x.dtype)])

        a, c = (
            np.asarray(self.kernels.losses(params, p), np.float64)[:m]
            for p in (first, jax.tree.map(shifted, first))
        )
        scale = max(float(np.max(np.abs(a))), np.finfo(np.float32).tiny)
        # NaN compares False: a loss that is NaN on real rows counts as coupled (no padding)
        return not bool(np.all(np.abs(a - c) <= COUPLING_RTOL * scale))

    def _resolve_bn_mode(self, params: Any, rows: Any, m: int, b: int, fill: Any) -> str:
        """Decides, once, whether a partial batch of ``m < b`` rows may be padded."""
        if self.bn_mode == "batch" or self._bn_checked:
            return self.bn_mode
        coupled = self._coupled(params, rows, m, b, fill)
        if coupled and self.bn_mode == "inference":
            raise ValueError(
                "`bn_mode='inference'`, but `loss_fn` couples the examples of a batch (the "
                "losses of real examples change with the padding rows: BatchNorm in "
                "batch-statistics mode?). Pass `bn_mode='batch'` (or 'auto')."
            )
        self.bn_mode = "batch" if coupled else "inference"
        self._bn_checked = True
        return self.bn_mode

    def prepare(self, params: Any) -> None:
        """Resolves ``bn_mode`` and places in-memory data on the devices (done on first use)."""
        if self.kind != "arrays" or self.layout is not None:
            return
        data, n, b = self._host_data, self.num_examples, self.batch_size
        r = n % b
        mode = "exact"  # every batch full: nothing padded, both modes are the same
        if r:
            tail = jax.tree.map(lambda x: x[n - r :], data)
            mode = self._resolve_bn_mode(params, tail, r, b, data)
        if mode == "inference":  # padding is harmless: fill every device
            b = len(self.devices) * math.ceil(b / len(self.devices))
            self.batch_size = b
        nb = n // b if mode == "batch" else math.ceil(n / b)
        rows = nb * b
        xs = jax.tree.map(
            lambda x: _pad_rows(x[:rows], rows, x).reshape((nb, b) + x.shape[1:]), data
        )
        mask = (np.arange(rows) < n).reshape(nb, b)
        dev_xs, dev_mask = jax.device_put((xs, mask), self._sharding(b, stacked=True))
        rem = None
        if mode == "batch" and n > rows:
            rem = (jax.tree.map(lambda x: x[rows:], data), np.ones(n - rows, bool))
            rem = jax.device_put(rem, self._sharding(n - rows, stacked=False))
        self.layout = Layout(dev_xs, dev_mask, mask.reshape(-1), rem, padded=rows > n)

    # ------------------------------------------------------------------ running

    def replicate(self, tree: Any) -> Any:
        """``tree`` on every device of this evaluator (how params and Δθ are placed)."""
        if self._default_device_only:  # jit places it (no per-leaf device_put)
            return tree
        return jax.device_put(tree, self._replicated)

    def _put(self, base, delta, s):
        return self.replicate(base), self.replicate(delta), self.replicate(np.float32(s))

    def _begin(self, base, delta, s, q):
        """``(θ(s), Δθ, zero sums)`` on this evaluator's devices."""
        base, delta, s = self._put(base, delta, s)
        params, zeros = self.kernels.start(base, delta, s, q=q)
        return params, delta, zeros

    def _run_arrays(self, base, delta, s, q):
        self.prepare(base)
        lay = self.layout
        if lay.host_mask.shape[0] == self.batch_size and lay.rem is None:  # one batch
            carry, small, post = self.kernels.single(
                *self._put(base, delta, s), lay.xs, lay.mask, q=q
            )
            return carry, post, [small], [lay.host_mask]
        params, delta, carry = self._begin(base, delta, s, q)
        smalls = []
        for i in range(lay.host_mask.shape[0] // self.batch_size):
            carry, small = self.kernels.step(
                carry, params, delta, lay.xs, lay.mask, np.int32(i), q=q
            )
            smalls.append(small)
        masks = [lay.host_mask]
        if lay.rem is not None:  # the unpadded last batch (bn_mode="batch")
            carry, small = self.kernels.step_batch(carry, params, delta, *lay.rem, q=q)
            smalls.append(small)
            masks.append(np.ones(lay.rem[1].shape[0], bool))
        return carry, self.kernels.finish(carry, delta, q=q), smalls, masks

    def _batch_for_step(self, batch, i, params):
        """Host copy of batch ``i`` as it is evaluated (padded or not) and its mask."""
        if jax.tree.structure(batch) != self._treedef:
            raise ValueError(f"Batch {i} of `data` has a different tree structure.")
        m = _leading(batch, f"batch {i} of `data`")
        b = self.batch_size
        if m > b:
            raise ValueError(f"Batch {i} of `data` has {m} examples, more than `batch_size` = {b}.")
        batch = _host(batch)
        _check_finite(batch, f"`data` (batch {i})")
        if m < b and self._resolve_bn_mode(params, batch, m, b, self._first_rows) == "batch":
            return batch, np.ones(m, bool)
        fill = batch if m else self._first_rows
        return jax.tree.map(lambda x, f: _pad_rows(x, b, f), batch, fill), np.arange(b) < m

    def _run_batches(self, base, delta, s, q):
        params, delta, carry = self._begin(base, delta, s, q)
        smalls, masks = [], []
        for i, batch in enumerate(self._iterator()):
            if _leading(batch, f"batch {i} of `data`") == 0:
                continue
            batch, mask = self._batch_for_step(batch, i, base)
            dev = jax.device_put((batch, mask), self._sharding(mask.shape[0], stacked=False))
            carry, small = self.kernels.step_batch(carry, params, delta, *dev, q=q)
            smalls.append(small)
            masks.append(mask)
        if not masks:
            raise ValueError("`data` is empty: the batch iterable yielded no examples.")
        return carry, self.kernels.finish(carry, delta, q=q), smalls, masks

    def reduce(self, smalls, masks) -> dict:
        """Float64 host sums over the real rows of every batch."""
        mask = np.concatenate(masks)
        losses = np.concatenate([np.asarray(s["losses"], np.float64) for s in smalls])[mask]
        if not losses.size:
            raise ValueError("`data` is empty: the batch iterable yielded no examples.")
        out = {"n": int(mask.sum()), "loss": float(np.sum(losses))}
        out["abs_loss"] = float(np.sum(np.abs(losses)))
        if not np.isfinite(out["loss"]):
            raise ValueError(
                "`loss_fn` returned NaN or inf on the dataset (full-dataset loss sum = "
                f"{out['loss']}); check the parameters and the loss."
            )
        if self.num_classes:
            classes = np.concatenate([np.asarray(s["classes"]) for s in smalls])[mask]
            if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
                raise ValueError(
                    f"Some class labels lie outside [0, num_classes={self.num_classes})."
                )
            out["class_loss"] = np.bincount(classes, losses, minlength=self.num_classes)
        for k in ("jvp_layers", "jvp_classes"):
            if k in smalls[0]:
                out[k] = np.sum([np.asarray(s[k], np.float64) for s in smalls], axis=0)
        if self.kind == "batches":
            self.num_examples = out["n"]
        return out

    def launch(self, base: Any, delta: Any, s: float, q: Quantities) -> Point:
        """Starts the full-dataset sums at ``base + s·delta`` (see :class:`Point`, :func:`fetch`)."""
        if self.kind == "arrays":
            carry, post, smalls, masks = self._run_arrays(base, delta, s, q)
        else:
            carry, post, smalls, masks = self._run_batches(base, delta, s, q)
        self.num_evaluations += 1
        return Point(self, carry, (post, smalls), masks)

    def run(self, base: Any, delta: Any, s: float, q: Quantities) -> Point:
        """Full-dataset sums at ``base + s·delta``, fetched."""
        pt = self.launch(base, delta, s, q)
        fetch([pt])
        return pt

    # ------------------------------------------------------------------ public

    def evaluate(self, params: Any, *, grad: bool = True) -> Evaluation:
        """Mean loss (and gradient, per-class losses) over the whole dataset at ``params``."""
        zeros = jax.tree.map(jnp.zeros_like, params)
        pt = self.run(params, zeros, 0.0, Quantities(grad=grad))
        inv = jnp.float32(1.0 / pt.n)
        return Evaluation(
            loss=pt.loss / pt.n,
            grad=jax.tree.map(lambda g: g * inv, pt.carry["grad"]) if grad else None,
            class_loss=pt.class_loss / pt.n if pt.class_loss is not None else None,
            num_examples=pt.n,
        )

    __call__ = evaluate

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the data: example count, per-example shapes/dtypes and a content hash
        (blake2b of every leaf's bytes and the labels); an iterable is read once for it."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            if self.kind == "arrays":
                hash_tree(self._host_data, h)
                n, tree = self.num_examples, self._host_data
            else:
                n, tree = 0, self._first_rows
                for batch in self._iterator():
                    hash_tree(_host(batch), h)
                    n += _leading(batch, "a batch of `data`")
            self._fingerprint = {
                "num_examples": int(n),
                "leaves": [
                    [list(np.shape(x)[1:]), np.dtype(x.dtype).str] for x in jax.tree.leaves(tree)
                ],
                "hash": h.hexdigest(),
            }
        return self._fingerprint


def evaluate(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    *,
    grad: bool = True,
    labels: Any = None,
    options: LCAOptions | None = None,
    **overrides: Any,
) -> Evaluation:
    """One-shot full-dataset mean loss and gradient (see :class:`Evaluator`).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> x = np.ones((5, 2), np.float32); y = np.array([0, 1, 1, 0, 1])
      >>> e = evaluate(lambda w, b: jnp.sum(b[0] * w, -1), jnp.ones(2), (x, y), labels=y)
      >>> e.loss, np.asarray(e.class_loss, float).round(4).tolist()
      (2.0, [0.8, 1.2])
    """
    check_names(overrides, "evaluate")
    ev = make_evaluator(
        loss_fn, data, labels, dataclasses.replace(options or LCAOptions(), **overrides)
    )
    return ev.evaluate(params, grad=grad)


def make_evaluator(loss_fn, data, labels, options: LCAOptions) -> Evaluator:
    """``data`` itself when it is an :class:`Evaluator` (whose data options must not be
    contradicted), else a new one over ``data``."""
    if not isinstance(data, Evaluator):
        return Evaluator(loss_fn, data, labels=labels, options=options)
    if loss_fn is not None and loss_fn is not data.loss_fn:
        raise ValueError("`data` is an Evaluator of another `loss_fn`: pass `loss_fn=None`.")
    clash = [
        k
        for k in EVALUATOR_FIELDS
        if getattr(options, k) is not None
        and getattr(options, k) != getattr(LCAOptions(), k)
        and getattr(options, k) != getattr(data.options, k)
    ]
    if labels is not None or clash:
        raise ValueError(
            "`data` is an Evaluator: set `labels`/`batch_size`/`bn_mode`/`class_fn`/"
            f"`num_classes` on the Evaluator instead (got {clash or ['labels']})."
        )
    return data
