"""Per-batch engines and the compiled kernels that run them over a dataset.

Two engines share one batch body:

* ``grad`` (reverse mode): ``Σ_b ∇ℓ_b(θ)``, the per-parameter gradient, from which the
  per-parameter LCA ``∇L_i · Δθ_i`` follows.
* ``jvp`` (forward mode): for every parameter leaf ``k`` the directional derivative
  ``∇L(θ) · Δθ_k`` along the step restricted to that leaf — of the total loss *and* of the
  vector of per-class losses in one pass. No reverse-mode memory.

Per-class × per-leaf can also come from ``C`` reverse passes (``vmap`` of the VJP over the
``C`` one-hot cotangents of the per-class loss vector), which yields per-class *gradients*
(independent of the step direction, so reusable at the next step's start point). The cheaper of
the two is picked by :func:`choose_class_strategy`.

Per-example losses (float32, zero on padded rows) go back to the host, which sums them in
float64: the measured loss change is then exact up to the float32 rounding of each example's
loss. Gradients are summed on device in float32.

Compilation happens once per loss function: :func:`get_kernels` keeps the jitted functions in
a cache keyed *weakly* on ``loss_fn`` (and ``class_fn``), so a new :class:`Evaluator` over
same-shaped data reuses them and a dropped ``loss_fn`` frees them. Across processes, JAX's
persistent compilation cache (``jax.config.update("jax_compilation_cache_dir", path)``)
skips the compiles too (a SmallCNN's first ``allocate`` went from 38 s to 7 s on a loaded
2-core CPU).
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Quantities:
    """What a full-dataset evaluation computes (static; hashable for ``jit``).

    Per-example losses (and classes when known) are always computed.

    Attributes:
      grad: full gradient pytree (direction independent).
      class_grads: per-class gradients, a pytree with a leading ``C`` axis (direction
        independent).
      jvp_layers: ``[K]`` directional derivatives of the loss along ``Δθ`` restricted to each leaf.
      jvp_classes: ``[C, K]`` the same for each class's loss (implies ``jvp_layers``).
    """

    grad: bool = False
    class_grads: bool = False
    jvp_layers: bool = False
    jvp_classes: bool = False

    @property
    def needs_delta(self) -> bool:
        return self.jvp_layers or self.jvp_classes

    def direction_only(self) -> Quantities:
        """The direction-dependent part (what cannot be reused at the next step's start)."""
        return Quantities(jvp_layers=self.jvp_layers, jvp_classes=self.jvp_classes)


def choose_class_strategy(num_leaves: int, num_classes: int) -> str:
    """``"jvp"`` (``K`` tangent passes) or ``"reverse"`` (``C`` backward passes), the cheaper.

    A tangent pass costs about one forward pass and a backward pass about two, so the jvp
    engine wins when ``K <= 2 C``.

    Examples:
      >>> choose_class_strategy(num_leaves=6, num_classes=10), choose_class_strategy(50, 3)
      ('jvp', 'reverse')
    """
    return "jvp" if num_leaves <= 2 * num_classes else "reverse"


def _leaf_tangents(delta: Any) -> Any:
    """Stack of ``K`` tangents: the ``k``-th is ``delta`` on leaf ``k`` and zero elsewhere."""
    leaves, treedef = jax.tree.flatten(delta)
    k = len(leaves)
    eye = jnp.eye(k, dtype=jnp.float32)
    stacked = [
        eye[:, j].reshape((k,) + (1,) * leaf.ndim).astype(leaf.dtype) * leaf[None]
        for j, leaf in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, stacked)


LOOP_MAX_LEAVES = 64


def _per_leaf_jvp(f: Callable[[Any], jax.Array], params: Any, delta: Any) -> jax.Array:
    """``[K, ...]``: ``jvp(f)`` along ``delta`` restricted to each leaf ``k``.

    Up to ``LOOP_MAX_LEAVES`` leaves, one ``jax.jvp`` per leaf w.r.t. that leaf alone: the other
    tangents are *symbolic* zeros, so the tangent program of leaf ``k`` only runs downstream of
    where the leaf is used (the last layer's jvp is nearly free) and the shared primal is
    computed once (CSE). Beyond that, ``vmap`` over ``K`` masked full tangents (dense, ``K``
    tangent passes, smaller program).
    """
    leaves, treedef = jax.tree.flatten(params)
    dleaves = jax.tree.leaves(delta)
    if len(leaves) > LOOP_MAX_LEAVES:
        tangents = _leaf_tangents(delta)
        return jax.vmap(lambda t: jax.jvp(f, (params,), (t,))[1])(tangents)
    outs = []
    for k in range(len(leaves)):

        def f_k(leaf, k=k):
            return f(jax.tree.unflatten(treedef, leaves[:k] + [leaf] + leaves[k + 1 :]))

        outs.append(jax.jvp(f_k, (leaves[k],), (dleaves[k].astype(leaves[k].dtype),))[1])
    return jnp.stack(outs)


def check_loss_output(out: Any, batch_rows: int) -> None:
    """Trace-time check that ``loss_fn`` returned ``[B]`` floating per-example losses."""
    shape = getattr(out, "shape", None)
    if shape != (batch_rows,):
        raise ValueError(
            "`loss_fn(params, batch)` must return per-example losses of shape [B] = "
            f"({batch_rows},) (the mean is taken by the library); got shape {shape}."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(
            "`loss_fn(params, batch)` must return floating-point losses (integer losses have "
            f"no gradient); got dtype {out.dtype}."
        )


def _deref(ref: Callable[[], Any], what: str) -> Any:
    fn = ref()
    if fn is None:  # only reachable if a kernel outlives its Evaluator's strong reference
        raise RuntimeError(f"The `{what}` this compiled LCA kernel belongs to was deleted.")
    return fn


def _weak(fn: Any) -> Callable[[], Any]:
    """A weak reference to ``fn`` (``WeakMethod`` for bound methods), or a strong one."""
    try:
        return weakref.WeakMethod(fn) if inspect.ismethod(fn) else weakref.ref(fn)
    except TypeError:  # not weak-referenceable (e.g. a builtin): held strongly
        return lambda: fn


class Kernels:
    """The compiled full-dataset functions of one ``(loss_fn, class_fn, C)`` triple.

    ``start`` forms ``θ(s)`` and zero sums, ``step``/``step_batch`` add one batch,
    ``finish`` takes the dot products with ``Δθ``. ``q`` (:class:`Quantities`) is static; the
    data are arguments, so new data of the same shapes reuse the executables.
    """

    def __init__(self, loss_fn, class_fn, num_classes: int, labels_in_batch: bool):
        self._loss = _weak(loss_fn)
        self._class = _weak(class_fn) if class_fn is not None else None
        self.num_classes = int(num_classes)
        self.labels_in_batch = labels_in_batch
        # One batch per call, in a host loop: XLA:CPU runs convolutions' backward pass ~10×
        # slower inside a while loop (lax.scan) than outside, and a one-batch program compiles
        # faster. `step` indexes device-resident stacked batches, `step_batch` takes one.
        self.start = jax.jit(self._start, static_argnames="q")
        self.zeros = jax.jit(self._zeros, static_argnames="q")
        self.step = jax.jit(self._step, static_argnames="q", donate_argnums=0)
        self.step_batch = jax.jit(self._accumulate, static_argnames="q", donate_argnums=0)
        self.finish = jax.jit(self._finish, static_argnames="q")
        self.single = jax.jit(self._single, static_argnames="q")
        self.losses = jax.jit(self._losses)
        self.coupling: dict = {}  # batch shape -> does padding change real rows' losses?

    # -------------------------------------------------------------- one batch

    def _losses(self, params, batch):
        loss_fn = _deref(self._loss, "loss_fn")
        inputs = batch[0] if self.labels_in_batch else batch
        out = loss_fn(params, inputs)
        check_loss_output(out, jax.tree.leaves(batch)[0].shape[0])
        return out

    def _classes(self, batch):
        if self.labels_in_batch:
            return jnp.asarray(batch[1], jnp.int32)
        return jnp.asarray(_deref(self._class, "class_fn")(batch), jnp.int32)

    def batch(self, params, delta, batch, mask, q: Quantities):
        """``(small, big)`` of one batch: ``small`` per-example losses/classes and jvp sums
        (summed on host), ``big`` gradient sums (accumulated on device)."""
        c = self.num_classes
        small, big = {}, {}
        if c:
            classes = self._classes(batch)
            small["classes"] = classes
            onehot = jax.nn.one_hot(classes, c, dtype=jnp.float32) * mask[:, None]
        else:
            onehot = jnp.zeros(mask.shape + (0,), jnp.float32)

        def sums(p):
            losses = jnp.where(mask, self._losses(p, batch).astype(jnp.float32), 0.0)
            return jnp.sum(losses), (losses @ onehot, losses)

        if q.class_grads:

            def total_and_classes(p):
                total, (per_class, losses) = sums(p)
                return (total, per_class), losses

            _, vjp, losses = jax.vjp(total_and_classes, params, has_aux=True)
            eye = jnp.eye(c, dtype=jnp.float32)
            (cg,) = jax.vmap(lambda e: vjp((jnp.zeros((), jnp.float32), e)))(eye)
            big["class_grads"] = cg
            if q.grad:
                big["grad"] = jax.tree.map(lambda g: jnp.sum(g, axis=0), cg)
        elif q.grad:
            (_, (_, losses)), big["grad"] = jax.value_and_grad(sums, has_aux=True)(params)
        else:
            _, (_, losses) = sums(params)
        small["losses"] = losses
        if q.needs_delta:

            def flat(p):
                t, (pc, _) = sums(p)
                return jnp.concatenate([t[None], pc])

            out = _per_leaf_jvp(flat, params, delta)  # [K, 1 + C]
            small["jvp_layers"] = out[:, 0]
            if q.jvp_classes:
                small["jvp_classes"] = out[:, 1:].T
        return small, big

    # -------------------------------------------------------------- whole dataset

    def _start(self, base, delta, s, q):
        """``θ(s) = base + s·Δθ`` (in each leaf's dtype) and the zero sums."""
        params = jax.tree.map(lambda b, d: b + s.astype(b.dtype) * d.astype(b.dtype), base, delta)
        return params, self._zeros(params, q)

    def _zeros(self, params, q: Quantities) -> dict:
        big = {}
        if q.grad:
            big["grad"] = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
        if q.class_grads:
            c = self.num_classes
            big["class_grads"] = jax.tree.map(
                lambda x: jnp.zeros((c,) + jnp.shape(x), jnp.float32), params
            )
        return big

    def _accumulate(self, carry, params, delta, batch, mask, q):
        small, big = self.batch(params, delta, batch, mask, q)
        return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), carry, big), small

    def _step(self, carry, params, delta, xs, mask, i, q):
        batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), xs)
        return self._accumulate(carry, params, delta, batch, mask[i], q)

    def _single(self, base, delta, s, xs, mask, q):
        """A whole point of a one-batch dataset in one program (one dispatch, not three)."""
        params, carry = self._start(base, delta, s, q)
        carry, small = self._step(carry, params, delta, xs, mask, 0, q)
        return carry, small, self._finish(carry, delta, q)

    def _finish(self, carry, delta, q):
        """Per-leaf ``Σ_n ∇ℓ_n · Δθ_k`` (and per class), and ``Σ_i |Σ_n ∂_i ℓ_n · Δθ_i|``."""
        post = {}
        d32 = [d.astype(jnp.float32) for d in jax.tree.leaves(delta)]
        if q.grad:
            g = jax.tree.leaves(carry["grad"])
            post["dots"] = jnp.stack([jnp.vdot(a, b) for a, b in zip(g, d32)])
            post["absdot"] = sum(jnp.sum(jnp.abs(a * b)) for a, b in zip(g, d32))
        if q.class_grads:
            cg = jax.tree.leaves(carry["class_grads"])
            post["class_dots"] = jnp.stack(
                [jnp.einsum("c...,...->c", a, b) for a, b in zip(cg, d32)], axis=1
            )
        return post


class _NoClassFn:
    """Weak-referenceable stand-in key for ``class_fn=None``."""


_NO_CLASS_FN = _NoClassFn()
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_kernels(loss_fn, class_fn, num_classes: int, labels_in_batch: bool) -> Kernels:
    """The (cached) :class:`Kernels` of ``loss_fn``; one compile per loss and data shapes.

    The cache holds ``loss_fn`` (the instance, for a bound method) and ``class_fn`` weakly:
    an entry lives exactly as long as the functions, so passing the *same* function object
    compiles once, and a ``lambda`` re-created on every call compiles every time.
    """
    owner, func = (
        (loss_fn.__self__, loss_fn.__func__)
        if inspect.ismethod(loss_fn)
        else (
            loss_fn,
            None,
        )
    )
    cfn = _NO_CLASS_FN if class_fn is None else class_fn
    key = (int(num_classes), bool(labels_in_batch))
    try:
        by_func = _CACHE.setdefault(owner, {})
        by_class = by_func.setdefault(func, weakref.WeakKeyDictionary())
        entry = by_class.setdefault(cfn, {})
    except TypeError:  # unhashable or not weak-referenceable: compiled per Evaluator
        return Kernels(loss_fn, class_fn, num_classes, labels_in_batch)
    if key not in entry:
        entry[key] = Kernels(loss_fn, class_fn, num_classes, labels_in_batch)
    return entry[key]


def cache_size() -> int:
    """Number of live cached :class:`Kernels` (for tests)."""
    return sum(
        len(entry)
        for by_func in list(_CACHE.values())
        for by_class in by_func.values()
        for entry in list(by_class.values())
    )
