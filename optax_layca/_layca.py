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
    distance_to_reference,
    layer_dots,
    layer_norm,
    nan_where,
    pow2,
    scaled_layer_dots,
    scaled_layer_norm,
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


def new_and_u(w: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(w + u, u)`` in the compute dtype: the inputs of op 4's sums, derived inside each
    reduction."""
    w32, u32 = upcast(w, u)
    return w32 + u32, u32


def w_and_new(w: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(w, w + u)`` in the compute dtype: the inputs of the norm cap's sums."""
    w32, u32 = upcast(w, u)
    return w32, w32 + u32


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
        n = scaled_layer_norm(w, lo)
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
            # in units of the rescaled w·2^-ew, s·2^-es (exponents 0 unless a sum would
            # under/overflow): s⊥ is then exact for any scale of s and w
            (a, b, c), (ew, es) = scaled_layer_dots(lo, ((0, 0), (1, 0), (1, 1)), w, s)
            beta = jnp.where(a > 0, b / jnp.where(a > 0, a, 1.0), 0.0)
            perp = s32 * pow2(-es) - beta * (w32 * pow2(-ew))
            (pp,) = layer_dots(lo, ((0, 0),), perp)
            keep = (a > 0) & (pp > parallel_tol**2 * c)
            out = jnp.where(keep, perp, 0.0) * pow2(es)
            return nan_where(jnp.isnan(a + b + c), out).astype(s.dtype)

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
            s32 = upcast(s)
            (ss, ww), (es, ew) = scaled_layer_dots(lo, ((0, 0), (1, 1)), s, w)
            # ‖w‖/‖s‖ = (‖w'‖/‖s'‖) 2^(ew - es): the powers of two are applied to s apart,
            # exactly, since their ratio alone may not be a float32 (1e30 / 1e-30)
            k = jnp.where(ss > 0, jnp.sqrt(ww) / jnp.sqrt(jnp.where(ss > 0, ss, 1.0)), 0.0)
            out = (s32 * pow2(-es)) * (k * pow2(ew))
            return nan_where(jnp.isnan(ss + ww), out).astype(s.dtype)

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
            (nn, uu), (en, _) = scaled_layer_dots(lo, ((0, 0), (1, 1)), w, u, make=new_and_u,
                                                  sources=((0, 1), (1,)))
            # k = ‖w⁰‖ / ‖w'‖ with ‖w'‖ = √nn · 2^en
            k = jnp.where(nn > 0, n0 * pow2(-en) / jnp.sqrt(jnp.where(nn > 0, nn, 1.0)), 1.0)
            # A layer that does not move (zero update) stays exactly put, as in the fused form.
            still = (uu == 0) & (n0 > 0)
            out = jnp.where(still, 0.0, k * new - w32)
            return nan_where(jnp.isnan(nn + uu + n0), out).astype(u.dtype)

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
            (ww, nn), (ew, en) = scaled_layer_dots(lo, ((0, 0), (1, 1)), w, u, make=w_and_new,
                                                  sources=((0,), (0, 1)))
            n, n_new = jnp.sqrt(ww) * pow2(ew), jnp.sqrt(nn) * pow2(en)
            limit = n + max_increase * n0
            k = jnp.where(n_new > limit, limit / jnp.where(n_new > 0, n_new, 1.0), 1.0)
            return nan_where(jnp.isnan(ww + nn + n0), k * new - w32).astype(u.dtype)

        return layering.map(cap, updates, params, state.initial_norm), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class RotationProbe(NamedTuple):
    """The rotation monitor's request to the fused Layca it wraps (``rotation_probe=``).

    ``track_rotation(layca(...))`` passes it as an extra argument when Layca's update is the
    final one. For every layer it names with the same per-layer reduction and float32 params,
    :func:`layca_layer_update` adds ``w⁰`` and ``g`` to the arrays of its own one-pass
    reduction and stores the monitor's figures, from its scalars, in ``figures``: the
    monitor then needs no pass of its own and the update is never materialised.

    Attributes:
      reference: ``{path: w⁰}``; reference_norm: ``{path: ‖w⁰‖}`` (keepdims).
      grads: ``{path: g}``, the raw gradient (its norm is a figure).
      reduce_axes: ``{path: axes}`` of the monitor's layout.
      due: bool scalar, the monitor measures this step (``every > 1``), or None (always).
      figures: filled: ``{path: (step angle, cosine distance, ‖g‖, ‖w'‖, ‖u‖)}`` (keepdims).
    """

    reference: dict
    reference_norm: dict
    grads: dict
    reduce_axes: dict
    due: Any
    figures: dict

    def watches(self, lo: LeafLayout, w: jax.Array) -> bool:
        return (lo.path in self.reference and self.reduce_axes[lo.path] == lo.reduce_axes
                and w.dtype == jnp.float32)


def layca_sums(lo: LeafLayout, w, s, probe: RotationProbe | None):
    """Fused Layca's one reduction pass: ``(a, b, c), (ew, es), extra``.

    ``a, b, c = w'·w', s'·w', s'·s'`` of the rescaled ``w' = w 2^-ew``, ``s' = s 2^-es``
    (:func:`~optax_layca._layers.scaled_layer_dots`). Watched by a ``probe``, the same pass
    also reads ``w⁰`` and ``g``: ``extra`` holds ``dd, dw, ds = δ·δ, δ·w', δ·s'`` for
    ``δ = (w - w⁰) 2^-ew``, and ``gg, eg`` with ``‖g‖² = gg 4^eg``; with ``probe.due``, only
    on due steps (``lax.cond`` on the stored arrays; zeros otherwise).
    """
    if probe is None:
        abc, exps = scaled_layer_dots(lo, ((0, 0), (1, 0), (1, 1)), w, s)
        return abc, exps, {}
    raw = (w, s, probe.reference[lo.path], probe.grads[lo.path])

    def make(w, s, w0, g):
        w32 = w.astype(jnp.float32)
        return w32, s.astype(jnp.float32), w32 - w0.astype(jnp.float32), g.astype(jnp.float32)

    def watched(*raw):
        pairs = ((0, 0), (1, 0), (1, 1), (2, 2), (2, 0), (2, 1), (3, 3))
        dots, (ew, es, eg) = scaled_layer_dots(lo, pairs, *raw, make=make, groups=(0, 1, 0, 2),
                                               sources=((0,), (1,), (0, 2), (3,)))
        return dots, (ew, es, eg)

    def plain(w, s, *_):
        abc, (ew, es) = scaled_layer_dots(lo, ((0, 0), (1, 0), (1, 1)), w, s)
        return abc + (jnp.zeros_like(abc[0]),) * 4, (ew, es, jnp.zeros_like(ew))

    dots, (ew, es, eg) = (watched(*raw) if probe.due is None
                          else jax.lax.cond(probe.due, watched, plain, *raw))
    extra = dict(zip(("dd", "dw", "ds", "gg"), dots[3:]), eg=eg)
    return dots[:3], (ew, es), extra


def probe_figures(lo, probe, sums, tangent, poisoned, update, w, s):
    """The monitor's figures of one watched layer from fused Layca's scalars (w' units).

    With ``u = (k-1) w - kρ ŝ``, ``ŝ ⊥ w``, ``‖ŝ‖ = ‖w‖``: ``‖w + u‖ = k ‖w‖ √(1+ρ²)``,
    ``‖u‖ = ‖w‖ √((k-1)² + k²ρ²)``, the step angle is ``arctan ρ`` (0 if the layer does not
    move), and ``‖e‖²`` of ``e = w + u - w⁰ = δ + u`` is ``δ·δ + ‖u‖² + 2(k-1) δ·w - 2kρ δ·ŝ``
    for the law of cosines (:func:`~optax_layca._layers.distance_to_reference`, whose
    explicit fallback recomputes ``e`` with ``update``). These are the float32 figures of the
    exact ``w + u``; the standalone monitor measures the stored ``fl(w + u)``, whose rounding
    moves directions by at most eps/2 rad.
    """
    a, ew, t = sums["a"], sums["ew"], tangent
    k = t["k_minus_1"] + 1.0
    root_a = jnp.sqrt(jnp.where(a > 0, a, 0.0))
    big_a = probe.reference_norm[lo.path] * pow2(-ew)
    big_b = k * root_a * jnp.sqrt(1.0 + t["rho"] ** 2)
    u_norm = root_a * jnp.sqrt(t["k_minus_1"] ** 2 + (k * t["rho"]) ** 2)
    ee = (sums["dd"] + u_norm**2 + 2.0 * t["k_minus_1"] * sums["dw"]
          - 2.0 * k * t["rho"] * t["inv"] * t["dperp"])
    unit = pow2(-ew)

    def vectors(w, s, w0):
        w32 = w.astype(jnp.float32)
        return (w32 + update(w, s) - w0.astype(jnp.float32)) * unit, w0.astype(jnp.float32) * unit

    due = True if probe.due is None else probe.due
    cos = distance_to_reference(lo, ee, big_a, big_b, vectors, w, s, probe.reference[lo.path],
                                gate=due)
    step = jnp.where(t["moves"] & (k > 0), jnp.arctan(t["rho"]), 0.0)
    scale = pow2(ew)
    bad = poisoned | jnp.isnan(ee)
    return (nan_where(bad, step), nan_where(bad, cos), jnp.sqrt(sums["gg"]) * pow2(sums["eg"]),
            nan_where(bad, big_b * scale), nan_where(bad, u_norm * scale))


def layca_tangent_part(lo: LeafLayout, w, s, ew, es, a, b, c, w0=None, dperp=None):
    """``(‖s⊥‖², b, δ·s⊥)`` of ``s⊥ = s' - (b/a) w'`` from the one-pass ``a = w'·w', b = s'·w',
    c = s'·s'`` of ``w' = w 2^-ew, s' = s 2^-es`` (``w``, ``s``: the stored arrays, so that
    the branch below reads them rather than a materialised rescaled copy). With ``w0`` (the
    rotation monitor's reference, :class:`RotationProbe`), ``δ·s⊥`` for ``δ = (w - w⁰) 2^-ew``
    too, given its one-pass value ``dperp`` (else None).

    ``‖s⊥‖² = c − b²/a`` cancels when ``s`` is nearly parallel to ``w`` (``‖s‖/‖s⊥‖ = R``):
    its relative error is ``~eps R²``, i.e. 0.4% at R = 100 and 100% at R ≈ 1000, so the
    rotation would miss ``arctan(ρ)``, and the float32 error of ``b`` leaves a radial part
    ``~eps R`` in ``s - (b/a) w`` that breaks the analytic op 4. That happens near a minimum on
    the sphere or with an L2 term in the loss. Only then (a scalar test; ``lax.cond``) a
    second pass forms ``s⊥`` explicitly: its residual radial part ``e = s⊥·w`` corrects ``b``
    and ``‖s⊥‖²`` is summed directly, as in the chained form.
    """
    a_safe = jnp.where(a > 0, a, 1.0)
    # b * (b / a), not b² / a: b² overflows where a and c do not
    proj2 = jnp.maximum(c - b * (b / a_safe), 0.0)
    raw = (w, s) if w0 is None else (w, s, w0)

    def second_pass(w, s, *w0):
        w32, s32 = upcast(w, s)
        w32 = w32 * pow2(-ew)
        perp = s32 * pow2(-es) - (b / a_safe) * w32
        xs, pairs = (perp, w32), ((0, 1), (0, 0))
        if w0:
            xs, pairs = xs + ((w32 - w0[0].astype(jnp.float32) * pow2(-ew)),), pairs + ((0, 2),)
        e, pp, *dp = layer_dots(lo, pairs, *xs)
        return (jnp.maximum(pp - e * (e / a_safe), 0.0), b + e, *dp)

    near_parallel = jnp.any((a > 0) & (PRECISE_RATIO**2 * proj2 < c))
    keep = (proj2, b) if w0 is None else (proj2, b, dperp)
    out = jax.lax.cond(near_parallel, second_pass, lambda *_: keep, *raw)
    return out if w0 is not None else (*out, None)


def layca_layer_update(
    lo: LeafLayout,
    s: jax.Array,
    w: jax.Array,
    n0: jax.Array,
    rho: jax.Array,
    parallel_tol: float,
    min_step_norm: float = 0.0,
    probe: RotationProbe | None = None,
) -> jax.Array:
    """Fused Layca ops 1–4 for one layer leaf at per-layer rate ``rho`` (see :func:`scale_by_layca`).

    ``rho`` broadcasts against the leaf's per-layer reductions (reduced axes kept), so it may be
    a scalar or hold one rate per stacked layer/unit. Shared by :func:`scale_by_layca` and
    ``adapt_copy``.

    The algebra runs on ``w' = w 2^-ew`` and ``s' = s 2^-es``, power-of-two rescalings that are
    exact and leave every ratio unchanged (:func:`~optax_layca._layers.scaled_layer_dots`; the
    exponents are 0 unless a float32 sum would under- or overflow), so a direction of any
    float32 scale (Adam right after a zero gradient gives ~1e-19) rotates by ``arctan(ρ)`` and
    keeps ``‖w⁰‖``, as do tiny or huge weights. NaN or Inf in ``s``, ``w``, ``‖w⁰‖`` or ``ρ``
    gives NaN for that layer. With a ``probe`` watching the layer, the rotation monitor's
    figures are computed alongside (see :class:`RotationProbe`).
    """
    rho = jnp.asarray(rho).astype(compute_dtype(w, s))
    watch = probe is not None and probe.watches(lo, w)
    (a, b, c), (ew, es), extra = layca_sums(lo, w, s, probe if watch else None)
    poisoned = jnp.isnan(a + b + c + n0 + rho)
    w0 = probe.reference[lo.path] if watch else None
    dperp = extra["ds"] - (b / jnp.where(a > 0, a, 1.0)) * extra["dw"] if watch else None
    proj2, b, dperp = layca_tangent_part(lo, w, s, ew, es, a, b, c, w0, dperp)
    has_norm = a > 0
    a_safe = jnp.where(has_norm, a, 1.0)
    # A layer that does not rotate (zero or parallel step, or ρ = 0) stays exactly put: no
    # radial float32 renormalisation either, so a zero gradient gives a zero update.
    moves = has_norm & (proj2 > parallel_tol**2 * c) & (rho != 0)
    # The authors' guard: absolute, on the lr-scaled projected step ρ‖s⊥‖ = ρ √proj2 2^es
    # (written so that a NaN ρ still propagates).
    moves = moves & ~(rho * rho * proj2 <= jnp.square(min_step_norm * pow2(-es)))
    rho = jnp.where(moves, rho, 0.0)
    root_a = jnp.sqrt(a_safe)
    # ŝ' = (s' - (b/a) w') · inv, with ‖ŝ'‖ = ‖w'‖.
    inv = jnp.where(moves, root_a / jnp.sqrt(jnp.where(moves, proj2, 1.0)), 0.0)
    # k = ‖w⁰‖ / (‖w‖ √(1+ρ²)) = (‖w⁰‖ 2^-ew) / (√a' √(1+ρ²)); k - 1 via expm1 keeps the
    # tiny radial correction accurate for small ρ.
    n0s = jnp.where(n0 > 0, n0 * pow2(-ew), 1.0)
    log_k = jnp.log(n0s) - jnp.log(root_a) - 0.5 * jnp.log1p(rho**2)
    k_minus_1 = jnp.where(n0 > 0, jnp.where(moves, jnp.expm1(log_k), 0.0), -1.0)
    k = k_minus_1 + 1.0
    coef_w = jnp.where(has_norm, k_minus_1 + k * rho * inv * (b / a_safe), 0.0)
    # on s' = s 2^-es; the factor 2^ew puts the step back at the scale of w
    coef_s = jnp.where(has_norm, -k * rho * inv, 0.0) * pow2(ew)
    coef_w, coef_s = nan_where(poisoned, coef_w), nan_where(poisoned, coef_s)

    def update(w, s):  # one elementwise pass (s 2^-es: a multiply by 1 on the usual path)
        w32, s32 = upcast(w, s)
        return coef_w * w32 + coef_s * (s32 * pow2(-es))

    if watch:
        tangent = dict(moves=moves, k_minus_1=k_minus_1, rho=rho, inv=inv, dperp=dperp)
        probe.figures[lo.path] = probe_figures(
            lo, probe, dict(a=a, ew=ew, **extra), tangent, poisoned, update, w, s)
    return update(w, s).astype(s.dtype)


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
        probe = extra_args.get("rotation_probe")  # from a wrapping track_rotation
        check_params(updates, params)
        check_like_init(updates, state.initial_norm, layering, "scale_by_layca")
        lr = value_at(rate, state.count)
        a_t = value_at(alpha, state.count)

        def fused(lo, s, w, n0, depth):
            if not lo.is_layer:
                s32 = upcast(s)
                if non_layer == "freeze":  # 0, but NaN for a NaN gradient (0 * NaN)
                    return (0.0 * s32).astype(s.dtype)
                return (-lr.astype(s32.dtype) * s32).astype(s.dtype)
            dtype = compute_dtype(s, w)
            m = multiplier_at_depth(a_t, depth, state.num_layers, dtype)
            rho = lr.astype(dtype) * m
            return layca_layer_update(lo, s, w, n0, rho, parallel_tol, min_step_norm, probe)

        updates = layering.map(fused, updates, params, state.initial_norm, state.layer_depth)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
