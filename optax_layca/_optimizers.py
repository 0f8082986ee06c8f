"""Aliases: Layca, the papers' LARS variant and SGD_AMom as plain optax chains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ._base import (
    check_bool,
    check_learning_rate,
    check_number,
    guard_rate,
    is_concrete,
)
from ._custom_types import IsLayer, LayerAxis, LayerOrder, ScalarOrSchedule
from ._layca import (
    DEFAULT_PARALLEL_TOL,
    NON_LAYER_POLICIES,
    cap_norm_increase,
    check_layering_args,
    check_min_step_norm,
    check_non_layer,
    project_orthogonal,
    project_to_initial_norm,
    scale_by_layca,
    scale_to_weight_norm,
)
from ._layers import Layering, check_layer_order, check_like_init, check_params
from ._multipliers import check_alpha, scale_by_layer_multipliers

BASE_SIGN_MSG = (
    "`base` returned a step pointing *against* the gradient: it looks like a full optimizer "
    "(e.g. `optax.adam(1e-3)`, which already applies `-learning_rate`), and Layca would ascend. "
    "Pass the direction only, in optax's gradient convention: `optax.scale_by_adam()`, "
    "`optax.trace(0.9)`, `optax.scale_by_rms()`, or None for SGD. (Disable this check with "
    "`check_base=False`.)"
)


def _check_base_direction(base: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wraps ``base`` so that its ``init`` probes one step on concrete params.

    A direction transform maps a gradient of ones to something with a positive inner product
    with it; a full optimizer (already multiplied by ``-learning_rate``) gives a negative one.
    The probe runs once, on the host, and only when ``init`` sees concrete params.
    """
    # the wrapper takes extra arguments (optax.chain forwards them), so `base` must accept them
    base = optax.with_extra_args_support(base)

    def init_fn(params):
        state = base.init(params)
        leaves = jax.tree.leaves(params)
        if leaves and all(is_concrete(x) for x in leaves):
            probe = jax.tree.map(jnp.ones_like, params)
            step, _ = base.update(probe, state, params)
            inner = sum(jnp.vdot(u.astype(jnp.float32), g.astype(jnp.float32))
                        for u, g in zip(jax.tree.leaves(step), jax.tree.leaves(probe)))
            if float(inner) < 0:
                raise ValueError(BASE_SIGN_MSG)
        return state

    return optax.GradientTransformationExtraArgs(init_fn, base.update)


def base_direction(base: optax.GradientTransformation | None, check_base: bool):
    """``base`` as a direction transform (identity for None), probed for the sign error.

    A plain ``GradientTransformation`` is wrapped with ``optax.with_extra_args_support``, so
    extra ``update`` arguments (``value=``, ``grad=`` from optimistix or
    ``reduce_on_plateau``) reach it harmlessly.
    """
    check_bool(check_base, "check_base")
    if base is None:
        return optax.identity()
    if not isinstance(base, optax.GradientTransformation):
        raise TypeError(
            f"`base` must be an optax.GradientTransformation giving a step direction; got {base!r}."
        )
    base = optax.with_extra_args_support(base)
    return _check_base_direction(base) if check_base else base


def guard_chain(
    tx: optax.GradientTransformation, where: str, layering: Layering, index: int
) -> optax.GradientTransformationExtraArgs:
    """``tx`` (an ``optax.chain``) checking ``updates``/``params`` before any link runs.

    The check reads the per-layer state of link ``index`` (an ``initial_norm`` built at
    ``init``), so a tree changed since ``init`` is reported by name before ``base`` (whose
    own tree errors name no leaf) sees it. The state is ``tx``'s, unchanged.
    """

    def update_fn(updates, state, params=None, **extra_args):
        check_params(updates, params)
        check_like_init(updates, state[index].initial_norm, layering, where)
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _non_layer_mask(layering: Layering):
    return lambda tree: layering.map(lambda lo, x: not lo.is_layer, tree)


def _freeze_non_layers(layering: Layering, non_layer: str) -> optax.GradientTransformation:
    if non_layer == "freeze":
        # scale(0), not set_to_zero(): 0 × NaN = NaN keeps a NaN gradient visible
        return optax.masked(optax.scale(0.0), _non_layer_mask(layering))
    return optax.identity()


def layca(
    learning_rate: ScalarOrSchedule,
    base: optax.GradientTransformation | None = None,
    alpha: ScalarOrSchedule = 0.0,
    layer_order: LayerOrder = None,
    *,
    non_layer: str = "freeze",
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
    parallel_tol: float = DEFAULT_PARALLEL_TOL,
    min_step_norm: float = 0.0,
    fused: bool = True,
    check_base: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Layca: layer-level control of the amount of weight rotation per step.

    Trains the layers (kernels) only: biases and norm parameters keep their initial values,
    as in the authors' code ("only kernels are optimized"; ``non_layer="freeze"``, the
    default). ``non_layer="base"`` trains them with the plain ``-η(t)·base`` step instead.

    Each layer ``l`` (in forward order) rotates by exactly ``arctan(ρ_l(t))`` per step, with
    ``ρ_l(t) = m_l(α) η(t)`` (Eq. 1), in the direction given by ``base``, and keeps its initial
    norm:

    .. math::
      \begin{align*}
        s &\leftarrow s - \tfrac{s \cdot w}{w \cdot w} w &\text{(1: tangent projection)}\\
        s &\leftarrow s \lVert w \rVert / \lVert s \rVert &\text{(2: normalisation)}\\
        w &\leftarrow w - \rho_l(t)\, s &\text{(3: step)}\\
        w &\leftarrow w \lVert w^0 \rVert / \lVert w \rVert &\text{(4: back to the sphere)}
      \end{align*}

    .. warning::
      ``base`` is a *direction* in optax's gradient convention, before the sign flip:
      ``optax.scale_by_adam()``, ``optax.trace(0.9)``, ``optax.scale_by_rms()``, or None (SGD).
      A full optimizer such as ``optax.adam(1e-3)`` already multiplies by ``-lr`` and would make
      Layca ascend; ``init`` detects this on concrete params and raises.

    Only the direction of ``base`` matters: its learning rate and bias correction cancel in op 2.

    .. note::
      The authors' Adam is Keras's: ``ε = 1e-7`` added to the *un*-corrected ``√v_t``, i.e.
      ``m̂_t / (√v̂_t + ε/√(1 - β₂ᵗ))``; ``optax.scale_by_adam()`` adds ``1e-8`` to the corrected
      ``√v̂_t``, a direction about 0.5% apart after 20 steps. The Keras direction is one line of
      optax (see the second example); with ``min_step_norm=1e-7, parallel_tol=0.0`` the
      steps are the authors' own. Their SGD keeps the learning rate inside its momentum
      buffer (``v ← m v - η g``): ``base=optax.chain(optax.scale_by_schedule(η),
      optax.trace(m))`` reproduces it where ``η`` changes (constant ``η`` cancels).

    Args:
      learning_rate: global rate ``η(t) >= 0`` (float or optax schedule, checked at step 0; a
        negative or NaN rate that cannot be checked early gives NaN updates, never an ascent).
      base: step direction transform (None: the raw gradient, i.e. SGD).
      alpha: Eq. 1 prioritisation in ``[-1, 1]`` or a schedule; 0: uniform rates.
      layer_order: layer paths in forward order (see :func:`forward_order`); None: the
        natural sort of the paths where it is known to be the forward order (auto-numbered
        ``Name_k`` siblings), otherwise a non-zero ``alpha`` raises.
      non_layer: biases and norm scales: ``"freeze"`` (keep their initial values, the
        authors') or ``"base"`` (updated by ``-η(t)·base``).
      is_layer: which leaves are layers (callable ``(path, leaf) -> bool`` or list of paths).
      layer_axis: stack axis of leaves holding several layers (``nn.scan``).
      per_unit: rotate each output unit separately (Nero-like).
      parallel_tol: steps this close to parallel to ``w`` (relative, in ``[0, 1)``) are
        dropped.
      min_step_norm: layers whose lr-scaled projected step ``ρ_l‖s_⊥‖`` is at most this do
        not move (the authors' guard: 1e-7; default 0, off). Fused form only.
      fused: one reduction pass per layer (:func:`scale_by_layca`); False gives the explicit
        chain of the four operations (same numbers to float tolerance).
      check_base: probe ``base`` at ``init`` for the sign error above.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (needs ``params`` in ``update``).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, 0.0], [0.0, 1.0]]),
      ...                       "bias": jnp.zeros(2)}}
      >>> tx = layca(learning_rate=0.1, base=optax.scale_by_adam())
      >>> state = tx.init(params)
      >>> grads = {"Dense_0": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]]),
      ...                      "bias": jnp.ones(2)}}
      >>> updates, state = tx.update(grads, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> w0, w1 = params["Dense_0"]["kernel"].ravel(), new["Dense_0"]["kernel"].ravel()
      >>> perp = w1 - w0 * (w1 @ w0) / (w0 @ w0)
      >>> round(float(jnp.arctan2(jnp.linalg.norm(perp) * jnp.linalg.norm(w0), w1 @ w0)), 4)
      0.0997
      >>> round(float(jnp.arctan(0.1)), 4)
      0.0997
      >>> new["Dense_0"]["bias"].tolist()  # frozen, as in the authors' code
      [0.0, 0.0]

      The authors' (Keras) Adam direction, with their step guard:

      >>> b2 = 0.999
      >>> keras_adam = optax.inject_hyperparams(optax.scale_by_adam)(
      ...     b1=0.9, b2=b2, eps=lambda t: 1e-7 / jnp.sqrt(1 - b2 ** (t + 1)))
      >>> tx = layca(0.1, base=keras_adam, min_step_norm=1e-7, parallel_tol=0.0)
      >>> updates, _ = tx.update(grads, tx.init(params), params)

    References:
      Carbonnelle & De Vleeschouwer, `An experimental study of layer-level training speed and
      its impact on generalization`, 2019, Algorithm 1, Eq. 1, footnote 2 (biases left for
      future work).
    """
    check_learning_rate(learning_rate, "layca(learning_rate=...)")
    check_alpha(alpha, "layca(alpha=...)")
    check_layer_order(layer_order, "layca")
    check_non_layer(non_layer, "layca")
    check_layering_args("layca", parallel_tol)
    check_bool(fused, "layca(fused=...)")
    check_min_step_norm(min_step_norm, "layca")
    if not fused and is_concrete(min_step_norm) and float(min_step_norm) != 0:
        raise ValueError(
            "`layca(min_step_norm=...)` needs the fused form (`fused=True`): the chained ops "
            "normalise the step before the learning rate is known."
        )
    layering = Layering(is_layer, layer_axis, per_unit)
    kw = dict(is_layer=is_layer, layer_axis=layer_axis, per_unit=per_unit)
    if fused:
        tx = optax.chain(
            base_direction(base, check_base),
            scale_by_layca(learning_rate, alpha, layer_order, non_layer=non_layer,
                           parallel_tol=parallel_tol, min_step_norm=min_step_norm, **kw),
        )
        return guard_chain(tx, "layca", layering, 1)
    tx = optax.chain(
        base_direction(base, check_base),
        project_orthogonal(parallel_tol=parallel_tol, **kw),
        scale_to_weight_norm(**kw),
        scale_by_layer_multipliers(alpha, layer_order, is_layer=is_layer, layer_axis=layer_axis),
        optax.scale_by_learning_rate(guard_rate(learning_rate)),
        project_to_initial_norm(**kw),
        _freeze_non_layers(layering, non_layer),
    )
    return guard_chain(tx, "layca", layering, 5)


LARS_NON_LAYER_POLICIES = ("normalize", *NON_LAYER_POLICIES)


def lars(
    learning_rate: ScalarOrSchedule,
    base: optax.GradientTransformation | None = None,
    alpha: ScalarOrSchedule = 0.0,
    layer_order: LayerOrder = None,
    max_norm_increase: float = 1e-4,
    *,
    non_layer: str = "normalize",
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
    check_base: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""The papers' LARS variant: Layca without ops 1 and 4, with a cap on norm growth.

    Normalises *every* tensor, biases and norm parameters included, as the authors' code does
    (``non_layer="normalize"``, the default: each bias or scale takes a step of its own norm,
    capped against its own initial norm, and the multiplier of its module's layer; a zero
    tensor, e.g. a zero-initialised bias, stays 0). ``non_layer="base"`` gives non-layer
    leaves the plain ``-η(t)·base`` step, ``"freeze"`` keeps them.

    .. math::
      \begin{align*}
        s &\leftarrow s \lVert w \rVert / \lVert s \rVert, \qquad
        w' = w - \rho_l(t)\, s \\
        \lVert w' \rVert - \lVert w \rVert > \delta \lVert w^0 \rVert
          &\Rightarrow w' \leftarrow w' (\lVert w \rVert + \delta \lVert w^0 \rVert) / \lVert w' \rVert
      \end{align*}

    with ``δ = max_norm_increase`` (1e-4 in the paper) and ``ρ_l`` from Eq. 1.

    .. note::
      This is not ``optax.lars``. ``optax.lars`` (You et al.) scales by a trust ratio
      ``η_trust ‖w‖ / (‖g‖ + λ‖w‖)`` with a trust coefficient (default 1e-3) and weight
      decay inside the ratio, applies momentum *after* the learning rate, and has no norm
      cap. Here the step is normalised to exactly ``‖w‖`` (trust coefficient 1, no decay),
      momentum comes from ``base`` before the normalisation, and norm growth per step is
      capped relative to the initial norm, as in the authors' code (App. A.2, footnote 7).

    .. note::
      The authors start LARS from kernels scaled by 1/4 ("the weights increase a lot during
      training"); the cap's ``‖w⁰‖`` is that of the scaled kernels. Scale them before
      ``init`` (third example). Their LARS also zeroes NaN step entries; here a NaN stays NaN.

    Args:
      learning_rate: global rate (float or optax schedule).
      base: step direction (None: SGD, the authors' LARS momentum of 0). Same sign
        convention as :func:`layca`.
      alpha: Eq. 1 prioritisation.
      layer_order: forward order of layer paths.
      max_norm_increase: ``δ``.
      non_layer: ``"normalize"`` (the authors'), ``"base"`` or ``"freeze"``.
      is_layer, layer_axis, per_unit, check_base: as in :func:`layca`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"kernel": jnp.array([[1.0, 0.0]])}
      >>> tx = lars(learning_rate=0.1)
      >>> u, _ = tx.update({"kernel": jnp.array([[0.0, -1.0]])}, tx.init(params), params)
      >>> new = optax.apply_updates(params, u)["kernel"]
      >>> round(float(jnp.linalg.norm(new)), 6)  # growth capped at 1e-4 * ||w0||
      1.0001

      Biases are normalised too; a zero bias stays 0:

      >>> p = {"Dense_0": {"kernel": jnp.eye(2), "bias": jnp.zeros(2)},
      ...      "BatchNorm_0": {"scale": jnp.ones(2)}}
      >>> g = jax.tree.map(lambda x: jnp.full(x.shape, 0.5), p)
      >>> u, _ = lars(0.1).update(g, lars(0.1).init(p), p)
      >>> u["Dense_0"]["bias"].tolist(), round(float(jnp.linalg.norm(u["BatchNorm_0"]["scale"])), 4)
      ([0.0, 0.0], 0.1414)

      The authors' initialisation for LARS, kernels scaled by 1/4:

      >>> from optax_layca import default_is_layer, path_str
      >>> quarter = jax.tree_util.tree_map_with_path(
      ...     lambda k, w: w / 4 if default_is_layer(path_str(k), w) else w, p)
      >>> quarter["Dense_0"]["kernel"][0, 0].item(), quarter["BatchNorm_0"]["scale"][0].item()
      (0.25, 1.0)

    References:
      Carbonnelle & De Vleeschouwer, `An experimental study of layer-level training speed and
      its impact on generalization`, 2019, App. A.2 and footnote 7; You et al., `Large Batch
      Training of Convolutional Networks <https://arxiv.org/abs/1708.03888>`_, 2017.
    """
    check_learning_rate(learning_rate, "lars(learning_rate=...)")
    check_alpha(alpha, "lars(alpha=...)")
    check_layer_order(layer_order, "lars")
    check_number(max_norm_increase, "lars(max_norm_increase=...)", low=0.0)
    check_non_layer(non_layer, "lars", LARS_NON_LAYER_POLICIES)
    layering = Layering(is_layer, layer_axis, per_unit)
    kw = dict(is_layer=is_layer, layer_axis=layer_axis, per_unit=per_unit)
    tensors = "normalize" if non_layer == "normalize" else "pass"
    tx = optax.chain(
        base_direction(base, check_base),
        scale_to_weight_norm(non_layer=tensors, **kw),
        scale_by_layer_multipliers(alpha, layer_order, is_layer=is_layer, layer_axis=layer_axis,
                                   non_layer="module" if tensors == "normalize" else "pass"),
        optax.scale_by_learning_rate(guard_rate(learning_rate)),
        cap_norm_increase(max_norm_increase, non_layer=tensors, **kw),
        _freeze_non_layers(layering, non_layer),
    )
    return guard_chain(tx, "lars", layering, 4)


def sgd_amom(
    learning_rate: ScalarOrSchedule, momentum: float = 0.9
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with Adam's first-moment scheme and no bias correction (Carbonnelle & De Vleeschouwer, 2019, App. B.4).

    .. math::
      v_t = m\, v_{t-1} + (1 - m)\, g_t, \qquad w \leftarrow w - \rho\, v_t

    Use ``optax.ema(momentum, debias=False)`` alone as a Layca ``base`` direction.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> tx = sgd_amom(1.0, momentum=0.9)
      >>> p = jnp.zeros(1)
      >>> u, s = tx.update(jnp.ones(1), tx.init(p))
      >>> np.asarray(u, float).round(4).tolist()
      [-0.1]

    References:
      Carbonnelle & De Vleeschouwer, 2019, App. B.4.
    """
    check_learning_rate(learning_rate, "sgd_amom(learning_rate=...)")
    check_number(momentum, "sgd_amom(momentum=...)", low=0.0, high=1.0, high_open=True)
    return optax.chain(
        optax.ema(momentum, debias=False),
        optax.scale_by_learning_rate(guard_rate(learning_rate)),
    )
