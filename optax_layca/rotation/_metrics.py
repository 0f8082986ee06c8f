"""Offline per-layer metrics: rotation to init, rotation rate, norms, Adam ν percentiles and
the layer-wise convergence rate. Each takes parameter trees (or an optimizer state) and returns
``{layer path: array}``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax

from .._base import unwrap_variables
from .._custom_types import IsLayer, LayerAxis
from .._layers import (
    Layering,
    check_same_structure,
    layer_dot,
    squeeze_reduced,
    tensor_layouts,
)
from ._angles import cosine_distance_of_angle, layer_angle_kept


def per_layer(
    fn: Callable[..., jax.Array], layering: Layering, tree: Any, *rest: Any
) -> dict[str, jax.Array]:
    """``{path: fn(layout, leaf, *rest_leaves)}`` over the layer leaves of ``tree``."""
    out = {}
    flats = [jtu.tree_flatten_with_path(tree)[0]] + [jax.tree.leaves(r) for r in rest]
    for i, ((_, x), lo) in enumerate(zip(flats[0], layering.layouts(tree))):
        if lo.is_layer:
            out[lo.path] = squeeze_reduced(fn(lo, x, *(f[i] for f in flats[1:])), lo)
    if not out:
        raise ValueError(
            "No layer found: no leaf matches `is_layer` (default: leaves named kernel/embedding/w "
            "or with ndim >= 2). Pass `is_layer=` to choose them."
        )
    return out



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
    params, reference = unwrap_variables(params), unwrap_variables(reference)
    check_same_structure(params, reference, "params", "reference")
    layering = Layering(is_layer, layer_axis, per_unit)
    return per_layer(lambda lo, w, r: layer_angle_kept(r, w, lo), layering, params, reference)


def layer_rotation(
    params: Any,
    initial_params: Any,
    *,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
) -> dict[str, jax.Array]:
    r"""Cosine distance ``1 - cos(w_l, w_l^0)`` of each layer to its initial value.

    The quantity of the papers' layer rotation curves (Carbonnelle & De Vleeschouwer, 2019, §3.1): 0 at init, 1 when the
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
    return {k: cosine_distance_of_angle(v) for k, v in angles.items()}


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

    Carbonnelle & De Vleeschouwer, 2019, §3.1 (radians per step).

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
    return per_layer(lambda lo, x: jnp.sqrt(layer_dot(x, x, lo)), layering, unwrap_variables(tree))


def second_moment_percentiles(
    opt_state: Any,
    q: Sequence[float] = (10.0, 50.0, 90.0),
    *,
    key: str = "nu",
    layers_only: bool = True,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
) -> dict[str, jax.Array]:
    r"""Percentiles of Adam's second-moment estimate ``ν`` within each layer (Carbonnelle & De Vleeschouwer, 2019, Fig. 11).

    ``ν_t = β₂ ν_{t-1} + (1 - β₂) g_t²`` is read from the optimizer state (the ``nu`` field of
    ``optax.scale_by_adam``'s state, found with ``optax.tree.get``; ``key=`` picks another
    field, e.g. of ``scale_by_rms``). Works on ``nnx.Optimizer`` states too.

    ``layers_only=False`` gives the entries of the authors' figure: one per ``ν`` tensor,
    biases and norm parameters included (their ``Adam_2nd_moment_memory`` takes every ``v``
    of Keras' Adam), each non-layer tensor whole (per block under an ``nn.scan`` stack).
    The authors record after the first batch of each epoch (``RotationHistory(every=...)``
    as in ``docs/fidelity.md``).

    Args:
      opt_state: an optax state holding exactly one ``key`` field.
      q: percentiles in ``[0, 100]`` (default 10th, 50th, 90th as in the paper).
      key: name of the field holding the per-parameter estimate.
      layers_only: True: layer (kernel) tensors only; False: every floating ``ν`` tensor.
      is_layer, layer_axis: which leaves of ``ν`` are layers (same as for the params).

    Returns:
      ``{path: float32 array of shape (len(q),)}`` (``(n_stacked, len(q))`` for stacked
      tensors).

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
        nu = optax.tree.get(unwrap_variables(opt_state), key)
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
    if not isinstance(layers_only, bool):
        raise TypeError(
            f"`second_moment_percentiles(layers_only=...)` must be a bool; got {layers_only!r}."
        )
    layering = Layering(is_layer, layer_axis)
    qs = jnp.asarray(q, jnp.float32)
    tensors = None if layers_only else tensor_layouts(nu, layering)

    def pct(lo, v):
        v = v.astype(jnp.float32)
        if lo.stack_axis is None:
            return jnp.percentile(jnp.ravel(v), qs)
        v = jnp.moveaxis(v, lo.stack_axis, 0).reshape(v.shape[lo.stack_axis], -1)
        return jax.vmap(lambda r: jnp.percentile(r, qs))(v)

    out = {}
    for (_, v), lo in zip(jtu.tree_flatten_with_path(nu)[0], layering.layouts(nu)):
        if lo.is_layer:
            out[lo.path] = pct(lo, v)
        elif tensors is not None and jnp.issubdtype(jnp.result_type(v), jnp.floating) and v.size:
            out[lo.path] = pct(tensors[lo.path], v)
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
    r"""Layer-wise convergence rate (Chen et al., 2023, Definition 2.1).

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
            return unwrap_variables(trajectory[t])
        except (KeyError, IndexError) as e:
            raise ValueError(f"`trajectory` has no parameters at step {name}={t}.") from e

    final_params = unwrap_variables(final_params)
    thetas = {name: at(t, name) for name, t in (("t0", t0), ("t1", t1), ("t2", t2))}
    for name, tree in thetas.items():
        check_same_structure(tree, final_params, f"trajectory[{name}]", "final_params")
    layering = Layering(is_layer, layer_axis, per_unit)
    star = jax.tree.leaves(final_params)
    flat = {k: jax.tree.leaves(v) for k, v in thetas.items()}
    out = {}
    for i, (w_star, lo) in enumerate(zip(star, layering.layouts(final_params))):
        if not lo.is_layer:
            continue
        ws = np.asarray(w_star, np.float64)
        d0, d1, d2 = (_dist64(flat[k][i], ws, lo.reduce_axes) for k in ("t0", "t1", "t2"))
        rate = np.where(d0 > 0, (d1 - d2) / ((t2 - t1) * np.where(d0 > 0, d0, 1.0)), 0.0)
        out[lo.path] = rate
    if not out:
        raise ValueError("No layer found in `final_params`: pass `is_layer=` to choose them.")
    return out
