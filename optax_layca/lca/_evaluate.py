"""Full-dataset evaluation: loss, per-class losses, gradients and directional derivatives.

The mean over the **whole** dataset is exact: the data are cut into fixed-size batches, the last
partial batch is padded (with copies of the first example) and masked, never dropped, and the sum
is divided by the true example count. In-memory data run as one jitted ``lax.scan`` over the
stacked batches; an iterable of batches runs one jitted step per batch (same body, one compile).
Per-batch scalars (loss sums, directional derivatives) come back as a stack and are reduced on
the host in float64; gradients are accumulated on device in float32.

Data parallelism: the batch axis is sharded over all local devices with
``NamedSharding(Mesh(devices, ("batch",)), P(None, "batch"))`` and the parameters replicated; XLA
partitions the per-batch work and all-reduces the sums, so the same code runs on one CPU, eight
host devices or a GPU/TPU slice (the batch size is rounded up to a multiple of the device count).

.. note::
   ``loss_fn(params, batch)`` is called as given: for models with BatchNorm or dropout it is the
   caller's job to run the model in inference mode (running statistics, dropout off), e.g.
   ``model.apply(variables, x, train=False)`` or ``nnx.view(model, deterministic=True)``/
   ``model.eval()``. LCA measures the training-set loss landscape, so an inference-mode loss is
   what the paper uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._engines import Quantities, make_batch_fn

DEFAULT_BATCH_SIZE = 1024


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


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    n = x.shape[0]
    if rows == n:
        return x
    return np.concatenate([x, np.repeat(x[:1], rows - n, axis=0)], axis=0)


class Evaluator:
    """Loss, per-class losses and gradients over a whole dataset, data-parallel, jitted once.

    Args:
      loss_fn: ``loss_fn(params, batch) -> [B]`` per-example losses (the mean is taken here).
        Run BatchNorm/dropout models in inference mode inside it (see the module note).
      data: a pytree of arrays sharing a leading example axis (``(x, y)``, a dict, …); or a
        ``list``/re-iterable of such batches (the last may be smaller); or a zero-argument
        callable returning a fresh iterator of batches (for generators). A ``list`` is always
        read as a sequence of batches: pass a tuple for ``(x, y)``.
      batch_size: examples per scanned batch (default ``min(N, 1024)`` for arrays, the first
        batch's size for iterables), rounded up to a multiple of the device count.
      labels: ``[N]`` integer class of each example (in-memory ``data`` only), enabling
        per-class losses.
      class_fn: ``class_fn(batch) -> [B]`` integer classes, the alternative to ``labels``
        (needs ``num_classes``).
      num_classes: number of classes ``C`` (default ``max(labels) + 1``).
      devices: devices to shard the batch axis over (default ``jax.local_devices()``).

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
        batch_size: int | None = None,
        labels: Any = None,
        class_fn: Callable[[Any], jax.Array] | None = None,
        num_classes: int | None = None,
        devices: Sequence[Any] | None = None,
    ):
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable(params, batch); got {loss_fn!r}.")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive int; got {batch_size!r}.")
        if labels is not None and class_fn is not None:
            raise ValueError("Pass either `labels=` or `class_fn=`, not both.")
        self.devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = Mesh(np.array(self.devices), ("batch",))
        self._replicated = NamedSharding(self.mesh, P())
        ndev = len(self.devices)
        self.kind = _kind(data)
        self.num_evaluations = 0  # full-dataset passes so far (for tests and benchmarks)

        if labels is not None:
            if self.kind != "arrays":
                raise ValueError("`labels=` needs in-memory `data`; use `class_fn=` with batches.")
            labels = np.asarray(labels)
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(
                    f"`labels` must be a 1-d integer array [N]; got {labels.dtype} {labels.shape}."
                )
            if labels.size and labels.min() < 0:
                raise ValueError("`labels` must be >= 0.")
            if num_classes is None:
                num_classes = int(labels.max()) + 1 if labels.size else 0
            user_loss = loss_fn
            data = (data, labels)
            loss_fn = lambda p, b: user_loss(p, b[0])
            class_fn = lambda b: b[1]
        elif class_fn is not None:
            if not callable(class_fn):
                raise TypeError(f"`class_fn` must be callable(batch) -> [B]; got {class_fn!r}.")
            if num_classes is None:
                raise ValueError("`class_fn=` needs `num_classes=`.")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"`num_classes` must be a positive int; got {num_classes!r}.")
        self.num_classes = int(num_classes or 0)
        self.loss_fn = loss_fn
        self._batch_fn = make_batch_fn(loss_fn, class_fn, self.num_classes)

        if self.kind == "arrays":
            n = _leading(data, "`data`")
            if n == 0:
                raise ValueError("`data` is empty: its leading (example) axis has length 0.")
            b = min(batch_size or DEFAULT_BATCH_SIZE, n)
            b = ndev * math.ceil(b / ndev)
            nb = math.ceil(n / b)
            mask = (np.arange(nb * b) < n).reshape(nb, b)
            stacked = jax.tree.map(
                lambda x: _pad_rows(np.asarray(x), nb * b).reshape((nb, b) + np.shape(x)[1:]),
                data,
            )
            sharding = NamedSharding(self.mesh, P(None, "batch"))
            self._xs = jax.device_put(stacked, sharding)
            self._mask = jax.device_put(mask, sharding)
            self._template = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), self._xs
            )
            self.num_examples = n
            self.batch_size = b
        else:
            self._data = data
            it = self._iterator()
            try:
                first = next(it)
            except StopIteration:
                raise ValueError("`data` is empty: the batch iterable yielded no batch.") from None
            n0 = _leading(first, "the first batch of `data`")
            b = batch_size or n0
            self.batch_size = ndev * math.ceil(b / ndev)
            self._treedef = jax.tree.structure(first)
            self._template = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(
                    (self.batch_size,) + np.shape(x)[1:], np.asarray(x).dtype
                ),
                first,
            )
            self._batch_sharding = NamedSharding(self.mesh, P("batch"))
            self.num_examples = None  # counted on each pass
        self._scan = jax.jit(self._scan_impl, static_argnames="q")
        self._step = jax.jit(self._step_impl, static_argnames="q", donate_argnums=0)
        self._checked_params = None

    # ------------------------------------------------------------------ internals

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

    @staticmethod
    def _point(base, delta, s):
        return jax.tree.map(lambda b, d: b + s.astype(b.dtype) * d, base, delta)

    def _zeros(self, params, q: Quantities):
        big = {}
        f32 = lambda x: jnp.zeros(jnp.shape(x), jnp.float32)
        if q.grad:
            big["grad"] = jax.tree.map(f32, params)
        if q.class_grads:
            c = self.num_classes
            big["class_grads"] = jax.tree.map(
                lambda x: jnp.zeros((c,) + jnp.shape(x), jnp.float32), params
            )
        return big

    def _body(self, params, delta, q):
        def body(carry, inp):
            batch, mask = inp
            small, big = self._batch_fn(params, delta, batch, mask, q)
            carry = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry, big)
            return carry, small

        return body

    def _scan_impl(self, base, delta, s, xs, mask, q):
        params = self._point(base, delta, s)
        return jax.lax.scan(self._body(params, delta, q), self._zeros(params, q), (xs, mask))

    def _step_impl(self, carry, base, delta, s, batch, mask, q):
        params = self._point(base, delta, s)
        return self._body(params, delta, q)(carry, (batch, mask))

    def _check_loss_shape(self, params):
        key = jax.tree.structure(params), tuple(np.shape(x) for x in jax.tree.leaves(params))
        if self._checked_params == key:
            return
        b = self.batch_size
        try:
            out = jax.eval_shape(self.loss_fn, params, self._template)
        except Exception as err:  # re-raised with context: a shape/structure mismatch
            raise ValueError(
                f"Calling `loss_fn(params, batch)` on a batch of {b} examples failed: {err}"
            ) from err
        shape = getattr(out, "shape", None)
        if shape != (b,):
            raise ValueError(
                "`loss_fn(params, batch)` must return per-example losses of shape [B] = "
                f"({b},) (the mean is taken by the library); got shape {shape}."
            )
        self._checked_params = key

    def run(self, base: Any, delta: Any, s: float, q: Quantities) -> tuple[dict, dict]:
        """Full-dataset means at ``base + s·delta``.

        Returns ``(small, big)``: ``small`` a dict of float64 numpy values (``loss``,
        ``class_loss`` and the requested directional derivatives), ``big`` a dict of float32
        device pytrees (``grad``, ``class_grads``).
        """
        self._check_loss_shape(base)
        base = jax.device_put(base, self._replicated)
        delta = jax.device_put(delta, self._replicated)
        s = jax.device_put(jnp.asarray(s, jnp.float32), self._replicated)
        if self.kind == "arrays":
            big, ys = self._scan(base, delta, s, self._xs, self._mask, q=q)
            small = {
                k: np.sum(np.asarray(v, np.float64), axis=0) for k, v in jax.device_get(ys).items()
            }
            n = self.num_examples
        else:
            carry = jax.device_put(self._zeros(base, q), self._replicated)
            ys, n = [], 0
            for i, batch in enumerate(self._iterator()):
                if jax.tree.structure(batch) != self._treedef:
                    raise ValueError(f"Batch {i} of `data` has a different tree structure.")
                m = _leading(batch, f"batch {i} of `data`")
                if m > self.batch_size:
                    raise ValueError(
                        f"Batch {i} of `data` has {m} examples, more than `batch_size` = "
                        f"{self.batch_size}."
                    )
                n += m
                padded = jax.tree.map(lambda x: _pad_rows(np.asarray(x), self.batch_size), batch)
                mask = np.arange(self.batch_size) < m
                padded, mask = jax.device_put((padded, mask), self._batch_sharding)
                carry, small_i = self._step(carry, base, delta, s, padded, mask, q=q)
                ys.append(small_i)
            if n == 0:
                raise ValueError("`data` is empty: the batch iterable yielded no examples.")
            small = {
                k: np.sum([np.asarray(y[k], np.float64) for y in jax.device_get(ys)], axis=0)
                for k in ys[0]
            }
            big = carry
            self.num_examples = n
        self.num_evaluations += 1
        if small.pop("bad_data") > 0:
            raise ValueError("`data` contains NaN or inf values; LCA needs a finite training set.")
        if small.pop("bad_label") > 0:
            raise ValueError(f"Some class labels lie outside [0, num_classes={self.num_classes}).")
        if not np.isfinite(small["loss"]):
            raise ValueError(
                "`loss_fn` returned NaN or inf on the dataset (full-dataset loss sum = "
                f"{small['loss']}); check the parameters and the loss."
            )
        small = {k: v / n for k, v in small.items()}
        if not self.num_classes:
            small.pop("class_loss", None)
        inv = jnp.float32(1.0 / n)
        big = jax.tree.map(lambda g: g * inv, big)
        return small, big

    # ------------------------------------------------------------------ public

    def evaluate(self, params: Any, *, grad: bool = True) -> Evaluation:
        """Mean loss (and gradient, per-class losses) over the whole dataset at ``params``."""
        zeros = jax.tree.map(jnp.zeros_like, params)
        small, big = self.run(params, zeros, 0.0, Quantities(grad=grad))
        return Evaluation(
            loss=float(small["loss"]),
            grad=big.get("grad"),
            class_loss=small.get("class_loss"),
            num_examples=int(self.num_examples),
        )

    __call__ = evaluate


def evaluate(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    data: Any,
    *,
    grad: bool = True,
    batch_size: int | None = None,
    labels: Any = None,
    class_fn: Callable[[Any], jax.Array] | None = None,
    num_classes: int | None = None,
) -> Evaluation:
    """One-shot full-dataset mean loss and gradient (builds an :class:`Evaluator`).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> x = np.ones((5, 2), np.float32); y = np.array([0, 1, 1, 0, 1])
      >>> e = evaluate(lambda w, b: jnp.sum(b[0] * w, -1), jnp.ones(2), (x, y), labels=y)
      >>> e.loss, np.asarray(e.class_loss, float).round(4).tolist()
      (2.0, [0.8, 1.2])
    """
    ev = make_evaluator(loss_fn, data, batch_size, labels, class_fn, num_classes)
    return ev.evaluate(params, grad=grad)


def make_evaluator(loss_fn, data, batch_size, labels, class_fn, num_classes) -> Evaluator:
    """``data`` itself when it is an :class:`Evaluator` (no other options allowed), else a new one."""
    if isinstance(data, Evaluator):
        if any(x is not None for x in (batch_size, labels, class_fn, num_classes)):
            raise ValueError(
                "`data` is an Evaluator: set `batch_size`/`labels`/`class_fn`/`num_classes` "
                "on the Evaluator instead."
            )
        return data
    return Evaluator(
        loss_fn,
        data,
        batch_size=batch_size,
        labels=labels,
        class_fn=class_fn,
        num_classes=num_classes,
    )
