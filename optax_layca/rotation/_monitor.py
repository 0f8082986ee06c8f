"""The layer rotation monitor: a pass-through optax transform keeping per-layer figures."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._base import NO_PARAMS_MSG, check_int
from .._custom_types import IsLayer, LayerAxis
from .._layca import RotationProbe, ScaleByLaycaState
from .._layers import (
    CANCEL,
    Layering,
    LeafLayout,
    check_same_shapes,
    check_same_structure,
    distance_to_reference,
    kept_shape,
    layer_dots,
    nan_where,
    no_layer_error,
    pow2,
    scaled_layer_dots,
    scaled_layer_norm,
    shape_of,
    squeeze_reduced,
    upcast,
)

FIGURES = (
    "cosine_distance",
    "step_angle",
    "cumulative_angle",
    "grad_norm",
    "weight_norm",
    "update_norm",
)
"""Per-layer figures kept by :func:`track_rotation`, in this order."""


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
      update_norm: norm of the change of the stored parameters, ``‖w' - w‖`` (the final
        update, rounded as ``apply_updates`` stores it).
      tracked_state: state of the wrapped transform (``optax.EmptyState()`` when none).
      zero_initial_layer_norm: ``{layer path: bool}``, ``‖w⁰‖ == 0`` (per stacked layer/unit).
        Such a layer has no direction at init: its cosine distance and step angles are
        reported as 0 by convention, and under a norm-pinning transform (Layca, AdaptCopy) it
        never trains. :class:`RotationHistory` lists these layers (``frozen_layers``) and warns.

    The figures are keyed by layer path, not shaped like params, so ``optax.tree.map_params``
    (e.g. to build sharding specs) does not apply to this state; ``jax.tree.map`` does.
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
    zero_initial_layer_norm: dict




def _monitored_vectors(w, u, w0, g=None, *, dtype):
    """``(w, d, e, w⁰[, g])`` in the compute dtype (float32 at least), ``d = w' - w``, ``e = w' - w⁰``, ``w'`` as stored.

    Derived inside each reduction (and each ``lax.cond`` branch) from the stored arrays, so
    that ``d`` and ``e`` are never materialised.
    """
    w32, u32, w0_32 = upcast(w, u, w0)
    new = w32 + u32
    if dtype != w32.dtype:
        # round to the param dtype as apply_updates does; reduce_precision, not a round trip
        # through astype, which XLA may drop as "excess precision"
        info = jnp.finfo(dtype)
        new = jax.lax.reduce_precision(new, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    # differences of stored values: exact in float32 near w
    out = (w32, new - w32, new - w0_32, w0_32)
    return out if g is None else out + (g.astype(w32.dtype),)


def monitor_layer(lo: LeafLayout, w, u, g, w0, n0):
    """Per-layer (step angle, cosine distance to w⁰, ‖g‖, ‖w'‖, ‖w' - w‖), float32 keepdims.

    ``w' = (w + u).astype(w.dtype)`` are the parameters as ``optax.apply_updates`` stores them:
    with bf16/f16 params the figures describe the rotation that actually happened to the
    stored weights (a step below their resolution is a step of 0), not the update's intent.

    One pass of dot products per layer (:func:`~optax_layca._layers.layer_dots`): ``w·w, w·d,
    d·d, e·e`` with ``d = w' - w`` and ``e = w' - w⁰``, and ``g·g``. With ``a = ‖w⁰‖`` (stored
    at init) and ``b = ‖w'‖``:

    * step angle ``atan2(‖d_⊥‖ ‖w‖, w·w + w·d)``, ``‖d_⊥‖² = d·d - (w·d)²/w·w``;
    * cosine distance ``(‖e‖² - (b - a)²) / (2ab)`` (law of cosines), ``b - a = (b² - a²)/(a + b)``.

    Both subtractions cancel only for nearly radial vectors (their tangential part below 1e-3
    of the total, e.g. pure weight decay), and the second one also loses digits within
    ~1e-3 rad of ``w⁰``; then, and only then (``lax.cond``), the projections are formed
    explicitly as in :func:`angle`. The sums run on power-of-two rescaled copies when a layer
    is tiny or huge (:func:`~optax_layca._layers.scaled_layer_dots`). A NaN or Inf in ``w``,
    ``u`` or ``w⁰`` gives NaN angle and distance, never 0.
    """
    raw = (w, u, w0) if g is None else (w, u, w0, g)
    make = functools.partial(_monitored_vectors, dtype=w.dtype)
    pairs = ((0, 0), (0, 1), (1, 1), (2, 2)) + (() if g is None else ((4, 4),))
    # w, d = w' - w, e = w' - w⁰ (bounded by w, u, w⁰) share one power-of-two exponent
    dots, exps = scaled_layer_dots(lo, pairs, *raw, make=make, groups=(0, 0, 0, 0, 1)[: len(raw) + 1],
                                   sources=((0,), (0, 1), (0, 1, 2), (2,), (3,))[: len(raw) + 1])
    ww, wd, dd, ee = dots[:4]
    gg, eg = (dd, exps[0]) if g is None else (dots[4], exps[1])
    unit = pow2(-exps[0])  # the figures below are in units of the rescaled w, d, e
    ww_safe = jnp.where(ww > 0, ww, 1.0)
    nn = jnp.maximum(ww + 2.0 * wd + dd, 0.0)  # ‖w'‖²
    a, b = n0 * unit, jnp.sqrt(nn)
    dp2 = jnp.maximum(dd - wd * (wd / ww_safe), 0.0)

    def explicit(*raw):
        # d⊥ = d - c w with c refined once (removes the radial residue of c's rounding,
        # eps c ‖w‖, which would add its square to ‖d⊥‖²); d recomputed in every pass
        off = lambda c: (lambda w, d: (d - c * w, w))(*(x * unit for x in make(*raw)[:2]))  # noqa: E731
        c = wd / ww_safe
        c = c + layer_dots(lo, ((0, 1),), *off(c))[0] / ww_safe
        return layer_dots(lo, ((0, 0),), off(c)[0])[0]

    dp2 = jax.lax.cond(jnp.any(dp2 < CANCEL * dd), explicit, lambda *_: dp2, *raw)
    e_and_w0 = lambda *raw: tuple(x * unit for x in make(*raw)[2:4])  # noqa: E731
    cos_dist = distance_to_reference(lo, ee, a, b, e_and_w0, *raw)
    step = jnp.arctan2(jnp.sqrt(dp2) * jnp.sqrt(ww), ww + wd)
    step = jnp.where((ww > 0) & (nn > 0), step, 0.0)
    poisoned = jnp.isnan(ww + wd + dd + ee + n0)  # a NaN/Inf in w, u or w⁰ must show
    step, cos_dist = nan_where(poisoned, step), nan_where(poisoned, cos_dist)
    scale = pow2(exps[0])
    return step, cos_dist, jnp.sqrt(gg) * pow2(eg), b * scale, jnp.sqrt(dd) * scale


def _after(updates: Any, figs: dict, layouts: list[LeafLayout]) -> Any:
    """``updates`` made to depend on each layer's figures, values unchanged.

    The figures read the params, which ``apply_updates`` then overwrites in place when they
    are donated. With no data dependence between the two, XLA copies every layer first to
    keep the reads safe; this dependence orders the in-place write after the reads instead.
    A select, not arithmetic (``u + 0·θ`` would let XLA contract ``w + u`` differently and
    change the last bit): ``u`` exactly, or NaN where a figure is NaN, i.e. where the layer's
    inputs are NaN or Inf already.
    """
    def one(lo, u):
        if not lo.is_layer:
            return u
        bad = jnp.isnan(figs["step_angle"][lo.path]) | jnp.isnan(figs["cosine_distance"][lo.path])
        return nan_where(jnp.expand_dims(bad, lo.reduce_axes), u).astype(u.dtype)

    leaves = [one(lo, u) for lo, u in zip(layouts, jax.tree.leaves(updates))]
    return jax.tree.unflatten(jax.tree.structure(updates), leaves)


def final_is_fused_layca(state: Any) -> bool:
    """Whether the transform owning ``state`` ends with fused Layca (its update is final).

    Looks through ``optax.chain`` (a tuple of states: its last) and ``inject_hyperparams``
    (its inner state) only: any other wrapper may change the update after Layca (e.g.
    ``apply_if_finite`` zeroes it), so the monitor then measures the update itself.
    """
    while True:
        if isinstance(state, ScaleByLaycaState):
            return True
        if isinstance(state, (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)):
            state = state.inner_state
        elif type(state) is tuple and state:
            state = state[-1]
        else:
            return False


def _measure(layouts, leaves, state, every, fused) -> dict:
    """The figures of every layer: from fused Layca (``fused[path]``) or measured here."""
    w_leaves, u_leaves, g_leaves = leaves
    figs = {name: {} for name in FIGURES}
    for i, (lo, w) in enumerate(zip(layouts, w_leaves)):
        if not lo.is_layer:
            continue
        path = lo.path
        if path in fused:
            step, cos_dist, g_norm, w_norm, u_norm = fused[path]
        else:
            step, cos_dist, g_norm, w_norm, u_norm = monitor_layer(
                lo, w, u_leaves[i], None if g_leaves is None else g_leaves[i],
                state.initial_layers[path], state.initial_layer_norm[path])
        sq = lambda x, lo=lo: squeeze_reduced(x, lo).astype(jnp.float32)  # noqa: E731
        figs["cosine_distance"][path] = sq(cos_dist)
        figs["step_angle"][path] = sq(step)
        figs["cumulative_angle"][path] = state.cumulative_angle[path] + every * sq(step)
        figs["grad_norm"][path] = sq(g_norm)
        figs["weight_norm"][path] = sq(w_norm)
        figs["update_norm"][path] = sq(u_norm)
    return figs


def check_layers_like_init(layers: list, initial_layers: dict) -> None:
    """Raises naming the layers that differ (in path or shape) from those seen at ``init``."""
    known = set(initial_layers)
    seen = {lo.path for lo, _ in layers}
    if seen != known:
        raise ValueError(
            "`track_rotation`: the layers of params differ from those seen at init. "
            f"New: {sorted(seen - known)}; missing: {sorted(known - seen)}."
        )
    for lo, x in layers:
        if shape_of(x) != shape_of(initial_layers[lo.path]):
            raise ValueError(
                f"`track_rotation`: layer {lo.path!r} has shape {shape_of(x)}, but "
                f"{shape_of(initial_layers[lo.path])} at init."
            )


def _initial_state(layers: list, tracked_state: Any) -> TrackRotationState:
    """The monitor's state at ``init``: a copy of every layer, its norm, zero figures."""
    # fresh buffers per field: a state whose leaves share a buffer cannot be donated
    zeros = lambda: {  # noqa: E731
        lo.path: jnp.zeros(kept_shape(lo, np.shape(x)), jnp.float32) for lo, x in layers
    }
    # the figures are float32 whatever the params' dtype (documented), so is ‖w⁰‖
    norms = {lo.path: scaled_layer_norm(x, lo).astype(jnp.float32) for lo, x in layers}
    return TrackRotationState(
        rotation_step=jnp.zeros((), jnp.int32),
        initial_layers={lo.path: jnp.copy(x) for lo, x in layers},
        initial_layer_norm=norms,
        cosine_distance=zeros(),
        step_angle=zeros(),
        cumulative_angle=zeros(),
        grad_norm=zeros(),
        weight_norm={lo.path: squeeze_reduced(norms[lo.path], lo) for lo, _ in layers},
        update_norm=zeros(),
        tracked_state=tracked_state,
        zero_initial_layer_norm={
            lo.path: squeeze_reduced(norms[lo.path] == 0, lo) for lo, _ in layers
        },
    )


def _probe(layering: Layering, layers: list, grads: Any, state: Any, due: Any) -> RotationProbe:
    """What fused Layca needs to compute the monitor's figures in its own reduction pass."""
    layouts = layering.layouts(grads)
    return RotationProbe(
        reference=state.initial_layers,
        reference_norm=state.initial_layer_norm,
        grads={lo.path: g for lo, g in zip(layouts, jax.tree.leaves(grads)) if lo.is_layer},
        reduce_axes={lo.path: lo.reduce_axes for lo, _ in layers},
        due=due,
        figures={},
    )


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
    under a ``lax.cond``, only for nearly radial updates where that pass would cancel).
    ``w'`` is ``(w + u).astype(w.dtype)``, the parameters as ``optax.apply_updates`` stores
    them: with bf16/f16 params the figures are the rotation that actually happened to the
    stored weights (an update below their resolution rotates by 0), and ``update_norm`` is
    ``‖w' - w‖``. A NaN or Inf in the params, update or ``w⁰`` gives NaN figures for that
    layer, never a plausible 0. The figures are ``{layer path: float32}`` dicts in named fields of
    :class:`TrackRotationState`, so ``optax.tree.get(opt_state, "cosine_distance")`` reads
    them after a jitted step; shapes never change, so there is no recompilation.

    .. warning::
      The figures describe ``params + updates``: the monitor must see the *final* update,
      i.e. wrap the optimizer or sit last in ``optax.chain`` (after ``scale_by_learning_rate``
      / Layca's op 4). Placed elsewhere it passes updates through unchanged but its figures
      refer to a partial update.

    It stores a copy of every layer at ``init`` (memory: one extra copy of the layer leaves).
    Non-layer leaves (biases, norm scales) are not tracked.

    Cost: one pass of per-layer dot products over ``(w, u, w⁰, g)`` per step, i.e. four reads
    of the layers, and the update ``u`` is materialised (``benchmarks/train_step.py``).
    **Wrapping fused Layca**, ``track_rotation(layca(...))`` (float32 params), is cheaper: the
    monitor hands Layca a :class:`~optax_layca._layca.RotationProbe` and Layca adds ``w⁰`` and
    ``g`` to its own one-pass reduction, deriving the figures from its scalars (the same
    figures, to float32 rounding: the stored ``fl(w + u)`` differs from ``w + u`` by eps/2);
    the update is never materialised. That needs Layca's update to be the final one: only
    ``optax.chain`` and ``inject_hyperparams`` may lie between (anything else, or the
    chained form, is measured as above). With ``every=k`` the figures
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
    every = check_int(every, "track_rotation(every=...)", low=1)
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
        if not layers and jax.tree.leaves(params):
            raise no_layer_error(params, "track_rotation")
        return _initial_state(layers, inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(NO_PARAMS_MSG)
        check_same_structure(updates, params, "updates")
        check_same_shapes(updates, params, "updates")
        # checked before the wrapped optimizer runs: its own tree errors name no leaf
        layers = layers_of(params)
        check_layers_like_init(layers, state.initial_layers)
        grads = updates
        due = None if every == 1 else (state.rotation_step + 1) % every == 0
        probe = None
        if tx is not None and final_is_fused_layca(state.tracked_state):
            probe = _probe(layering, layers, grads, state, due)
            extra_args = {**extra_args, "rotation_probe": probe}
        if isinstance(inner, optax.GradientTransformationExtraArgs):
            updates, inner_state = inner.update(updates, state.tracked_state, params, **extra_args)
        else:
            updates, inner_state = inner.update(updates, state.tracked_state, params)
        layouts = layering.layouts(params)
        leaves = (jax.tree.leaves(params), jax.tree.leaves(updates),
                  None if tx is None else jax.tree.leaves(grads))
        measure = functools.partial(_measure, layouts, leaves, state, every,
                                    {} if probe is None else probe.figures)
        if every == 1:
            figs = measure()
        else:
            held = {name: getattr(state, name) for name in FIGURES}
            figs = jax.lax.cond(due, measure, lambda: held)
        updates = _after(updates, figs, layouts)
        new_state = TrackRotationState(
            rotation_step=optax.safe_increment(state.rotation_step),
            initial_layers=state.initial_layers,
            initial_layer_norm=state.initial_layer_norm,
            tracked_state=inner_state,
            zero_initial_layer_norm=state.zero_initial_layer_norm,
            **figs,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_monitor_state(obj: Any) -> TrackRotationState | None:
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

