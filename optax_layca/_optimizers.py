"""Aliases: Layca, the papers' LARS variant and SGD_AMom as plain optax chains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ._base import is_concrete
from ._custom_types import IsLayer, LayerAxis, LayerOrder, ScalarOrSchedule
from ._layca import (
    DEFAULT_PARALLEL_TOL,
    cap_norm_increase,
    check_non_layer,
    project_orthogonal,
    project_to_initial_norm,
    scale_by_layca,
    scale_to_weight_norm,
)
from ._layers import Layering
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
    """``base`` as a direction transform (identity for None), probed for the sign error."""
    if base is None:
        return optax.identity()
    if not isinstance(base, optax.GradientTransformation):
        raise TypeError(
            f"`base` must be an optax.GradientTransformation giving a step direction; got {base!r}."
        )
    return _check_base_direction(base) if check_base else base


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
    non_layer: str = "base",
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
    parallel_tol: float = DEFAULT_PARALLEL_TOL,
    fused: bool = True,
    check_base: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Layca: layer-level control of the amount of weight rotation per step.

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

    Args:
      learning_rate: global rate ``η(t)`` (float or optax schedule).
      base: step direction transform (None: the raw gradient, i.e. SGD).
      alpha: Eq. 1 prioritisation in ``[-1, 1]`` or a schedule; 0: uniform rates.
      layer_order: layer paths in forward order (see :func:`forward_order`); None: natural
        sort of the paths.
      non_layer: biases and norm scales: ``"base"`` (updated by ``-η(t)·base``) or
        ``"freeze"``.
      is_layer: which leaves are layers (callable ``(path, leaf) -> bool`` or list of paths).
      layer_axis: stack axis of leaves holding several layers (``nn.scan``).
      per_unit: rotate each output unit separately (Nero-like).
      parallel_tol: steps this close to parallel to ``w`` (relative) are dropped.
      fused: one reduction pass per layer (:func:`scale_by_layca`); False gives the explicit
        chain of the four operations (same numbers to float tolerance).
      check_base: probe ``base`` at ``init`` for the sign error above.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (needs ``params`` in ``update``).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, 0.0], [0.0, 1.0]])}}
      >>> tx = layca(learning_rate=0.1, base=optax.scale_by_adam())
      >>> state = tx.init(params)
      >>> grads = {"Dense_0": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]])}}
      >>> updates, state = tx.update(grads, state, params)
      >>> new = optax.apply_updates(params, updates)
      >>> w0, w1 = params["Dense_0"]["kernel"].ravel(), new["Dense_0"]["kernel"].ravel()
      >>> perp = w1 - w0 * (w1 @ w0) / (w0 @ w0)
      >>> round(float(jnp.arctan2(jnp.linalg.norm(perp) * jnp.linalg.norm(w0), w1 @ w0)), 4)
      0.0997
      >>> round(float(jnp.arctan(0.1)), 4)
      0.0997

    References:
      Carbonnelle & De Vleeschouwer, `An experimental study of layer-level training speed and
      its impact on generalization`, 2019, Algorithm 1, Eq. 1.
    """
    check_alpha(alpha, "layca(alpha=...)")
    check_non_layer(non_layer, "layca")
    layering = Layering(is_layer, layer_axis, per_unit)
    kw = dict(is_layer=is_layer, layer_axis=layer_axis, per_unit=per_unit)
    if fused:
        return optax.chain(
            base_direction(base, check_base),
            scale_by_layca(learning_rate, alpha, layer_order, non_layer=non_layer,
                           parallel_tol=parallel_tol, **kw),
        )
    return optax.chain(
        base_direction(base, check_base),
        project_orthogonal(parallel_tol=parallel_tol, **kw),
        scale_to_weight_norm(**kw),
        scale_by_layer_multipliers(alpha, layer_order, is_layer=is_layer, layer_axis=layer_axis),
        optax.scale_by_learning_rate(learning_rate),
        project_to_initial_norm(**kw),
        _freeze_non_layers(layering, non_layer),
    )


def lars(
    learning_rate: ScalarOrSchedule,
    base: optax.GradientTransformation | None = None,
    alpha: ScalarOrSchedule = 0.0,
    layer_order: LayerOrder = None,
    max_norm_increase: float = 1e-4,
    *,
    non_layer: str = "base",
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
    check_base: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""The papers' LARS variant: Layca without ops 1 and 4, with a cap on norm growth.

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

    Args:
      learning_rate: global rate (float or optax schedule).
      base: step direction (None: SGD). Same sign convention as :func:`layca`.
      alpha: Eq. 1 prioritisation.
      layer_order: forward order of layer paths.
      max_norm_increase: ``δ``.
      non_layer: ``"base"`` or ``"freeze"``.
      is_layer, layer_axis, per_unit, check_base: as in :func:`layca`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> params = {"kernel": jnp.array([[1.0, 0.0]])}
      >>> tx = lars(learning_rate=0.1)
      >>> u, _ = tx.update({"kernel": jnp.array([[0.0, -1.0]])}, tx.init(params), params)
      >>> new = optax.apply_updates(params, u)["kernel"]
      >>> round(float(jnp.linalg.norm(new)), 6)  # growth capped at 1e-4 * ||w0||
      1.0001

    References:
      Carbonnelle & De Vleeschouwer, 2019, App. A.2; You et al., `Large Batch Training of
      Convolutional Networks <https://arxiv.org/abs/1708.03888>`_, 2017.
    """
    check_alpha(alpha, "lars(alpha=...)")
    check_non_layer(non_layer, "lars")
    layering = Layering(is_layer, layer_axis, per_unit)
    kw = dict(is_layer=is_layer, layer_axis=layer_axis, per_unit=per_unit)
    return optax.chain(
        base_direction(base, check_base),
        scale_to_weight_norm(**kw),
        scale_by_layer_multipliers(alpha, layer_order, is_layer=is_layer, layer_axis=layer_axis),
        optax.scale_by_learning_rate(learning_rate),
        cap_norm_increase(max_norm_increase, **kw),
        _freeze_non_layers(layering, non_layer),
    )


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
    if is_concrete(momentum) and not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"`sgd_amom(momentum=...)` must lie in [0, 1); got {momentum}.")
    return optax.chain(
        optax.ema(momentum, debias=False), optax.scale_by_learning_rate(learning_rate)
    )
