"""Per-batch engines: what one batch contributes to the full-dataset sums at one point θ.

Two engines share one batch body:

* ``grad`` (reverse mode): ``Σ_b ∇ℓ_b(θ)``, the per-parameter gradient, from which the
  per-parameter LCA ``∇L_i · Δθ_i`` follows.
* ``jvp`` (forward mode): for every parameter leaf ``k`` the directional derivative
  ``∇L(θ) · Δθ_k`` along the step restricted to that leaf — of the total loss *and* of the
  vector of per-class losses in one pass — by ``vmap`` over ``K`` leaf masks of ``jax.jvp``.
  No reverse-mode memory; cost ≈ one forward pass plus ``K`` tangent passes.

Per-class × per-layer can also come from ``C`` reverse passes (``vmap`` of the VJP over the
``C`` one-hot cotangents of the per-class loss vector), which yields per-class *gradients*
(independent of the step direction, so reusable at the next step's start point). The cheaper of
the two is picked by :func:`choose_class_strategy`.

Everything returned is a *sum* over the batch's real (unmasked) examples; the evaluator
divides by the exact example count once at the end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Quantities:
    """What a full-dataset evaluation computes (static; hashable for ``jit``).

    The loss sum (and per-class loss sums when classes are known) is always computed.

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

    def independent(self) -> Quantities:
        return Quantities(grad=self.grad, class_grads=self.class_grads)


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


def nonfinite_count(batch: Any, mask: jax.Array) -> jax.Array:
    """Number of NaN/inf entries of the floating leaves of ``batch`` in real (unmasked) rows."""
    total = jnp.zeros((), jnp.int32)
    for leaf in jax.tree.leaves(batch):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        bad = ~jnp.isfinite(leaf).reshape(leaf.shape[0], -1)
        total = total + jnp.sum(bad & mask[:, None], dtype=jnp.int32)
    return total


def make_batch_fn(
    loss_fn: Callable[[Any, Any], jax.Array],
    class_fn: Callable[[Any], jax.Array] | None,
    num_classes: int,
) -> Callable[..., tuple[dict, dict]]:
    """Returns ``batch_fn(params, delta, batch, mask, q) -> (small, big)``.

    ``small`` holds scalars and small arrays (summed on host in float64): ``loss`` (sum of
    losses), ``class_loss`` ``[C]``, ``bad_data``, ``bad_label``, and when asked ``jvp_layers``
    ``[K]`` and ``jvp_classes`` ``[C, K]``. ``big`` holds pytrees accumulated on device:
    ``grad`` and ``class_grads``.
    """
    c = int(num_classes)

    def batch_fn(params, delta, batch, mask, q: Quantities):
        maskf = mask.astype(jnp.float32)
        if c:
            labels = jnp.asarray(class_fn(batch))
            onehot = jax.nn.one_hot(labels, c, dtype=jnp.float32) * maskf[:, None]
            bad_label = jnp.sum(mask & ((labels < 0) | (labels >= c)), dtype=jnp.int32)
        else:
            onehot = jnp.zeros(mask.shape + (0,), jnp.float32)
            bad_label = jnp.zeros((), jnp.int32)

        def sums(p):
            losses = loss_fn(p, batch)
            losses = jnp.where(mask, losses.astype(jnp.float32), 0.0)
            return jnp.sum(losses), losses @ onehot

        small = {"bad_data": nonfinite_count(batch, mask), "bad_label": bad_label}
        big = {}
        if q.class_grads:
            (total, per_class), vjp = jax.vjp(sums, params)
            eye = jnp.eye(c, dtype=jnp.float32)
            (cg,) = jax.vmap(lambda e: vjp((jnp.zeros((), jnp.float32), e)))(eye)
            big["class_grads"] = cg
            if q.grad:
                big["grad"] = jax.tree.map(lambda g: jnp.sum(g, axis=0), cg)
        elif q.grad:
            (total, per_class), g = jax.value_and_grad(sums, has_aux=True)(params)
            big["grad"] = g
        else:
            total, per_class = sums(params)
        small["loss"] = total
        small["class_loss"] = per_class
        if q.jvp_layers or q.jvp_classes:

            def flat(p):
                t, pc = sums(p)
                return jnp.concatenate([t[None], pc])

            out = _per_leaf_jvp(flat, params, delta)  # [K, 1+C]
            small["jvp_layers"] = out[:, 0]
            if q.jvp_classes:
                small["jvp_classes"] = out[:, 1:].T
        return small, big

    return batch_fn
