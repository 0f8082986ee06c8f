"""The authors' estimators for the figures of Carbonnelle & De Vleeschouwer (2019), App. A.4.

Our monitor (:func:`~optax_layca.rotation.track_rotation`) measures the gradient that the
optimizer receives at each step. The authors' Fig. 10 (row 2, "Gradient norm") uses another
estimator, reproduced here so that their curves can be redrawn: at the start of each epoch,
the mean over batches of 128 of the per-layer norm of each batch's gradient, over 2,000
training samples drawn once (with replacement), in training mode, without the L2 term
(``trainingMemories.layerwise_gradientnorm`` in the authors' ``training_monitoring.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._base import unwrap_variables
from .._custom_types import IsLayer, LayerAxis
from .._layers import Layering, layer_dot
from ._metrics import per_layer

REDUCTIONS = ("sum", "mean")


def _check_data(data: Any, batch_size: int, reduction: str) -> None:
    """Raises a ValueError naming the bad argument."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
        batch_size < 1
    ):
        raise ValueError(
            f"`mean_batch_gradient_norms(batch_size=...)` must be an int >= 1; got {batch_size!r}."
        )
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"`mean_batch_gradient_norms(reduction=...)` must be one of {REDUCTIONS}; "
            f"got {reduction!r}."
        )
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree.leaves(data)}
    if not sizes or len(sizes) != 1 or min(sizes) < 1:
        raise ValueError(
            "`mean_batch_gradient_norms(data=...)` must be arrays sharing a leading sample "
            f"axis of size >= 1; got leading sizes {sorted(sizes)} (-1: a scalar)."
        )


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "batch_size", "reduction", "layering", "with_key")
)
def _mean_batch_gradient_norms(params, data, key, *, loss_fn, batch_size, reduction, layering,
                               with_key):
    n = jax.tree.leaves(data)[0].shape[0]
    full, rest = divmod(n, batch_size)
    keys = jax.random.split(key, full + 1) if with_key else [None] * (full + 1)

    def norms(batch, k):
        def total(p):
            losses = loss_fn(p, batch, k) if with_key else loss_fn(p, batch)
            return jnp.sum(losses) if reduction == "sum" else jnp.mean(losses)

        grads = jax.grad(total)(params)
        return per_layer(lambda lo, g: jnp.sqrt(layer_dot(g, g, lo)), layering, grads)

    sums, count = None, 0
    if full:
        # One lax.scan over the full batches: one compiled body, no host sync per batch.
        head = jax.tree.map(lambda x: x[: full * batch_size].reshape(
            (full, batch_size, *x.shape[1:])), data)
        ks = keys[:full] if with_key else None
        _, per_batch = jax.lax.scan(
            lambda c, bk: (c, norms(bk[0], bk[1])), None, (head, ks))
        sums, count = jax.tree.map(lambda v: jnp.sum(v, axis=0), per_batch), full
    if rest:
        # The last, smaller batch counts as one batch, as in the authors' loop (Keras'
        # ``_make_batches``); it has its own shapes, so batch statistics never see padding.
        tail = norms(jax.tree.map(lambda x: x[full * batch_size:], data), keys[full])
        sums = tail if sums is None else jax.tree.map(jnp.add, sums, tail)
        count += 1
    return jax.tree.map(lambda v: v / count, sums)


def mean_batch_gradient_norms(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    data: Any,
    *,
    batch_size: int = 128,
    reduction: str = "sum",
    key: jax.Array | None = None,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
) -> dict[str, jax.Array]:
    r"""Per-layer gradient norm, averaged over batches: the authors' Fig. 10 estimator.

    ``data`` is cut into consecutive batches ``B_1 … B_K`` of ``batch_size`` samples (the
    last one smaller when ``batch_size`` does not divide the number of samples), and for each
    layer ``l``

    .. math::
      \bar g_l = \frac{1}{K} \sum_{k=1}^{K} \Big\lVert \nabla_{w_l} \sum_{i \in B_k}
        \ell_i(w) \Big\rVert_2

    with ``reduction="sum"`` (the authors': Keras differentiates the vector of per-sample
    losses, i.e. their sum over the batch), or the batch *mean* of the losses with
    ``reduction="mean"`` (``1/|B_k|`` inside the norm).

    To redraw the authors' curves: draw the samples once before training, with replacement,
    ``idx = np.random.default_rng(0).choice(n_train, min(n_train, 2000))``; call this at the
    start of every epoch (before its first update) with ``loss_fn`` in training mode
    (dropout on, batch statistics; discard updated ``batch_stats``), without the L2 term.

    Jitted (one compilation per ``loss_fn``, data shape and options: pass the same function
    object each time), one ``lax.scan`` over the batches: no host sync per batch.

    Args:
      loss_fn: ``loss_fn(params, batch) -> per-sample losses (B,)``, or
        ``loss_fn(params, batch, key)`` when ``key`` is given (e.g. for dropout).
      params: parameters (arrays, or ``nnx.State``).
      data: a pytree of arrays sharing a leading sample axis (e.g. ``(x, y)``).
      batch_size: samples per batch (128 in the authors' code).
      reduction: ``"sum"`` (the authors') or ``"mean"`` over a batch's losses.
      key: PRNG key, split into one key per batch and passed to ``loss_fn``.
      is_layer, layer_axis, per_unit: which leaves are layers (default: kernels, as the
        authors).

    Returns:
      ``{layer path: float32 array}`` (scalar per layer; a vector for stacked layers/units).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> params = {"Dense_0": {"kernel": jnp.ones((2, 1))}}
      >>> loss = lambda p, b: (b[0] @ p["Dense_0"]["kernel"])[:, 0]  # ∇ of sample i: x_i
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
      >>> g = mean_batch_gradient_norms(loss, params, (x,), batch_size=2)
      >>> round(float(g["Dense_0/kernel"]), 4)  # (‖(1, 1)‖ + ‖(3, 4)‖) / 2
      3.2071

    References:
      Carbonnelle & De Vleeschouwer, `An experimental study of layer-level training speed and
      its impact on generalization`, 2019, App. A.4, Fig. 10 (row 2).
    """
    _check_data(data, batch_size, reduction)
    if not callable(loss_fn):
        raise TypeError(
            f"`mean_batch_gradient_norms(loss_fn=...)` must be callable; got {loss_fn!r}."
        )
    with_key = key is not None
    return _mean_batch_gradient_norms(
        unwrap_variables(params), data, key if with_key else jax.random.key(0),
        loss_fn=loss_fn, batch_size=int(batch_size), reduction=reduction,
        layering=Layering(is_layer, layer_axis, per_unit), with_key=with_key,
    )
