"""The α layer-wise learning-rate multipliers (Carbonnelle & De Vleeschouwer, 2019, Eq. 1)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._base import check_choice, check_int, check_scalar_or_schedule, is_concrete, value_at
from ._custom_types import IsLayer, LayerAxis, LayerOrder, ScalarOrSchedule
from ._layers import (
    Layering,
    check_layer_order,
    check_same_shapes,
    check_same_structure,
    compute_dtype,
    layer_depths,
    module_layer_depths,
    natural_order_is_forward,
)


def check_alpha(alpha: Any, where: str) -> None:
    """Raises unless α is a real number (or a schedule whose step-0 value is) in [-1, 1].

    A traced α (``inject_hyperparams``, a schedule under ``jit``) cannot be read here: outside
    ``[-1, 1]`` it is clipped, and a NaN α gives NaN multipliers (:func:`multiplier_at_depth`).
    """
    check_scalar_or_schedule(alpha, where, low=-1.0, high=1.0)


def alpha_is_zero(alpha: Any) -> bool:
    """True for a concrete α equal to 0 (uniform rates: the layers' depth does not matter)."""
    if callable(alpha) or not is_concrete(alpha):
        return False
    return bool(np.all(np.asarray(alpha) == 0))


def init_layer_depths(
    params: Any, layering: Layering, layer_order: LayerOrder, alpha: Any, where: str
):
    """``(depth, L)`` for a transform's state, ``L = 0`` when no forward order is known.

    A non-zero α needs the forward order (an explicit or traced ``layer_order``, or a natural
    sort that :func:`~optax_layca._layers.natural_order_is_forward` vouches for) and raises
    without it. α = 0 needs none; if the order is unknown the state then records ``L = 0``,
    and a later non-zero α (``inject_hyperparams``, a schedule) gives NaN multipliers instead
    of silently ranking the layers in path order.
    """
    known = layer_order is not None or natural_order_is_forward(layering.layer_paths(params))
    need = not alpha_is_zero(alpha)
    depth, num_layers = layer_depths(params, layering, layer_order, where, need_order=need)
    return depth, jnp.asarray(num_layers if known else 0, jnp.int32)


def multiplier_at_depth(
    alpha: jax.Array, depth: jax.Array, num_layers: jax.Array, dtype: Any = jnp.float32
) -> jax.Array:
    """Eq. 1 evaluated at integer depths, in ``dtype`` (float32 or float64).

    Traced α and L are fine; α is clipped to [-1, 1]. Two cases give NaN multipliers, so the
    updates are visibly NaN instead of silently using some rate: a NaN α (e.g. from a schedule
    under ``jit``, where it cannot be checked), and ``num_layers = 0`` ("forward order
    unknown", see :func:`init_layer_depths`) with α ≠ 0.
    """
    unknown = jnp.asarray(num_layers) == 0
    raw = jnp.asarray(alpha).astype(dtype)
    alpha = jnp.clip(raw, -1.0, 1.0)
    depth = depth.astype(dtype)
    last = jnp.maximum(jnp.asarray(num_layers).astype(dtype) - 1.0, 1.0)
    # 0 ** 0 == 1 in jnp.power, so α = ±1 keeps exactly one layer training.
    last_first = jnp.power(1.0 - alpha, 5.0 * (last - depth) / last)
    first_first = jnp.power(1.0 + alpha, 5.0 * depth / last)
    single = jnp.asarray(num_layers) <= 1
    m = jnp.where(single, 1.0, jnp.where(alpha > 0, last_first, first_first))
    return jnp.where(jnp.isnan(raw) | (unknown & (alpha != 0)), jnp.nan, m).astype(dtype)


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
    num_layers = check_int(num_layers, "layer_multipliers(num_layers=...)", low=1)
    return multiplier_at_depth(alpha, jnp.arange(num_layers), num_layers)


class ScaleByLayerMultipliersState(NamedTuple):
    """State of :func:`scale_by_layer_multipliers`.

    Attributes:
      count: number of updates so far (int32), the step at which ``alpha`` is evaluated.
      layer_depth: per leaf, the layer index ``l`` (int32, -1 for non-layer leaves, or their
        module's layer index with ``non_layer="module"``; a vector along the stack axis for
        stacked layers).
      num_layers: ``L`` (int32 scalar); 0 when α was 0 at ``init`` and no forward order was
        known (a later non-zero α then gives NaN, see :func:`init_layer_depths`).
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
    non_layer: str = "pass",
) -> optax.GradientTransformationExtraArgs:
    r"""Scales each layer's update by its Eq. 1 multiplier.

    Layer ``l`` (forward order) of ``L`` gets ``m_l(α)`` of :func:`layer_multipliers`, so that
    with a base rate ``ρ(t)`` its rate is ``ρ_l(t) = m_l(α) ρ(t)``. Non-layer leaves pass
    through unchanged (``non_layer="pass"``) or take the multiplier of the layer of their
    module (``"module"``: ``Dense_3/bias`` that of ``Dense_3/kernel``; a norm's scale, whose
    module has no layer, keeps 1), as the authors' SGD and LARS give every weight of a Keras
    layer that layer's multiplier.

    Args:
      alpha: α in ``[-1, 1]``, or a schedule ``step -> α``. Array-valued, so it works under
        ``optax.inject_hyperparams`` (a traced α outside ``[-1, 1]`` is clipped).
      layer_order: layer paths in forward order (see :func:`forward_order`); None: the
        natural sort of the paths (``Dense_2`` before ``Dense_10``) where it is known to be
        the forward order (auto-numbered ``Name_k`` siblings); otherwise a non-zero α raises.
      is_layer: which leaves are layers (callable ``(path, leaf) -> bool`` or list of paths).
        Under ``inject_hyperparams`` pass callables in ``static_args``.
      layer_axis: stack axis of leaves holding several layers; stacked blocks take depths
        block by block (see :func:`~optax_layca._layers.layer_depths`).
      non_layer: ``"pass"`` or ``"module"``.

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
    check_layer_order(layer_order, "scale_by_layer_multipliers")
    check_choice(non_layer, ("pass", "module"), "scale_by_layer_multipliers(non_layer=...)")
    layering = Layering(is_layer, layer_axis)

    def init_fn(params):
        depth, num_layers = init_layer_depths(
            params, layering, layer_order, alpha, "scale_by_layer_multipliers"
        )
        if non_layer == "module":
            depth = module_layer_depths(params, layering, depth)
        return ScaleByLayerMultipliersState(
            count=jnp.zeros((), jnp.int32), layer_depth=depth, num_layers=num_layers
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_same_structure(updates, state.layer_depth, "updates", "params at init")
        if params is not None:
            check_same_structure(updates, params, "updates")
            check_same_shapes(updates, params, "updates")
        a = value_at(alpha, state.count)

        def scale(lo, u, depth):
            if not lo.is_layer and non_layer == "pass":
                return u
            dtype = compute_dtype(u)
            m = multiplier_at_depth(a, depth, state.num_layers, dtype)
            m = jnp.where(depth >= 0, m, 1.0)
            return (u.astype(dtype) * m).astype(u.dtype)

        updates = layering.map(scale, updates, state.layer_depth)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
