r"""Layer rotation: metrics, an optax monitor, a host-side history, layer-wise convergence rate.

A layer (see :class:`~optax_layca._layers.Layering`) is one weight tensor, flattened. Its
*rotation* is measured by the angle between two of its values, and the papers' "layer-wise
angle deviation curves" plot the cosine distance ``1 - cos(w_t, w⁰)`` to the initial weights
(seed 000, §3.1). The rotation rate between steps ``t1 < t2`` is ``angle(w_t1, w_t2)/(t2 - t1)``.

Numerics. Angles are computed in float32 from the *difference* of the two vectors,
``θ = atan2(‖d_⊥‖ ‖a‖, a·a + a·d)`` with ``b = a + d`` and ``d_⊥`` the part of ``d`` orthogonal
to ``a``. This is accurate to float32 relative precision for angles down to 1e-6 rad and
below, where ``arccos`` of a clamped cosine would return 0 (and to float32 resolution, ~2e-7,
near π). The cosine distance is ``1 - cos θ = 2 sin²(θ/2)``, in ``[0, 2]`` by construction.

Typical use (the monitor wraps the optimizer or sits last in the chain; the history collects
its figures on the host without a device sync per step; ``optax_layca.plot`` draws them)::

    tx = track_rotation(optax.adam(1e-3))          # or chain(layca(0.01), track_rotation())
    hist = RotationHistory(every=10)
    for step in range(1, num_steps + 1):
        params, opt_state = train_step(params, opt_state, batch)
        end = step % steps_per_epoch == 0
        hist.record(step, opt_state, epoch=step // steps_per_epoch if end else None,
                    params=params if end else None)
    hist.save("rotation.npz")
    plot.rotation_curves(hist)                     # plot.epoch_rotation(hist), ...

Zero-norm convention. The angle between a zero vector and anything is 0, and so is the cosine
distance: a zero-initialised layer reports "no rotation", never NaN.

Warmup (seed 002, §5.3: start at a 10× smaller rate and increase linearly over ``N`` steps) is
one line of optax schedules, no helper needed:

  >>> import optax
  >>> lr, n = 0.3, 100
  >>> warmup = optax.join_schedules(
  ...     [optax.linear_schedule(lr / 10, lr, n), optax.constant_schedule(lr)], [n])
  >>> [round(float(warmup(t)), 4) for t in (0, 50, 100, 500)]
  [0.03, 0.165, 0.3, 0.3]

(Replace the constant schedule with e.g. ``optax.piecewise_constant_schedule`` for the step
decays of the papers.)
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax

from ._custom_types import IsLayer, LayerAxis
from ._layca import layer_dot
from ._layers import Layering, LeafLayout, check_same_structure, natural_order, path_str
from ._multipliers import NO_PARAMS_MSG

__all__ = [
    "FIGURES",
    "RotationHistory",
    "TrackRotationState",
    "angle",
    "cosine_distance",
    "layer_angle",
    "layer_convergence_rate",
    "layer_norms",
    "layer_rotation",
    "rotation_rate",
    "second_moment_percentiles",
    "track_rotation",
]

FIGURES = (
    "cosine_distance",
    "step_angle",
    "cumulative_angle",
    "grad_norm",
    "weight_norm",
    "update_norm",
)
"""Per-layer figures kept by :func:`track_rotation`, in this order."""

# ----------------------------------------------------------------------------- metrics


def _kept_shape(lo: LeafLayout, shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(n) for i, n in enumerate(shape) if i not in lo.reduce_axes)


def _squeeze(x: jax.Array, lo: LeafLayout) -> jax.Array:
    """Drops the (size-1) reduced axes of a keepdims per-layer reduction."""
    return jnp.squeeze(x, axis=lo.reduce_axes) if lo.reduce_axes else x


def _angle_to_sum(a: jax.Array, d: jax.Array, lo: LeafLayout) -> jax.Array:
    """Per-layer angle between ``a`` and ``a + d`` (float32, keepdims), 0 if either is zero.

    ``d_⊥ = d - (a·d / a·a) a`` is formed explicitly, so no cancellation: when ``d`` is small
    (nearly parallel vectors) its own rounding is relative to ``‖d‖``, not to ``‖a‖``.
    """
    a = a.astype(jnp.float32)
    d = d.astype(jnp.float32)
    aa, ad = layer_dot(a, a, lo), layer_dot(a, d, lo)
    has_a = aa > 0
    perp = d - jnp.where(has_a, ad / jnp.where(has_a, aa, 1.0), 0.0) * a
    pp = layer_dot(perp, perp, lo)
    b = a + d
    has_b = layer_dot(b, b, lo) > 0
    theta = jnp.arctan2(jnp.sqrt(pp) * jnp.sqrt(aa), aa + ad)
    return jnp.where(has_a & has_b, theta, 0.0)


def _layer_angle(a: jax.Array, b: jax.Array, lo: LeafLayout) -> jax.Array:
    """Per-layer angle in ``[0, π]`` between ``a`` and ``b`` (keepdims).

    Near 0 the difference form is exact to float32 relative precision; near π the error of
    ``‖d_⊥‖`` is ``~eps (‖a‖ + ‖b‖)``, i.e. an absolute angle error of ``~2 eps``: the
    resolution of a float32 number near π, so no separate antiparallel branch is needed.
    """
    a32 = a.astype(jnp.float32)
    return _angle_to_sum(a32, b.astype(jnp.float32) - a32, lo)


def _cos_dist(theta: jax.Array) -> jax.Array:
    return 2.0 * jnp.square(jnp.sin(0.5 * theta))


def _whole(x: jax.Array) -> LeafLayout:
    return LeafLayout("", True, None, tuple(range(np.ndim(x))))


def angle(a: jax.Array, b: jax.Array) -> jax.Array:
    r"""Angle (radians, float32 scalar in ``[0, π]``) between two arrays seen as flat vectors.

    .. math::
      \theta(a, b) = \operatorname{atan2}\big(\lVert d_\perp \rVert \lVert a \rVert,\;
      a \cdot a + a \cdot d\big), \qquad d = b - a, \quad
      d_\perp = d - \tfrac{a \cdot d}{a \cdot a} a

    Exact to float32 relative precision for angles down to 1e-6 rad and below, and to
    float32 resolution (``~2e-7``) near π; 0 if either vector is zero.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> a = jnp.array([1.0, 0.0])
      >>> round(float(angle(a, jnp.array([1.0, 1e-6]))) / 1e-6, 5)  # arccos(cos) gives 0
      1.0
      >>> round(float(angle(a, jnp.array([-1.0, 1.0]))), 4)
      2.3562
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"`angle(a, b)`: shapes differ: {a.shape} vs {b.shape}.")
    return _layer_angle(jnp.ravel(a), jnp.ravel(b), _whole(jnp.ravel(a)))[0]


def cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
    r"""Cosine distance ``1 - cos(a, b) = 2 sin²(θ/2)`` between two flattened arrays.

    Computed from the accurate :func:`angle` (so ``~θ²/2`` is right even for ``θ = 1e-6``)
    and in ``[0, 2]``; 0 if either vector is zero.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> np.asarray(cosine_distance(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0])), float
      ...            ).round(4).tolist()
      0.2929
    """
    return _cos_dist(angle(a, b))


def _per_layer(
    fn: Callable[..., jax.Array], layering: Layering, tree: Any, *rest: Any
) -> dict[str, jax.Array]:
    """``{path: fn(layout, leaf, *rest_leaves)}`` over the layer leaves of ``tree``."""
    out = {}
    flats = [jtu.tree_flatten_with_path(tree)[0]] + [jax.tree.leaves(r) for r in rest]
    for i, (p, x) in enumerate(flats[0]):
        lo = layering.layout(path_str(p), x)
        if lo.is_layer:
            out[lo.path] = _squeeze(fn(lo, x, *(f[i] for f in flats[1:])), lo)
    if not out:
        raise ValueError(
            "No layer found: no leaf matches `is_layer` (default: leaves named kernel/embedding/w "
            "or with ndim >= 2). Pass `is_layer=` to choose them."
        )
    return out


def _unwrap(tree: Any) -> Any:
    """Replaces flax.nnx ``Variable`` leaves (anything with a ``.value`` array) by their value."""
    is_var = lambda x: hasattr(x, "value") and not isinstance(x, (np.ndarray, jax.Array))
    return jax.tree.map(lambda x: x.value if is_var(x) else x, tree, is_leaf=is_var)


def layer_angle(
    params: Any,
    reference: Any,
    *,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
) -> dict[str, jax.Array]:
    """Angle (radians) between each layer of ``params`` and of ``reference``.

    Returns ``{layer path: float32 array}``: a scalar per layer, or one value per stacked layer
    (``layer_axis``) / per unit (``per_unit``). Jit-friendly (no host sync).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> p0 = {"Dense_0": {"kernel": jnp.array([[1.0, 0.0]]), "bias": jnp.zeros(2)}}
      >>> p1 = {"Dense_0": {"kernel": jnp.array([[0.0, 2.0]]), "bias": jnp.ones(2)}}
      >>> {k: np.asarray(v, float).round(4).tolist() for k, v in layer_angle(p1, p0).items()}
      {'Dense_0/kernel': 1.5708}
    """
    params, reference = _unwrap(params), _unwrap(reference)
    check_same_structure(params, reference, "params", "reference")
    layering = Layering(is_layer, layer_axis, per_unit)
    return _per_layer(lambda lo, w, r: _layer_angle(r, w, lo), layering, params, reference)


def layer_rotation(
    params: Any,
    initial_params: Any,
    *,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
) -> dict[str, jax.Array]:
    r"""Cosine distance ``1 - cos(w_l, w_l^0)`` of each layer to its initial value.

    The quantity of the papers' layer rotation curves (seed 000, §3.1): 0 at init, 1 when the
    layer is orthogonal to its initialisation. Accurate for tiny rotations (see
    :func:`cosine_distance`); a zero-norm layer reports 0.

    Args:
      params: current parameters.
      initial_params: parameters at initialisation (same tree structure).
      is_layer, layer_axis, per_unit: which leaves are layers and how they are grouped (see
        :class:`~optax_layca._layers.Layering`).

    Returns:
      ``{layer path: float32 array}`` (scalar per layer; a vector for stacked layers/units).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> w0 = {"Dense_0": {"kernel": jnp.array([[1.0, 0.0]])}}
      >>> w1 = {"Dense_0": {"kernel": jnp.array([[1.0, 1.0]])}}
      >>> {k: np.asarray(v, float).round(4).tolist() for k, v in layer_rotation(w1, w0).items()}
      {'Dense_0/kernel': 0.2929}
    """
    angles = layer_angle(
        params, initial_params, is_layer=is_layer, layer_axis=layer_axis, per_unit=per_unit
    )
    return {k: _cos_dist(v) for k, v in angles.items()}


def rotation_rate(
    params_t1: Any,
    params_t2: Any,
    t1: int,
    t2: int,
    *,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
) -> dict[str, jax.Array]:
    """Layer rotation rate between two checkpoints: ``angle(w_t1, w_t2) / (t2 - t1)``.

    Seed 000, §3.1 (radians per step).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> a, b = {"w": jnp.array([[1.0, 0.0]])}, {"w": jnp.array([[0.0, 1.0]])}
      >>> np.asarray(rotation_rate(a, b, 10, 20)["w"], float).round(4).tolist()
      0.1571
    """
    if not isinstance(t1, (int, np.integer)) or not isinstance(t2, (int, np.integer)):
        raise TypeError(f"`rotation_rate(t1=..., t2=...)` must be ints; got {t1!r}, {t2!r}.")
    if t2 <= t1:
        raise ValueError(f"`rotation_rate` needs t2 > t1; got t1={t1}, t2={t2}.")
    angles = layer_angle(
        params_t2, params_t1, is_layer=is_layer, layer_axis=layer_axis, per_unit=per_unit
    )
    return {k: v / (t2 - t1) for k, v in angles.items()}


def layer_norms(
    tree: Any,
    *,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
) -> dict[str, jax.Array]:
    """Euclidean norm (float32) of each layer of ``tree`` (params, gradients or updates).

    Examples:
      >>> import jax.numpy as jnp
      >>> layer_norms({"Dense_0": {"kernel": jnp.array([[3.0, 4.0]]), "bias": jnp.ones(2)}})
      {'Dense_0/kernel': Array(5., dtype=float32)}
    """
    layering = Layering(is_layer, layer_axis, per_unit)
    return _per_layer(lambda lo, x: jnp.sqrt(layer_dot(x, x, lo)), layering, _unwrap(tree))


def second_moment_percentiles(
    opt_state: Any,
    q: Sequence[float] = (10.0, 50.0, 90.0),
    *,
    key: str = "nu",
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
) -> dict[str, jax.Array]:
    r"""Percentiles of Adam's second-moment estimate ``ν`` within each layer (seed 000, Fig. 11).

    ``ν_t = β₂ ν_{t-1} + (1 - β₂) g_t²`` is read from the optimizer state (the ``nu`` field of
    ``optax.scale_by_adam``'s state, found with ``optax.tree.get``; ``key=`` picks another
    field, e.g. of ``scale_by_rms``). Works on ``nnx.Optimizer`` states too.

    Args:
      opt_state: an optax state holding exactly one ``key`` field.
      q: percentiles in ``[0, 100]`` (default 10th, 50th, 90th as in the paper).
      key: name of the field holding the per-parameter estimate.
      is_layer, layer_axis: which leaves of ``ν`` are layers (same as for the params).

    Returns:
      ``{layer path: float32 array of shape (len(q),)}`` (``(n_stacked, len(q))`` for stacked
      layers).

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax
      >>> params = {"Dense_0": {"kernel": jnp.zeros((2, 2))}}
      >>> tx = optax.adam(1e-3)
      >>> state = tx.init(params)
      >>> g = {"Dense_0": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}}
      >>> _, state = tx.update(g, state, params)
      >>> p = second_moment_percentiles(state, q=(0, 100))
      >>> np.asarray(p["Dense_0/kernel"], float).round(4).tolist()  # (1 - 0.999) g²
      [0.001, 0.016]
    """
    q = tuple(float(x) for x in q)
    if not q or not all(0.0 <= x <= 100.0 for x in q):
        raise ValueError(f"`second_moment_percentiles(q=...)` must lie in [0, 100]; got {q}.")
    try:
        nu = optax.tree.get(_unwrap(opt_state), key)
    except KeyError as e:
        raise ValueError(
            f"`opt_state` holds several `{key}` fields (e.g. two Adam transforms); pass the "
            "state of one of them."
        ) from e
    if nu is None:
        raise ValueError(
            f"`opt_state` has no `{key}` field: pass the state of an Adam-like optimizer "
            "(optax.adam, optax.scale_by_adam, ...)."
        )
    layering = Layering(is_layer, layer_axis)
    qs = jnp.asarray(q, jnp.float32)

    def pct(lo, v):
        v = v.astype(jnp.float32)
        if lo.stack_axis is None:
            return jnp.percentile(jnp.ravel(v), qs)
        v = jnp.moveaxis(v, lo.stack_axis, 0).reshape(v.shape[lo.stack_axis], -1)
        return jax.vmap(lambda r: jnp.percentile(r, qs))(v)

    out = {}
    for p, v in jtu.tree_flatten_with_path(nu)[0]:
        lo = layering.layout(path_str(p), v)
        if lo.is_layer:
            out[lo.path] = pct(lo, v)
    if not out:
        raise ValueError(f"No layer found in `{key}`: pass `is_layer=` to choose them.")
    return out


def _dist64(x: Any, ref: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    d = np.asarray(x, np.float64) - ref
    return np.sqrt(np.sum(d * d, axis=axes))


def layer_convergence_rate(
    trajectory: Sequence[Any] | Mapping[int, Any],
    final_params: Any,
    t0: int,
    t1: int,
    t2: int,
    *,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
) -> dict[str, np.ndarray]:
    r"""Layer-wise convergence rate of seed 003 (Definition 2.1).

    With ``θ*`` the final (converged) parameters, for each layer ``l``:

    .. math::
      C_l^{(t_1, t_2)} = \frac{1}{t_2 - t_1}\,
        \frac{\lVert \theta_l^{(t_1)} - \theta_l^* \rVert_2 - \lVert \theta_l^{(t_2)} -
        \theta_l^* \rVert_2}{\lVert \theta_l^{(t_0)} - \theta_l^* \rVert_2}

    the fraction of the initial distance to the optimum covered per step. Computed on the host
    in float64. A layer that did not move (``θ^{(t_0)} = θ*``) gets ``C = 0``.

    Args:
      trajectory: parameters indexed by step: a sequence (``trajectory[t]``) or a mapping
        ``{step: params}``; must hold ``t0``, ``t1`` and ``t2``.
      final_params: ``θ*`` (same tree structure).
      t0: the training start; t1, t2: the interval, ``t1 < t2``.
      is_layer, layer_axis, per_unit: which leaves are layers.

    Returns:
      ``{layer path: float64 numpy array}`` (scalar per layer).

    Examples:
      >>> import numpy as np
      >>> traj = [{"w": np.full((2, 2), 4.0 - t)} for t in range(5)]  # moves 1/4 per step
      >>> c = layer_convergence_rate(traj, {"w": np.zeros((2, 2))}, t0=0, t1=1, t2=3)
      >>> float(c["w"])
      0.25

    References:
      `Which layer is learning faster? A systematic exploration of layer-wise convergence rate
      for deep neural networks`, ICLR 2023, Definition 2.1.
    """
    for name, t in (("t0", t0), ("t1", t1), ("t2", t2)):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"`layer_convergence_rate({name}=...)` must be an int; got {t!r}.")
    if not t1 < t2:
        raise ValueError(f"`layer_convergence_rate` needs t1 < t2; got t1={t1}, t2={t2}.")

    def at(t, name):
        try:
            return _unwrap(trajectory[t])
        except (KeyError, IndexError) as e:
            raise ValueError(f"`trajectory` has no parameters at step {name}={t}.") from e

    final_params = _unwrap(final_params)
    thetas = {name: at(t, name) for name, t in (("t0", t0), ("t1", t1), ("t2", t2))}
    for name, tree in thetas.items():
        check_same_structure(tree, final_params, f"trajectory[{name}]", "final_params")
    layering = Layering(is_layer, layer_axis, per_unit)
    star = jtu.tree_flatten_with_path(final_params)[0]
    flat = {k: jax.tree.leaves(v) for k, v in thetas.items()}
    out = {}
    for i, (p, w_star) in enumerate(star):
        lo = layering.layout(path_str(p), w_star)
        if not lo.is_layer:
            continue
        ws = np.asarray(w_star, np.float64)
        d0, d1, d2 = (_dist64(flat[k][i], ws, lo.reduce_axes) for k in ("t0", "t1", "t2"))
        rate = np.where(d0 > 0, (d1 - d2) / ((t2 - t1) * np.where(d0 > 0, d0, 1.0)), 0.0)
        out[lo.path] = rate
    if not out:
        raise ValueError("No layer found in `final_params`: pass `is_layer=` to choose them.")
    return out


# ----------------------------------------------------------------------------- monitor


class TrackRotationState(NamedTuple):
    """State of :func:`track_rotation`. Figures are ``{layer path: float32 array}`` dicts.

    Attributes:
      rotation_step: number of updates seen (int32).
      initial_layers: ``{layer path: w⁰}``, a copy of each layer at ``init`` (param dtype).
      initial_layer_norm: ``{layer path: ‖w⁰‖}`` (float32, reduced axes kept).
      cosine_distance: ``1 - cos(w_t, w⁰)`` of the parameters *after* the last update.
      step_angle: angle (rad) between the parameters before and after the last update.
      cumulative_angle: sum of all step angles so far (path length on the sphere); lets
        :class:`RotationHistory` recover mean per-step angles from sparse records.
      grad_norm: norm of the incoming updates (the raw gradient when ``track_rotation`` wraps
        the optimizer or is placed first; equals ``update_norm`` when placed last).
      weight_norm: norm of the parameters after the last update (``‖w⁰‖`` at init).
      update_norm: norm of the final update.
      tracked_state: state of the wrapped transform (``optax.EmptyState()`` when none).
    """

    rotation_step: jax.Array
    initial_layers: dict
    initial_layer_norm: dict
    cosine_distance: dict
    step_angle: dict
    cumulative_angle: dict
    grad_norm: dict
    weight_norm: dict
    update_norm: dict
    tracked_state: Any


_CANCEL = 1e-3  # one-pass ‖x_⊥‖² below this fraction of ‖x‖²: recompute it explicitly
_NEAR_INIT = 1e-6  # ‖w - w⁰‖² below this fraction of ‖w⁰‖²: recompute the distance explicitly


def _monitor_layer(lo: LeafLayout, w, u, g, w0, n0):
    """Per-layer (step angle, cosine distance to w⁰, ‖g‖, ‖w+u‖, ‖u‖), float32 keepdims.

    Four or five dot products per layer (XLA:CPU does not fuse sibling reductions, so each
    re-reads its operands; fewer is faster): ``w·w, w·u, u·u, e·e`` with ``e = w + u - w⁰``,
    and ``g·g``. With ``a = ‖w⁰‖`` (stored at init) and ``b = ‖w + u‖``:

    * step angle ``atan2(‖u_⊥‖ ‖w‖, w·w + w·u)``, ``‖u_⊥‖² = u·u - (w·u)²/w·w``;
    * cosine distance ``(‖e‖² - (b - a)²) / (2ab)`` (law of cosines), ``b - a = (b² - a²)/(a + b)``.

    Both subtractions cancel only for nearly radial vectors (their tangential part below 1e-3
    of the total, e.g. pure weight decay), and the second one also loses digits within
    ~1e-3 rad of ``w⁰``; then, and only then (``lax.cond``), the projections are formed
    explicitly as in :func:`angle`.
    """
    w, u, w0 = (x.astype(jnp.float32) for x in (w, u, w0))
    e = (w - w0) + u  # not (w + u) - w⁰: that rounds w + u at the scale of ‖w‖
    ww, wu, uu, ee = (
        layer_dot(w, w, lo),
        layer_dot(w, u, lo),
        layer_dot(u, u, lo),
        layer_dot(e, e, lo),
    )
    gg = uu if g is None else layer_dot(g, g, lo)
    ww_safe = jnp.where(ww > 0, ww, 1.0)
    nn = jnp.maximum(ww + 2.0 * wu + uu, 0.0)  # ‖w + u‖²
    a, b = n0, jnp.sqrt(nn)
    up2 = jnp.maximum(uu - wu * (wu / ww_safe), 0.0)
    radial = (nn - a * a) / jnp.where(a + b > 0, a + b, 1.0)
    tangential2 = jnp.maximum(ee - radial * radial, 0.0)  # 2ab (1 - cos)
    # also near w⁰ (angle ≲ 1e-3): there the rounding of b - a (~1e-7 a) matters against ‖e‖
    near_init = ee < _NEAR_INIT * a * a
    inexact = jnp.any(up2 < _CANCEL * uu) | jnp.any((tangential2 < _CANCEL * ee) | near_init)

    def explicit(_):
        # projected twice: the second pass removes the radial residue left by rounding
        u_perp = u - (wu / ww_safe) * w
        u_perp = u_perp - (layer_dot(u_perp, w, lo) / ww_safe) * w
        w00 = jnp.where(a > 0, a * a, 1.0)
        ew = layer_dot(e, w0, lo)
        e_perp = e - (ew / w00) * w0
        e_perp = e_perp - (layer_dot(e_perp, w0, lo) / w00) * w0
        theta = jnp.arctan2(jnp.sqrt(layer_dot(e_perp, e_perp, lo)) * a, a * a + ew)
        return layer_dot(u_perp, u_perp, lo), 2.0 * a * b * _cos_dist(theta)

    up2, tangential2 = jax.lax.cond(inexact, explicit, lambda _: (up2, tangential2), None)
    step = jnp.arctan2(jnp.sqrt(up2) * jnp.sqrt(ww), ww + wu)
    step = jnp.where((ww > 0) & (nn > 0), step, 0.0)
    ab = a * b
    cos_dist = jnp.where(ab > 0, jnp.clip(tangential2 / jnp.where(ab > 0, 2.0 * ab, 1.0), 0, 2), 0)
    return step, cos_dist, jnp.sqrt(gg), b, jnp.sqrt(uu)


def track_rotation(
    tx: optax.GradientTransformation | None = None,
    *,
    every: int = 1,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Layer rotation monitor: passes updates through and keeps per-layer figures in its state.

    Two ways to use it:

    * **wrapping** an optimizer, ``track_rotation(optax.adam(1e-3))``: it sees the raw gradient
      (``grad_norm``) and the optimizer's final update;
    * **last in a chain**, ``optax.chain(..., track_rotation())``: a pass-through (identity)
      that sees the final update; ``grad_norm`` is then the norm of that update.

    At step ``t`` with parameters ``w`` and final update ``u`` (new parameters ``w' = w + u``),
    it records for every layer ``l``:

    .. math::
      \begin{align*}
        \text{cosine\_distance}_l &= 1 - \cos(w'_l, w^0_l), &
        \text{step\_angle}_l &= \angle(w_l, w'_l), \\
        \text{cumulative\_angle}_l &= \textstyle\sum_{s \le t} \text{step\_angle}_l(s), &
        \text{weight\_norm}_l &= \lVert w'_l \rVert, \quad
        \text{update\_norm}_l = \lVert u_l \rVert
      \end{align*}

    with the accurate angles of :func:`angle` (exact for steps of 1e-6 rad, 0 for zero-norm
    layers), from one fused pass of dot products per layer (explicit projections are added,
    under a ``lax.cond``, only for nearly radial updates where that pass would cancel). The figures are ``{layer path: float32}`` dicts in named fields of
    :class:`TrackRotationState`, so ``optax.tree.get(opt_state, "cosine_distance")`` reads
    them after a jitted step; shapes never change, so there is no recompilation.

    .. warning::
      The figures describe ``params + updates``: the monitor must see the *final* update,
      i.e. wrap the optimizer or sit last in ``optax.chain`` (after ``scale_by_learning_rate``
      / Layca's op 4). Placed elsewhere it passes updates through unchanged but its figures
      refer to a partial update.

    It stores a copy of every layer at ``init`` (memory: one extra copy of the layer leaves).
    Non-layer leaves (biases, norm scales) are not tracked.

    Cost: one fused set of per-layer dot products over ``(w, u, w⁰, g)`` per step, i.e. a few
    reads of the parameters (``benchmarks/monitor_overhead.py``). With ``every=k`` the figures
    are computed on updates ``k, 2k, …`` only (``lax.cond``; held in between), for ~1/k of
    the cost; ``cumulative_angle`` is then the estimate ``k · Σ`` (measured step angles).

    Args:
      tx: optimizer to wrap (None: identity, to place last in a chain).
      every: compute the figures every ``every`` updates (match the
        :class:`RotationHistory` schedule).
      is_layer, layer_axis, per_unit: which leaves are layers, as for :func:`~optax_layca.layca`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (needs ``params`` in ``update``). Extra
      arguments are forwarded to ``tx``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from optax_layca import layca
      >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, 0.0], [0.0, 1.0]]), "bias": jnp.zeros(2)}}
      >>> tx = optax.chain(layca(learning_rate=0.1), track_rotation())
      >>> state = tx.init(params)
      >>> grads = {"Dense_0": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "bias": jnp.ones(2)}}
      >>> updates, state = jax.jit(tx.update)(grads, state, params)
      >>> angle_ = optax.tree.get(state, "step_angle")["Dense_0/kernel"]
      >>> np.asarray([angle_, np.arctan(0.1)], float).round(5).tolist()
      [0.09967, 0.09967]
    """
    if tx is not None and not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"`track_rotation(tx=...)` must be an optax transformation; got {tx!r}.")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"`track_rotation(every=...)` must be an int >= 1; got {every!r}.")
    every = int(every)
    layering = Layering(is_layer, layer_axis, per_unit)
    inner = tx if tx is not None else optax.identity()

    def layers_of(params):
        return [
            (lo, x)
            for lo, x in zip(layering.layouts(params), jax.tree.leaves(params))
            if lo.is_layer
        ]

    def init_fn(params):
        layers = layers_of(params)
        if not layers:
            raise ValueError(
                "`track_rotation`: no layer found in params (default: leaves named "
                "kernel/embedding/w or with ndim >= 2). Pass `is_layer=` to choose them."
            )
        # fresh buffers per field: a state whose leaves share a buffer cannot be donated
        zeros = lambda: {
            lo.path: jnp.zeros(_kept_shape(lo, np.shape(x)), jnp.float32) for lo, x in layers
        }
        return TrackRotationState(
            rotation_step=jnp.zeros((), jnp.int32),
            initial_layers={lo.path: jnp.copy(x) for lo, x in layers},
            initial_layer_norm={lo.path: jnp.sqrt(layer_dot(x, x, lo)) for lo, x in layers},
            cosine_distance=zeros(),
            step_angle=zeros(),
            cumulative_angle=zeros(),
            grad_norm=zeros(),
            weight_norm={lo.path: _squeeze(jnp.sqrt(layer_dot(x, x, lo)), lo) for lo, x in layers},
            update_norm=zeros(),
            tracked_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(NO_PARAMS_MSG)
        check_same_structure(updates, params, "updates")
        grads = updates
        if isinstance(inner, optax.GradientTransformationExtraArgs):
            updates, inner_state = inner.update(updates, state.tracked_state, params, **extra_args)
        else:
            updates, inner_state = inner.update(updates, state.tracked_state, params)
        layers = layers_of(params)
        known = set(state.initial_layers)
        seen = {lo.path for lo, _ in layers}
        if seen != known:
            raise ValueError(
                "`track_rotation`: the layers of params differ from those seen at init. "
                f"New: {sorted(seen - known)}; missing: {sorted(known - seen)}."
            )
        u_leaves, g_leaves = jax.tree.leaves(updates), jax.tree.leaves(grads)
        layouts = layering.layouts(params)
        w_leaves = jax.tree.leaves(params)

        def measure(_):
            figs = {name: {} for name in FIGURES}
            for i, (lo, w) in enumerate(zip(layouts, w_leaves)):
                if not lo.is_layer:
                    continue
                g = None if tx is None else g_leaves[i]
                path = lo.path
                step, cos_dist, g_norm, w_norm, u_norm = _monitor_layer(
                    lo,
                    w,
                    u_leaves[i],
                    g,
                    state.initial_layers[path],
                    state.initial_layer_norm[path],
                )
                sq = functools.partial(_squeeze, lo=lo)
                figs["cosine_distance"][lo.path] = sq(cos_dist)
                figs["step_angle"][lo.path] = sq(step)
                figs["cumulative_angle"][lo.path] = state.cumulative_angle[lo.path] + every * sq(
                    step
                )
                figs["grad_norm"][lo.path] = sq(g_norm)
                figs["weight_norm"][lo.path] = sq(w_norm)
                figs["update_norm"][lo.path] = sq(u_norm)
            return figs

        if every == 1:
            figs = measure(None)
        else:
            held = {name: getattr(state, name) for name in FIGURES}
            due = (state.rotation_step + 1) % every == 0
            figs = jax.lax.cond(due, measure, lambda _: held, None)
        new_state = TrackRotationState(
            rotation_step=optax.safe_increment(state.rotation_step),
            initial_layers=state.initial_layers,
            initial_layer_norm=state.initial_layer_norm,
            tracked_state=inner_state,
            **figs,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- history


def _find_monitor_state(obj: Any) -> TrackRotationState | None:
    found = [
        x
        for x in jax.tree.leaves(obj, is_leaf=lambda x: isinstance(x, TrackRotationState))
        if isinstance(x, TrackRotationState)
    ]
    if len(found) > 1:
        raise ValueError(
            f"The optimizer state holds {len(found)} `track_rotation` states; pass one of them."
        )
    return found[0] if found else None


def _figures_of(obj: Any) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """(figures ``{name: {path: array}}``, initial layers or None) from a state or a dict."""
    obj = _unwrap(obj)
    mon = _find_monitor_state(obj)
    if mon is not None:
        return {name: dict(getattr(mon, name)) for name in FIGURES}, dict(mon.initial_layers)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Mapping) for v in obj.values()):
        return {str(k): dict(v) for k, v in obj.items()}, None
    raise ValueError(
        "`RotationHistory.record` needs an optimizer state containing a `track_rotation` state, "
        "or a dict `{figure name: {layer path: array}}`; got "
        f"{type(obj).__name__}."
    )


@functools.partial(jax.jit, static_argnums=(2, 3))
def _epoch_rotation(ref: dict, cur: dict, layering: Layering, layers: tuple[str, ...]):
    """(cosine distances of ``layers`` between ``ref`` and ``cur``, packed; a copy of ``cur``)."""
    out = []
    for path in layers:
        lo = layering.layout(path, cur[path])
        out.append(jnp.ravel(_cos_dist(_layer_angle(ref[path], cur[path], lo))))
    return jnp.concatenate(out), {k: jnp.copy(v) for k, v in cur.items()}


@jax.jit
def _pack(leaves: list[jax.Array]) -> jax.Array:
    """One float32 vector holding every figure: one buffer per record, one transfer later."""
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


class RotationHistory:
    """Host-side record of the per-layer rotation figures over training.

    ``record(step, opt_state)`` keeps the figures of the :func:`track_rotation` state found in
    ``opt_state`` as *device* arrays (packed into one vector by a jitted concat, with an
    asynchronous copy to the host started): no device sync per step. They are converted to
    numpy in one batch when read (:meth:`get`, :meth:`as_dict`, :meth:`save`, ...).

    Records are taken when ``every(step)`` is true (an int ``k`` means every ``k`` steps,
    counting from step 0) and always at epoch boundaries (``epoch=`` given). Passing
    ``params=`` at epoch boundaries also records the per-epoch rotation (cosine distance
    between each layer at the previous boundary, or at init for the first one, and now: seed
    000, Fig. 10, row 1).

    ``step`` should be the number of updates applied so far (the monitor's ``rotation_step``).
    The per-epoch rotation keeps one copy of the layers (on device) from boundary to boundary.

    Args:
      every: record schedule, an int ``k > 0`` or ``callable(step) -> bool``.
      is_layer, layer_axis, per_unit: layer grouping, as given to :func:`track_rotation`
        (used only for the per-epoch rotation).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2))}, "Dense_1": {"kernel": jnp.ones((2, 1))}}
      >>> tx = track_rotation(optax.sgd(0.1))
      >>> state, hist = tx.init(params), RotationHistory(every=2)
      >>> for step in range(1, 5):
      ...     grads = jax.tree.map(lambda w: jnp.sin(w.size * jnp.arange(w.size) + step
      ...                                          ).reshape(w.shape), params)
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      ...     _ = hist.record(step, state, epoch=1 if step == 4 else None, params=params)
      >>> hist.steps.tolist(), hist.layers
      ([2, 4], ('Dense_0/kernel', 'Dense_1/kernel'))
      >>> hist.get("cosine_distance")["Dense_0/kernel"].shape
      (2,)
    """

    def __init__(
        self,
        every: int | Callable[[int], bool] = 1,
        *,
        is_layer: IsLayer = None,
        layer_axis: LayerAxis = None,
        per_unit: bool = False,
    ):
        if callable(every):
            self._every = every
        elif isinstance(every, (int, np.integer)) and not isinstance(every, bool) and every > 0:
            k = int(every)
            self._every = lambda step: step % k == 0
        else:
            raise ValueError(
                f"`RotationHistory(every=...)` must be an int > 0 or callable(step) -> bool; "
                f"got {every!r}."
            )
        self._layering = Layering(is_layer, layer_axis, per_unit)
        self._names: tuple[str, ...] | None = None
        self._layers: tuple[str, ...] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._steps: list[int] = []
        self._epochs: list[float] = []
        self._pending: list[jax.Array] = []
        self._host = np.zeros((0, 0), np.float32)
        self._epoch_ids: list[int] = []
        self._epoch_pending: list[jax.Array] = []
        self._epoch_host = np.zeros((0, 0), np.float32)
        self._epoch_ref: dict[str, jax.Array] | None = None
        self._epoch_shapes: dict[str, tuple[int, ...]] = {}

    # -- recording

    def should_record(self, step: int) -> bool:
        """Whether ``record(step, ...)`` without ``epoch=`` keeps a record."""
        return bool(self._every(int(step)))

    def record(
        self,
        step: int,
        opt_state_or_figures: Any,
        epoch: int | None = None,
        *,
        params: Any = None,
        extra: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> bool:
        """Records the figures at ``step`` if the schedule says so or ``epoch`` is given.

        Args:
          step: number of updates applied so far.
          opt_state_or_figures: an optimizer state containing a :func:`track_rotation` state
            (also inside ``nnx.Optimizer``), or ``{figure name: {layer path: array}}``.
          epoch: the epoch that just ended (records unconditionally).
          params: current parameters; at epoch boundaries, enables :meth:`per_epoch_rotation`.
          extra: more figures ``{name: {layer path: array}}`` (e.g. ``{"nu_percentiles":
            second_moment_percentiles(opt_state)}``); the same names at every record.

        Returns:
          True if a record was kept.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"`RotationHistory.record(step=...)` must be an int; got {step!r}.")
        if epoch is None and not self.should_record(step):
            return False
        figures, initial = _figures_of(opt_state_or_figures)
        if extra:
            figures.update({str(k): dict(v) for k, v in extra.items()})
        names = tuple(figures)
        layers = tuple(next(iter(figures.values())))
        if self._names is None:
            for name in names:
                if tuple(figures[name]) != layers:
                    raise ValueError(
                        f"Figure {name!r} has layers {sorted(figures[name])}, others have "
                        f"{sorted(layers)}."
                    )
            self._names, self._layers = names, layers
            self._shapes = {
                f"{n}/{p}": tuple(np.shape(figures[n][p])) for n in names for p in layers
            }
        elif names != self._names or any(tuple(figures[n]) != self._layers for n in names):
            raise ValueError(
                "`RotationHistory.record`: figures or layers changed since the first record: "
                f"had {self._names} over {self._layers}, got {names} over "
                f"{tuple(figures[names[0]])}."
            )
        leaves = [figures[n][p] for n in self._names for p in self._layers]
        for (key, shape), x in zip(self._shapes.items(), leaves):
            if tuple(np.shape(x)) != shape:
                raise ValueError(f"Figure {key!r} changed shape: {shape} -> {np.shape(x)}.")
        packed = _pack(leaves)
        _start_copy(packed)
        self._pending.append(packed)
        self._steps.append(int(step))
        self._epochs.append(float("nan") if epoch is None else float(epoch))
        if epoch is not None and params is not None:
            self._record_epoch(int(epoch), _unwrap(params), initial)
        return True

    def _record_epoch(self, epoch: int, params: Any, initial: dict | None) -> None:
        current = {}
        for p, x in jtu.tree_flatten_with_path(params)[0]:
            lo = self._layering.layout(path_str(p), x)
            if lo.path in self._layers:
                current[lo.path] = x
        missing = [p for p in self._layers if p not in current]
        if missing:
            raise ValueError(
                f"`RotationHistory.record(params=...)` lacks the recorded layers {missing}."
            )
        ref = self._epoch_ref if self._epoch_ref is not None else initial
        if ref is None:
            raise ValueError(
                "`RotationHistory`: the first epoch boundary needs the initial layers: record a "
                "state containing `track_rotation`."
            )
        if not self._epoch_shapes:
            self._epoch_shapes = {
                p: _kept_shape(self._layering.layout(p, current[p]), np.shape(current[p]))
                for p in self._layers
            }
        vec, self._epoch_ref = _epoch_rotation(ref, current, self._layering, self._layers)
        _start_copy(vec)
        self._epoch_pending.append(vec)
        self._epoch_ids.append(epoch)

    # -- reading

    def _sync(self) -> None:
        if self._pending:
            new = np.stack(jax.device_get(self._pending)).astype(np.float32)
            self._host = new if self._host.size == 0 else np.concatenate([self._host, new])
            self._pending = []
        if self._epoch_pending:
            new = np.stack(jax.device_get(self._epoch_pending)).astype(np.float32)
            host = self._epoch_host
            self._epoch_host = new if host.size == 0 else np.concatenate([host, new])
            self._epoch_pending = []

    def __len__(self) -> int:
        return len(self._steps)

    def _check_nonempty(self) -> None:
        if not self._steps:
            raise ValueError("The rotation history is empty: call `record(step, opt_state)` first.")

    @property
    def steps(self) -> np.ndarray:
        """Steps of the records (int64)."""
        self._check_nonempty()
        return np.asarray(self._steps, np.int64)

    @property
    def epochs(self) -> np.ndarray:
        """Epoch of each record (float; NaN for records not at an epoch boundary)."""
        self._check_nonempty()
        return np.asarray(self._epochs, np.float64)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the recorded figures."""
        self._check_nonempty()
        return self._names

    @property
    def layers(self) -> tuple[str, ...]:
        """Recorded layer paths, in natural (≈ forward) order."""
        self._check_nonempty()
        return natural_order(self._layers)

    def get(self, name: str, layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``{layer path: array (num_records, *figure shape)}`` of figure ``name``.

        Args:
          name: one of :attr:`names` (e.g. ``"cosine_distance"``).
          layers: subset of layer paths (default all, in natural order).
        """
        self._check_nonempty()
        if name not in self._names:
            raise ValueError(f"Unknown figure {name!r}; recorded figures are {list(self._names)}.")
        layers = self._check_layers(layers)
        self._sync()
        return {p: self._column(self._host, name, p, len(self._steps)) for p in layers}

    def _check_layers(self, layers: Sequence[str] | None) -> tuple[str, ...]:
        if layers is None:
            return self.layers
        if isinstance(layers, str):
            layers = [layers]
        unknown = [p for p in layers if p not in self._layers]
        if unknown:
            raise ValueError(
                f"Unknown layer(s) {unknown}; the history has layers {list(self.layers)}."
            )
        return tuple(layers)

    def _offsets(self) -> dict[str, tuple[int, int]]:
        out, start = {}, 0
        for key, shape in self._shapes.items():
            n = int(np.prod(shape, dtype=np.int64))
            out[key] = (start, start + n)
            start += n
        return out

    def _column(self, host: np.ndarray, name: str, path: str, rows: int) -> np.ndarray:
        a, b = self._offsets()[f"{name}/{path}"]
        return host[:, a:b].reshape((rows, *self._shapes[f"{name}/{path}"]))

    def per_epoch_rotation(
        self, layers: Sequence[str] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Cosine distance between each layer's weights at the start and end of every epoch.

        Returns ``(epochs, {layer path: array (num_epochs, ...)})``. Needs ``params=`` passed
        to :meth:`record` at epoch boundaries.
        """
        self._check_nonempty()
        if not self._epoch_ids:
            raise ValueError(
                "No per-epoch rotation recorded: call `record(step, state, epoch=e, "
                "params=params)` at the end of each epoch."
            )
        layers = self._check_layers(layers)
        self._sync()
        out, start = {}, 0
        offsets = {}
        for p in self._layers:
            n = int(np.prod(self._epoch_shapes[p], dtype=np.int64))
            offsets[p] = (start, start + n)
            start += n
        for p in layers:
            a, b = offsets[p]
            out[p] = self._epoch_host[:, a:b].reshape(
                (len(self._epoch_ids), *self._epoch_shapes[p])
            )
        return np.asarray(self._epoch_ids, np.int64), out

    def step_angles(self, layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Per-step rotation angle of every step ``1 … steps[-1]``, from the records.

        Between two records the mean step angle ``(Σθ(t2) - Σθ(t1)) / (t2 - t1)`` (from
        ``cumulative_angle``, with ``Σθ = 0`` at step 0) is repeated for each step of the
        interval; recorded every step, this is the exact per-step angle. Feeds
        :func:`~optax_layca.adapt_copy`.

        Returns:
          ``{layer path: float64 array (steps[-1], ...)}``; row ``t`` is the angle of update
          ``t + 1``.
        """
        cum = self.get("cumulative_angle", layers)
        steps = self.steps
        if np.any(np.diff(steps) <= 0) or steps[0] <= 0:
            raise ValueError(
                "`step_angles` needs records at strictly increasing steps > 0; got "
                f"{steps.tolist()[:10]}."
            )
        lengths = np.diff(np.concatenate([[0], steps]))
        out = {}
        for p, c in cum.items():
            c = np.asarray(c, np.float64)
            prev = np.concatenate([np.zeros((1, *c.shape[1:])), c[:-1]])
            mean = (c - prev) / lengths.reshape((-1,) + (1,) * (c.ndim - 1))
            out[p] = np.repeat(mean, lengths, axis=0)
        return out

    # -- export

    def as_dict(self) -> dict[str, np.ndarray]:
        """Flat ``{key: numpy array}``: ``"step"``, ``"epoch"``, ``"<figure>/<layer path>"``
        (rows = records) and, if recorded, ``"epoch_rotation/epoch"`` and
        ``"epoch_rotation/<layer path>"``."""
        self._check_nonempty()
        out = {"step": self.steps, "epoch": self.epochs}
        for name in self._names:
            for p, v in self.get(name).items():
                out[f"{name}/{p}"] = v
        if self._epoch_ids:
            epochs, rot = self.per_epoch_rotation()
            out["epoch_rotation/epoch"] = epochs
            out.update({f"epoch_rotation/{p}": v for p, v in rot.items()})
        return out

    def _meta(self) -> dict:
        return {
            "format": "optax_layca.RotationHistory/1",
            "names": list(self._names),
            "layers": list(self._layers),
            "shapes": {k: list(v) for k, v in self._shapes.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Writes the history to ``path``: ``.json`` (lists) or anything else as ``.npz``."""
        path = Path(path)
        data = self.as_dict()
        meta = self._meta()
        if path.suffix == ".json":
            payload = {"meta": meta, "data": {k: np.asarray(v).tolist() for k, v in data.items()}}
            path.write_text(json.dumps(payload, allow_nan=True))
        else:
            np.savez(path, __meta__=np.asarray(json.dumps(meta)), **data)
            if path.suffix != ".npz":
                path = path.with_name(path.name + ".npz")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RotationHistory:
        """Reads a history written by :meth:`save` (further records can be appended)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"No rotation history at {str(path)!r}.")
        if path.suffix == ".json":
            payload = json.loads(path.read_text())
            meta, data = payload["meta"], {k: np.asarray(v) for k, v in payload["data"].items()}
        else:
            with np.load(path) as z:
                meta = json.loads(str(z["__meta__"]))
                data = {k: z[k] for k in z.files if k != "__meta__"}
        if meta.get("format") != "optax_layca.RotationHistory/1":
            raise ValueError(f"{str(path)!r} is not a saved RotationHistory.")
        hist = cls()
        hist._names = tuple(meta["names"])
        hist._layers = tuple(meta["layers"])
        hist._shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
        hist._steps = [int(s) for s in data["step"]]
        hist._epochs = [float(e) for e in data["epoch"]]
        rows = len(hist._steps)
        hist._host = np.concatenate(
            [
                np.asarray(data[f"{n}/{p}"], np.float32).reshape(rows, -1)
                for n in hist._names
                for p in hist._layers
            ],
            axis=1,
        )
        if "epoch_rotation/epoch" in data:
            hist._epoch_ids = [int(e) for e in data["epoch_rotation/epoch"]]
            n = len(hist._epoch_ids)
            hist._epoch_shapes = {
                p: tuple(np.shape(data[f"epoch_rotation/{p}"])[1:]) for p in hist._layers
            }
            hist._epoch_host = np.concatenate(
                [
                    np.asarray(data[f"epoch_rotation/{p}"], np.float32).reshape(n, -1)
                    for p in hist._layers
                ],
                axis=1,
            )
        return hist


def _start_copy(x: jax.Array) -> None:
    try:
        x.copy_to_host_async()
    except AttributeError:  # pragma: no cover - older jax / non-array
        pass
