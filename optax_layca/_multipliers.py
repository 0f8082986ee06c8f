"""The α layer-wise learning-rate multipliers (Carbonnelle & De Vleeschouwer, 2019, Eq. 1)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._base import is_concrete, value_at
from ._custom_types import IsLayer, LayerAxis, LayerOrder, ScalarOrSchedule
from ._layers import Layering, check_same_structure, layer_depths


def check_alpha(alpha: Any, where: str) -> None:
    """Raises a ValueError if a concrete α lies outside [-1, 1] (traced α is clipped)."""
    if callable(alpha):
        value = alpha(jnp.zeros((), jnp.int32))
        if not is_concrete(value):
            return
        where = f"{where} (schedule at step 0)"
    else:
        value = alpha
        if not is_concrete(value):
            return
    if np.ndim(value) != 0:
        raise ValueError(f"`{where}` must be a scalar; got shape {np.shape(value)}.")
    if not np.isfinite(value) or not -1.0 <= float(value) <= 1.0:
        raise ValueError(f"`{where}` must lie in [-1, 1]; got {float(value)}.")


def multiplier_at_depth(alpha: jax.Array, depth: jax.Array, num_layers: jax.Array) -> jax.Array:
    """Eq. 1 evaluated at integer depths (traced α and L are fine; α is clipped to [-1, 1])."""
    alpha = jnp.clip(jnp.asarray(alpha, jnp.float32), -1.0, 1.0)
    depth = depth.astype(jnp.float32)
    last = jnp.maximum(jnp.asarray(num_layers, jnp.float32) - 1.0, 1.0)
    # 0 ** 0 == 1 in jnp.power, so α = ±1 keeps exactly one layer training.
    last_first = jnp.power(1.0 - alpha, 5.0 * (last - depth) / last)
    first_first = jnp.power(1.0 + alpha, 5.0 * depth / last)
    single = jnp.asarray(num_layers) <= 1
    return jnp.where(single, 1.0, jnp.where(alpha > 0, last_first, first_first))


def layer_multipliers(alpha: float | jax.Array, num_layers: int) -> jax.Array:
    r"""The layer-wise learning-rate multipliers of Eq. 1, for plots and checks.

    With ``L = num_layers`` layers indexed ``l = 0 … L-1`` in forward order:

    .. math::
      \begin{align*}
        m_l &= (1 - \alpha)^{5 (L - 1 - l) / (L - 1)} & \alpha > 0
          \quad\text{(prioritise the last layers)} \\
        m_l &= (1 + \alpha)^{5 l / (L - 1)} & \alpha \le 0
          \quad\text{(prioritise the first layers)}
      \end{align*}

    Args:
      alpha: prioritisation parameter in ``[-1, 1]``.
      num_layers: number of layers ``L >= 1``. ``L = 1`` gives ``[1.]`` (the reference code
        divides by zero there).

    Returns:
      A float32 vector of length ``L``.

    Examples:
      >>> import numpy as np
      >>> np.asarray(layer_multipliers(0.5, 3), float).round(4).tolist()
      [0.0312, 0.1768, 1.0]
      >>> layer_multipliers(-1.0, 3).tolist()
      [1.0, 0.0, 0.0]

    References:
      Carbonnelle & De Vleeschouwer, `An experimental study of layer-level training speed and
      its impact on generalization`, 2019, Eq. 1 and Fig. 12.
    """
    check_alpha(alpha, "layer_multipliers(alpha=...)")
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)):
        raise TypeError(f"`num_layers` must be an int; got {num_layers!r}.")
    if num_layers < 1:
        raise ValueError(f"`num_layers` must be >= 1; got {num_layers}.")
    return multiplier_at_depth(alpha, jnp.arange(num_layers), num_layers)


class ScaleByLayerMultipliersState(NamedTuple):
    """State of :func:`scale_by_layer_multipliers`.

    Attributes:
      count: number of updates so far (int32), the step at which ``alpha`` is evaluated.
      layer_depth: per leaf, the layer index ``l`` (int32, -1 for non-layer leaves; a vector
        along the stack axis for stacked layers).
      num_layers: ``L`` (int32 scalar).
    """

    count: jax.Array
    layer_depth: Any
    num_layers: jax.Array


def scale_by_layer_multipliers(
    alpha: ScalarOrSchedule = 0.0,
    layer_order: LayerOrder = None,
    *,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales each layer's update by its Eq. 1 multiplier.

    Layer ``l`` (forward order) of ``L`` gets ``m_l(α)`` of :func:`layer_multipliers`, so that
    with a base rate ``ρ(t)`` its rate is ``ρ_l(t) = m_l(α) ρ(t)``. Non-layer leaves pass
    through unchanged.

    Args:
      alpha: α in ``[-1, 1]``, or a schedule ``step -> α``. Array-valued, so it works under
        ``optax.inject_hyperparams`` (a traced α outside ``[-1, 1]`` is clipped).
      layer_order: layer paths in forward order (see :func:`forward_order`); None: natural
        sort of the paths (``Dense_2`` before ``Dense_10``).
      is_layer: which leaves are layers (callable ``(path, leaf) -> bool`` or list of paths).
        Under ``inject_hyperparams`` pass callables in ``static_args``.
      layer_axis: stack axis of leaves holding several layers (their slices take
        consecutive depths).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> params = {"Dense_0": {"kernel": jnp.ones((2, 2))}, "Dense_1": {"kernel": jnp.ones((2, 2))}}
      >>> tx = scale_by_layer_multipliers(alpha=0.5)
      >>> u, _ = tx.update(params, tx.init(params), params)
      >>> float(u["Dense_0"]["kernel"][0, 0]), float(u["Dense_1"]["kernel"][0, 0])
      (0.03125, 1.0)

    References:
      Carbonnelle & De Vleeschouwer, 2019, Eq. 1.
    """
    check_alpha(alpha, "scale_by_layer_multipliers(alpha=...)")
    layering = Layering(is_layer, layer_axis)

    def init_fn(params):
        depth, num_layers = layer_depths(params, layering, layer_order)
        return ScaleByLayerMultipliersState(
            count=jnp.zeros((), jnp.int32),
            layer_depth=depth,
            num_layers=jnp.asarray(num_layers, jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        check_same_structure(updates, state.layer_depth, "updates", "params at init")
        a = value_at(alpha, state.count)

        def scale(lo, u, depth):
            if not lo.is_layer:
                return u
            m = multiplier_at_depth(a, depth, state.num_layers)
            return (u.astype(jnp.float32) * m).astype(u.dtype)

        updates = layering.map(scale, updates, state.layer_depth)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
