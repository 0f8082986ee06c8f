"""Layca's operations and the LARS norm cap (Carbonnelle & De Vleeschouwer, 2019, Alg. 1, App. A.2).

Transforms before ``optax.scale_by_learning_rate`` act on gradient-like directions; those after
it act on the signed update and read ``params``. Every reduction is per layer (or per unit) and
in float32 at least (float64 leaves stay float64, see :func:`~optax_layca._layers.compute_dtype`);
results are cast back to the dtype of the incoming update.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ._base import (
    check_choice,
    check_learning_rate,
    check_number,
    guard_rate,
    is_concrete,
    value_at,
)
from ._custom_types import IsLayer, LayerAxis, LayerOrder, ScalarOrSchedule
from ._layers import (
    Layering,
    LeafLayout,
    check_layer_order,
    check_like_init,
    check_params,
    compute_dtype,
    layer_dot,
    layer_norm,
    tensor_layouts,
    upcast,
)
from ._multipliers import check_alpha, init_layer_depths, multiplier_at_depth

DEFAULT_PARALLEL_TOL = 1e-3
# Fused Layca recomputes ‖s⊥‖² in a second pass when ‖s‖/‖s⊥‖ exceeds this (float32 error of
# the one-pass c − b²/a is then above ~1e-6 relative).
PRECISE_RATIO = 4.0

NON_LAYER_POLICIES = ("freeze", "base")
NORMALIZE_POLICIES = ("pass", "normalize")


def check_non_layer(
    non_layer: str, where: str, allowed: tuple[str, ...] = NON_LAYER_POLICIES
) -> None:
    """Raises a ValueError unless ``non_layer`` is one of ``allowed``."""
    check_choice(non_layer, allowed, f"{where}(non_layer=...)")


def check_min_step_norm(min_step_norm: float, where: str) -> None:
    """Raises a ValueError unless ``min_step_norm`` is a finite float >= 0 (or traced, as
    under ``optax.inject_hyperparams``)."""
    check_number(min_step_norm, f"{where}(min_step_norm=...)", low=0.0)


def initial_layer_norms(
    params: Any, layering: Layering, transform: str, non_layer: str = "pass"
) -> Any:
    """‖w⁰‖ per layer (float32 at least, reduced axes kept; a 0-d zero for non-layer leaves).

    A zero-norm layer can never rotate under a norm-pinning transform, so when ``params`` are
    concrete this raises a ValueError naming the leaf. Under a jitted ``init`` it cannot; the
    layer is then flagged by :func:`zero_norm_flags`. With ``non_layer="normalize"``
    non-layer leaves get their own norm too (whole, or per block: see
    :func:`~optax_layca._layers.tensor_layouts`), zero allowed (a zero bias stays 0).
    """
    tensors = tensor_layouts(params, layering) if non_layer == "normalize" else None

    def norm(lo, w):
        if not lo.is_layer:
            if tensors is not None:
                return layer_norm(w, tensors[lo.path])
            return jnp.zeros((), jnp.float32)
        n = layer_norm(w, lo)
        if is_concrete(n) and bool(jnp.any(n == 0)):
            zeros = int(jnp.sum(n == 0))
            raise ValueError(
                f"`{transform}`: layer {lo.path!r} has zero initial norm ({zeros} of "
                f"{n.size} groups), so it can never rotate (op 4 pins it at norm 0). "
                "Initialise it with non-zero values, or exclude it with `is_layer=`."
            )
        return n

    return layering.map(norm, params)


def zero_norm_flags(params: Any, initial_norm: Any, layering: Layering) -> Any:
    """``‖w⁰‖ == 0`` per layer (bool, reduced axes kept; a 0-d False for non-layer leaves).

    Such a layer (e.g. a zero-initialised classifier head or residual branch reached through a
    jitted ``init``) stays at 0 forever under a norm-pinning transform: the flag makes that
    visible in the state (``optax.tree.get(state, "zero_initial_norm")``), and
    :func:`~optax_layca.rotation.track_rotation` reports such layers too.
    """
    return layering.map(
        lambda lo, w, n0: (n0 == 0) if lo.is_layer else jnp.zeros((), bool), params, initial_norm
    )


def check_layering_args(where: str, parallel_tol: Any = 0.0) -> None:
    """``parallel_tol`` in [0, 1) (``is_layer``/``layer_axis``/``per_unit``: :class:`Layering`)."""
    check_number(parallel_tol, f"{where}(parallel_tol=...)", low=0.0, high=1.0, high_open=True)


def project_orthogonal(
    *,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
    parallel_tol: float = DEFAULT_PARALLEL_TOL,
) -> optax.GradientTransformationExtraArgs:
    r"""Layca op 1: projects each layer's step onto the tangent space of its sphere.

    .. math::
      s \leftarrow s - \frac{s \cdot w}{w \cdot w} w

    A step within ``parallel_tol`` (relative: ``‖s_⊥‖ ≤ parallel_tol ‖s‖``) of being parallel
    to ``w`` is treated as parallel and projects to 0, as does any step of a zero-norm layer:
    float32 cancellation makes the direction of such a tiny remainder meaningless.
    Non-layer leaves pass through unchanged.

    Args:
      is_layer: which leaves are layers (default: kernels/embeddings, ndim >= 2).
      layer_axis: stack axis of leaves holding several layers.
      per_unit: project each output unit (last axis) separately.
      parallel_tol: relative threshold under which the projected step is set to 0, in
        ``[0, 1)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (needs ``params``).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> w = {"kernel": jnp.array([[1.0, 0.0]])}
      >>> u, _ = project_orthogonal().update({"kernel": jnp.array([[2.0, 3.0]])}, None, w)
      >>> u["kernel"].tolist()
      [[0.0, 3.0]]
    """
    check_layering_args("project_orthogonal", parallel_tol)
    layering = Layering(is_layer, layer_axis, per_unit)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_params(updates, params)

        def project(lo, s, w):
            if not lo.is_layer:
                return s
            s32, w32 = upcast(s, w)
            a, b = layer_dot(w32, w32, lo), layer_dot(s32, w32, lo)
            perp = s32 - jnp.where(a > 0, b / jnp.where(a > 0, a, 1.0), 0.0) * w32
            keep = (a > 0) & (layer_dot(perp, perp, lo) > parallel_tol**2 * layer_dot(s32, s32, lo))
            return jnp.where(keep, perp, 0.0).astype(s.dtype)

        return layering.map(project, updates, params), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def scale_to_weight_norm(
    *,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
    non_layer: str = "pass",
) -> optax.GradientTransformationExtraArgs:
    r"""Layca op 2 (rotation-based normalisation): rescales each layer's step to ‖w‖.

    .. math::
      s \leftarrow s \, \frac{\lVert w \rVert}{\lVert s \rVert}

    A zero step stays zero (never NaN), and so does the step of a zero tensor. Non-layer
    leaves pass through unchanged (``non_layer="pass"``), or are normalised to their own norm
    too (``"normalize"``, whole or per stacked block), as the authors' LARS normalises every
    tensor. Without op 1 this is the normalisation of LARS/NGadap.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> u, _ = scale_to_weight_norm().update(
      ...     {"kernel": jnp.array([[0.0, 0.5]])}, None, {"kernel": jnp.array([[3.0, 4.0]])})
      >>> u["kernel"].tolist()
      [[0.0, 5.0]]
    """
    check_non_layer(non_layer, "scale_to_weight_norm", NORMALIZE_POLICIES)
    layering = Layering(is_layer, layer_axis, per_unit)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_params(updates, params)
        tensors = tensor_layouts(params, layering) if non_layer == "normalize" else None

        def scale(lo, s, w):
            if not lo.is_layer:
                if tensors is None:
                    return s
                lo = tensors[lo.path]
            s32, w32 = upcast(s, w)
            ns, nw = layer_norm(s32, lo), layer_norm(w32, lo)
            k = jnp.where(ns > 0, nw / jnp.where(ns > 0, ns, 1.0), 0.0)
            return (s32 * k).astype(s.dtype)

        return layering.map(scale, updates, params), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


class InitialNormState(NamedTuple):
    """State of :func:`project_to_initial_norm` and :func:`cap_norm_increase`.

    Attributes:
      initial_norm: ‖w⁰‖ of every layer at ``init`` (float32 at least, reduced axes kept; 0-d
        0 for non-layers).
      zero_initial_norm: ``‖w⁰‖ == 0`` per layer (bool; see :func:`zero_norm_flags`).
    """

    initial_norm: Any
    zero_initial_norm: Any


def initial_norm_state(
    params: Any, layering: Layering, transform: str, non_layer: str = "pass"
) -> InitialNormState:
    """``‖w⁰‖`` per layer with its zero flags (see :func:`initial_layer_norms`)."""
    norms = initial_layer_norms(params, layering, transform, non_layer)
    return InitialNormState(norms, zero_norm_flags(params, norms, layering))


def project_to_initial_norm(
    *,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Layca op 4: rescales each updated layer back onto its initial sphere.

    Acts on the signed update ``u`` (place it after ``scale_by_learning_rate``): with
    ``w' = w + u`` it returns ``u' = w' ‖w⁰‖ / ‖w'‖ - w``, so ``‖w + u'‖ = ‖w⁰‖``. A layer
    whose update is exactly 0 (zero gradient, multiplier 0) is left exactly where it is, as in
    the fused :func:`scale_by_layca`.

    ``init`` raises a ValueError naming the layer when a concrete initial norm is zero. When
    ``init`` runs under tracing that check is impossible; a zero ``‖w⁰‖`` then pins the layer
    at 0 (``u' = -w``), and ``w' = 0`` leaves ``u`` unchanged: no NaN either way. Such layers
    are flagged in the state's ``zero_initial_norm`` (and reported by
    :func:`~optax_layca.rotation.track_rotation`): they never train.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> w = {"kernel": jnp.array([[3.0, 4.0]])}
      >>> tx = project_to_initial_norm()
      >>> u, _ = tx.update({"kernel": jnp.array([[3.0, 4.0]])}, tx.init(w), w)
      >>> (w["kernel"] + u["kernel"]).tolist()
      [[3.0, 4.0]]
    """
    layering = Layering(is_layer, layer_axis, per_unit)

    def init_fn(params):
        return initial_norm_state(params, layering, "project_to_initial_norm")

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_params(updates, params)
        check_like_init(updates, state.initial_norm, layering, "project_to_initial_norm")

        def project(lo, u, w, n0):
            if not lo.is_layer:
                return u
            w32, u32 = upcast(w, u)
            new = w32 + u32
            n = layer_norm(new, lo)
            k = jnp.where(n > 0, n0 / jnp.where(n > 0, n, 1.0), 1.0)
            # A layer that does not move (zero update) stays exactly put, as in the fused form.
            still = (layer_dot(u32, u32, lo) == 0) & (n0 > 0)
            return jnp.where(still, 0.0, k * new - w32).astype(u.dtype)

        return layering.map(project, updates, params, state.initial_norm), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def cap_norm_increase(
    max_increase: float = 1e-4,
    *,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
    non_layer: str = "pass",
) -> optax.GradientTransformationExtraArgs:
    r"""The papers' LARS safeguard: caps each layer's norm growth per step.

    Acts on the signed update (after ``scale_by_learning_rate``). With ``w' = w + u``:

    .. math::
      \lVert w' \rVert - \lVert w \rVert > \delta \lVert w^0 \rVert
      \;\Rightarrow\; w' \leftarrow w' \frac{\lVert w \rVert + \delta \lVert w^0 \rVert}
      {\lVert w' \rVert}

    with ``δ = max_increase``. Norm decreases are never touched.

    Args:
      max_increase: ``δ``, allowed growth per step relative to the initial norm (1e-4 in the
        paper's footnote 7).
      non_layer: ``"pass"`` (non-layer leaves unchanged) or ``"normalize"`` (capped like
        layers, relative to their own initial norm; a zero tensor may not grow at all, as in
        the authors' LARS).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> w = {"kernel": jnp.array([[1.0, 0.0]])}
      >>> tx = cap_norm_increase(0.1)
      >>> u, _ = tx.update({"kernel": jnp.array([[1.0, 0.0]])}, tx.init(w), w)
      >>> np.asarray(w["kernel"] + u["kernel"], float).round(4).tolist()
      [[1.1, 0.0]]

    References:
      Carbonnelle & De Vleeschouwer, 2019, App. A.2, footnote 7.
    """
    check_number(max_increase, "cap_norm_increase(max_increase=...)", low=0.0)
    check_non_layer(non_layer, "cap_norm_increase", NORMALIZE_POLICIES)
    layering = Layering(is_layer, layer_axis, per_unit)

    def init_fn(params):
        return initial_norm_state(params, layering, "cap_norm_increase", non_layer)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_params(updates, params)
        check_like_init(updates, state.initial_norm, layering, "cap_norm_increase")
        tensors = tensor_layouts(params, layering) if non_layer == "normalize" else None

        def cap(lo, u, w, n0):
            if not lo.is_layer:
                if tensors is None:
                    return u
                lo = tensors[lo.path]
            w32, u32 = upcast(w, u)
            new = w32 + u32
            n, n_new = layer_norm(w32, lo), layer_norm(new, lo)
            limit = n + max_increase * n0
            k = jnp.where(n_new > limit, limit / jnp.where(n_new > 0, n_new, 1.0), 1.0)
            return (k * new - w32).astype(u.dtype)

        return layering.map(cap, updates, params, state.initial_norm), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def layca_layer_update(
    lo: LeafLayout,
    s: jax.Array,
    w: jax.Array,
    n0: jax.Array,
    rho: jax.Array,
    parallel_tol: float,
    min_step_norm: float = 0.0,
) -> jax.Array:
    """Fused Layca ops 1–4 for one layer leaf at per-layer rate ``rho`` (see :func:`scale_by_layca`).

    ``rho`` broadcasts against the leaf's per-layer reductions (reduced axes kept), so it may be
    a scalar or hold one rate per stacked layer/unit. Shared by :func:`scale_by_layca` and
    ``adapt_copy``.
    """
    w32, s32 = upcast(w, s)
    rho = jnp.asarray(rho).astype(w32.dtype)
    a, b, c = layer_dot(w32, w32, lo), layer_dot(s32, w32, lo), layer_dot(s32, s32, lo)
    has_norm = a > 0
    a_safe = jnp.where(has_norm, a, 1.0)
    # b * (b / a), not b² / a: b² overflows float32 for |w|, |s| ~ 1e10 and above.
    proj2 = jnp.maximum(c - b * (b / a_safe), 0.0)
    # c − b²/a cancels when s is nearly parallel to w (‖s‖/‖s⊥‖ = R): its relative error is
    # ~eps·R², i.e. 0.4% at R = 100 and 100% at R ≈ 1000, so the rotation would miss arctan(ρ),
    # and the float32 error of b leaves a radial part ~eps·R in s - (b/a) w that breaks the
    # analytic op 4. That happens near a minimum on the sphere or with an L2 term in the loss.
    # Only then (a cheap scalar test, so the common path keeps one reduction pass) take a
    # second pass over s⊥ = s - (b/a) w: its residual radial part e = s⊥·w corrects b, and
    # ‖s⊥‖² is summed directly, as in the chained form.
    def second_pass():
        perp = s32 - (b / a_safe) * w32
        e = layer_dot(perp, w32, lo)
        return jnp.maximum(layer_dot(perp, perp, lo) - e * (e / a_safe), 0.0), b + e

    near_parallel = jnp.any(has_norm & (PRECISE_RATIO**2 * proj2 < c))
    proj2, b = jax.lax.cond(near_parallel, second_pass, lambda: (proj2, b))
    moves = has_norm & (proj2 > parallel_tol**2 * c)
    # The authors' guard: absolute, on the lr-scaled projected step ρ‖s⊥‖ (written so that a
    # NaN ρ still propagates).
    moves = moves & ~(rho * rho * proj2 <= min_step_norm**2)
    root_a = jnp.sqrt(a_safe)
    # ŝ = (s - (b/a) w) · inv, with ‖ŝ‖ = ‖w‖.
    inv = jnp.where(moves, root_a / jnp.sqrt(jnp.where(moves, proj2, 1.0)), 0.0)
    # A layer that does not rotate (zero or parallel step, or ρ = 0) stays exactly put: no
    # radial float32 renormalisation either, so a zero gradient gives a zero update.
    moves = moves & (rho != 0)
    rho = jnp.where(moves, rho, 0.0)
    # k - 1 via expm1 keeps the tiny radial correction accurate for small ρ.
    log_k = jnp.log(jnp.where(n0 > 0, n0, 1.0)) - jnp.log(root_a) - 0.5 * jnp.log1p(rho**2)
    k_minus_1 = jnp.where(n0 > 0, jnp.where(moves, jnp.expm1(log_k), 0.0), -1.0)
    k = k_minus_1 + 1.0
    coef_w = jnp.where(has_norm, k_minus_1 + k * rho * inv * (b / a_safe), 0.0)
    coef_s = jnp.where(has_norm, -k * rho * inv, 0.0)
    return (coef_w * w32 + coef_s * s32).astype(s.dtype)


class ScaleByLaycaState(NamedTuple):
    """State of the fused :func:`scale_by_layca`.

    Attributes:
      count: number of updates so far (int32), for learning-rate and α schedules.
      initial_norm: ‖w⁰‖ per layer (float32 at least, reduced axes kept).
      layer_depth: layer index per leaf (int32, -1 for non-layers).
      num_layers: ``L`` (int32); 0 when no forward order was known at ``init`` (α was 0).
      zero_initial_norm: ``‖w⁰‖ == 0`` per layer (bool): layers that never train (see
        :func:`zero_norm_flags`).
    """

    count: jax.Array
    initial_norm: Any
    layer_depth: Any
    num_layers: jax.Array
    zero_initial_norm: Any


def scale_by_layca(
    learning_rate: ScalarOrSchedule,
    alpha: ScalarOrSchedule = 0.0,
    layer_order: LayerOrder = None,
    *,
    non_layer: str = "freeze",
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
    parallel_tol: float = DEFAULT_PARALLEL_TOL,
    min_step_norm: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Layca ops 1–4 and Eq. 1 fused: one reduction pass per layer.

    Takes a step direction ``s`` in optax's gradient convention (the raw gradient, or the
    output of e.g. ``optax.scale_by_adam()``) and returns the signed update. Per layer, from
    ``a = w·w``, ``b = s·w``, ``c = s·s`` (one pass), ``ρ = m_l(α) η(t)``:

    .. math::
      \begin{align*}
        \lVert s_\perp \rVert^2 &= \max(c - b^2/a, 0), \qquad
        \hat s = (s - \tfrac{b}{a} w)\,\frac{\sqrt a}{\lVert s_\perp \rVert} \\
        k &= \frac{\lVert w^0 \rVert}{\sqrt{a}\sqrt{1 + \rho^2}}, \qquad
        u = (k - 1)\, w - k \rho \hat s
      \end{align*}

    since after ops 1–3 the new norm is exactly ``√(a(1+ρ²))``. This equals the chain
    ``project_orthogonal, scale_to_weight_norm, scale_by_layer_multipliers,
    scale_by_learning_rate, project_to_initial_norm`` to float tolerance, reading each tensor
    twice. Each layer rotates by exactly ``arctan(ρ_l(t))`` per step and keeps ``‖w⁰‖``.

    Non-layer leaves (biases, norm scales) follow ``non_layer``: ``"freeze"`` (default)
    gives 0, so they keep their initial values as in the authors' code ("only kernels are
    optimized"); ``"base"`` updates them with ``-η(t) s`` (the base optimizer with the plain
    learning rate).

    Args:
      learning_rate: ``η(t) >= 0``, the rotation per step of a multiplier-1 layer is
        ``arctan(η(t))``; a float or an optax schedule (checked at step 0). A negative or NaN
        rate that cannot be checked early (a schedule's later values, a rate traced by
        ``optax.inject_hyperparams``) makes the updates NaN rather than ascend.
      alpha: Eq. 1 prioritisation in ``[-1, 1]`` (or a schedule).
      layer_order: forward order of layer paths (None: natural sort).
      non_layer: ``"freeze"`` or ``"base"``.
      is_layer, layer_axis, per_unit: see :func:`project_orthogonal`.
      parallel_tol: relative threshold for a step parallel to ``w`` (projected to 0).
      min_step_norm: absolute threshold: a layer whose lr-scaled projected step has
        ``ρ_l ‖s_⊥‖ ≤ min_step_norm`` does not move. 0 (default) disables it; the authors'
        code uses 1e-7 (Keras' ``K.epsilon()``), see ``docs/fidelity.md``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (needs ``params``).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> w = {"kernel": jnp.array([[1.0, 0.0]])}
      >>> tx = scale_by_layca(learning_rate=1.0)
      >>> u, _ = tx.update({"kernel": jnp.array([[0.0, -5.0]])}, tx.init(w), w)
      >>> np.asarray(w["kernel"] + u["kernel"], float).round(4).tolist()  # 45 degrees, norm kept
      [[0.7071, 0.7071]]
    """
    check_learning_rate(learning_rate, "scale_by_layca(learning_rate=...)")
    check_alpha(alpha, "scale_by_layca(alpha=...)")
    check_layer_order(layer_order, "scale_by_layca")
    check_non_layer(non_layer, "scale_by_layca")
    check_layering_args("scale_by_layca", parallel_tol)
    check_min_step_norm(min_step_norm, "scale_by_layca")
    layering = Layering(is_layer, layer_axis, per_unit)
    rate = guard_rate(learning_rate)

    def init_fn(params):
        depth, num_layers = init_layer_depths(
            params, layering, layer_order, alpha, "scale_by_layca"
        )
        norms = initial_layer_norms(params, layering, "scale_by_layca")
        return ScaleByLaycaState(
            count=jnp.zeros((), jnp.int32),
            initial_norm=norms,
            layer_depth=depth,
            num_layers=num_layers,
            zero_initial_norm=zero_norm_flags(params, norms, layering),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_params(updates, params)
        check_like_init(updates, state.initial_norm, layering, "scale_by_layca")
        lr = value_at(rate, state.count)
        a_t = value_at(alpha, state.count)

        def fused(lo, s, w, n0, depth):
            if not lo.is_layer:
                if non_layer == "freeze":
                    return jnp.zeros_like(s)
                s32 = upcast(s)
                return (-lr.astype(s32.dtype) * s32).astype(s.dtype)
            dtype = compute_dtype(s, w)
            m = multiplier_at_depth(a_t, depth, state.num_layers, dtype)
            rho = lr.astype(dtype) * m
            return layca_layer_update(lo, s, w, n0, rho, parallel_tol, min_step_norm)

        updates = layering.map(fused, updates, params, state.initial_norm, state.layer_depth)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
