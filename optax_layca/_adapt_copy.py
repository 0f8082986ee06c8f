"""AdaptCopy: Layca replaying the per-layer rotation of a recorded run.

Carbonnelle & De Vleeschouwer, extended version of *Layer rotation*, 2019, §5.4. The recording
is anything shaped like :class:`optax_layca.rotation.RotationHistory` (see
:class:`RotationRecord`): control does not import the measurement wing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._base import (
    check_choice,
    check_int,
    check_learning_rate,
    check_number,
    guard_rate,
    value_at,
)
from ._custom_types import IsLayer, LayerAxis, ScalarOrSchedule
from ._layca import (
    DEFAULT_PARALLEL_TOL,
    check_layering_args,
    initial_layer_norms,
    layca_layer_update,
    zero_norm_flags,
)
from ._layers import (
    Layering,
    LeafLayout,
    check_like_init,
    check_params,
    kept_shape,
    layer_dot,
    natural_order,
    upcast,
)
from ._optimizers import base_direction, guard_chain

PAST_END = ("hold", "stop")


@runtime_checkable
class RotationRecord(Protocol):
    """What AdaptCopy reads from a recording (:class:`optax_layca.rotation.RotationHistory`)."""

    @property
    def steps(self) -> np.ndarray: ...

    def get(self, name: str) -> dict[str, np.ndarray]: ...

    def step_angles(self) -> dict[str, np.ndarray]: ...


TARGETS = ("step_angle", "cosine_distance")


class AdaptCopyState(NamedTuple):
    """State of :func:`scale_by_adapt_copy`.

    Attributes:
      count: number of updates so far (int32): the row of the rate table used next.
      initial_norm: ‖w⁰‖ per layer (float32 at least, reduced axes kept).
      initial_layers: ``{layer path: w⁰}`` with ``target="cosine_distance"`` (else empty).
      zero_initial_norm: ``‖w⁰‖ == 0`` per layer (bool): layers that never train (see
        :func:`~optax_layca.scale_by_layca`).
    """

    count: jax.Array
    initial_norm: Any
    initial_layers: dict
    zero_initial_norm: Any


def _points(
    history_or_table: RotationRecord | Mapping[str, Any],
    name: str,
    steps_per_epoch: int | None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(record steps ``(R,)``, ``{layer path: values (R, ...)}``) from a history or a table."""
    if isinstance(history_or_table, RotationRecord):
        if steps_per_epoch is not None:
            raise ValueError(
                "`adapt_copy(steps_per_epoch=...)` applies to a table given per epoch, not to a "
                "RotationHistory (its steps are known)."
            )
        steps, values = history_or_table.steps, history_or_table.get(name)
        if len(steps) > 1 and steps[0] == 0:  # a record of the initial state: the origin
            steps, values = steps[1:], {p: v[1:] for p, v in values.items()}
        return steps, values
    if not isinstance(history_or_table, Mapping) or not history_or_table:
        raise TypeError(
            "`adapt_copy` needs a RotationHistory or a non-empty dict {layer path: per-step "
            f"values}}; got {type(history_or_table).__name__}."
        )
    if steps_per_epoch is not None:
        steps_per_epoch = check_int(steps_per_epoch, "adapt_copy(steps_per_epoch=...)", low=1)
    table = {}
    for path, v in history_or_table.items():
        v = np.asarray(v, np.float64)
        if v.ndim < 1 or v.shape[0] == 0:
            raise ValueError(
                f"`adapt_copy`: the values of layer {path!r} must be a non-empty array "
                f"(steps, ...); got shape {v.shape}."
            )
        table[str(path)] = v
    lengths = {p: v.shape[0] for p, v in table.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"`adapt_copy`: every layer needs the same number of rows; got {lengths}.")
    rows = next(iter(lengths.values()))
    k = steps_per_epoch or 1
    return np.arange(1, rows + 1) * k, table


def _step_table(
    history_or_table: RotationRecord | Mapping[str, Any],
    target: str,
    steps_per_epoch: int | None,
) -> dict[str, np.ndarray]:
    """``{layer path: float64 (T, ...)}``: per-step angles (``target="step_angle"``) or
    per-step target angles to init (``target="cosine_distance"``), row ``t`` for update t+1."""
    if target == "step_angle":
        if isinstance(history_or_table, RotationRecord):
            _points(history_or_table, "cumulative_angle", steps_per_epoch)  # argument checks
            table = history_or_table.step_angles()
        else:
            steps, table = _points(history_or_table, "", steps_per_epoch)
            k = steps_per_epoch or 1
            table = {p: np.repeat(v, k, axis=0) for p, v in table.items()}
        for path, v in table.items():
            if not np.all(np.isfinite(v)) or np.any(v < 0) or np.any(v >= np.pi / 2):
                raise ValueError(
                    f"`adapt_copy`: the step angles of layer {path!r} must be finite and in "
                    f"[0, π/2) (ρ = tan θ); got range [{np.nanmin(v):.3g}, {np.nanmax(v):.3g}]."
                )
        return table
    steps, table = _points(history_or_table, "cosine_distance", steps_per_epoch)
    if np.any(np.diff(steps) <= 0) or steps[0] <= 0:
        raise ValueError(f"`adapt_copy`: record steps must increase from > 0; got {steps[:10]}.")
    out = {}
    for path, cd in table.items():
        if not np.all(np.isfinite(cd)) or np.any(cd < 0) or np.any(cd > 2):
            raise ValueError(
                f"`adapt_copy`: the cosine distances of layer {path!r} must be finite and in "
                f"[0, 2]; got range [{np.nanmin(cd):.3g}, {np.nanmax(cd):.3g}]."
            )
        phi = 2.0 * np.arcsin(np.sqrt(np.clip(cd, 0.0, 2.0) / 2.0))  # angle to init
        flat = phi.reshape(len(steps), -1)
        grid = np.arange(1, steps[-1] + 1)
        cols = [
            np.interp(grid, np.concatenate([[0], steps]), np.concatenate([[0.0], c]))
            for c in flat.T
        ]
        out[path] = np.stack(cols, axis=1).reshape((len(grid), *phi.shape[1:]))
    return out


def _rate_to_reach(
    lo: LeafLayout, s: jax.Array, w: jax.Array, w0: jax.Array, phi: jax.Array, max_angle: float
) -> jax.Array:
    r"""Layca rate ``ρ = tan θ`` that puts the layer at angle ``phi`` from ``w⁰`` after the step.

    Layca moves ``ŵ`` along the great circle of ``ê``, the unit tangent direction of ``-s``.
    With ``φ`` the current angle to ``w⁰`` and ``κ = ê·t̂`` (``t̂`` the unit tangent towards
    ``w⁰``), the new angle ``φ'`` satisfies ``cos φ' = R cos(θ - β)``, ``β = atan2(κ sin φ,
    cos φ)``, ``R = √(cos²φ + κ² sin²φ)``, so ``θ = β + arccos(cos φ' / R)``, clipped to
    ``[0, max_angle]`` (an unreachable target gives the nearest reachable angle). All terms
    are evaluated through ``1 - cos`` forms (``2 sin²(x/2)``, ``1 - R = sin²φ (1-κ²)/(1+R)``)
    and the difference ``δ = w⁰ - w``, so small angles keep float32 relative accuracy.
    """
    w32, s32, w0_32 = upcast(w, s, w0)
    delta = w0_32 - w32
    a, b, cs = layer_dot(w32, w32, lo), layer_dot(s32, w32, lo), layer_dot(s32, s32, lo)
    dw, dd, sd = layer_dot(delta, w32, lo), layer_dot(delta, delta, lo), layer_dot(s32, delta, lo)
    has_w = a > 0
    a_safe = jnp.where(has_w, a, 1.0)
    s_perp = jnp.sqrt(jnp.maximum(cs - b * (b / a_safe), 0.0))
    d_perp = jnp.sqrt(jnp.maximum(dd - dw * (dw / a_safe), 0.0))
    both = (s_perp > 0) & (d_perp > 0)
    kappa = -(sd - dw * (b / a_safe)) / jnp.where(both, s_perp * d_perp, 1.0)
    kappa = jnp.where(both, jnp.clip(kappa, -1.0, 1.0), 0.0)
    phi_now = jnp.arctan2(d_perp * jnp.sqrt(a_safe), a + dw)
    sin_phi, cos_phi = jnp.sin(phi_now), jnp.cos(phi_now)
    beta = jnp.arctan2(kappa * sin_phi, cos_phi)
    r = jnp.sqrt(cos_phi**2 + (kappa * sin_phi) ** 2)
    one_minus_r = sin_phi**2 * (1.0 - kappa**2) / (1.0 + r)
    one_minus_x = (2.0 * jnp.sin(0.5 * phi) ** 2 - one_minus_r) / jnp.where(r > 0, r, 1.0)
    theta = beta + 2.0 * jnp.arcsin(jnp.sqrt(jnp.clip(one_minus_x, 0.0, 2.0) / 2.0))
    theta = jnp.clip(jnp.where(has_w, theta, 0.0), 0.0, max_angle)
    return jnp.tan(theta)


def _check_args(past_end, target, max_angle, parallel_tol, non_layer_learning_rate) -> None:
    check_choice(past_end, PAST_END, "adapt_copy(past_end=...)")
    check_choice(target, TARGETS, "adapt_copy(target=...)")
    check_number(max_angle, "adapt_copy(max_angle=...)", low=0.0, high=np.pi / 2,
                 low_open=True, high_open=True)
    check_layering_args("adapt_copy", parallel_tol)
    if non_layer_learning_rate is not None:
        check_learning_rate(non_layer_learning_rate, "adapt_copy(non_layer_learning_rate=...)")


def _check_recorded_layers(rates: dict, layers: dict, nonempty: bool) -> None:
    """Raises unless the recording has one rate table per layer of params, of its shape."""
    # an empty tree (``optax.masked(tx, {})``, an unused partition label) has no layer to
    # match: the transform then acts on nothing
    unknown = [p for p in rates if p not in layers] if nonempty else []
    missing = [p for p in natural_order(layers) if p not in rates]
    if unknown or missing:
        raise ValueError(
            "`adapt_copy`: the recorded layers do not match the layers of params. "
            f"Recorded but not in params: {unknown}; in params but not recorded: {missing}."
        )
    for p, (lo, x) in layers.items():
        want = kept_shape(lo, np.shape(x))
        if tuple(rates[p].shape[1:]) != want:
            raise ValueError(
                f"`adapt_copy`: layer {p!r} has one rate per step of shape "
                f"{tuple(rates[p].shape[1:])}, but its layout needs {want} "
                "(check `layer_axis`/`per_unit`)."
            )


def scale_by_adapt_copy(
    history_or_table: RotationRecord | Mapping[str, Any],
    *,
    target: str = "step_angle",
    steps_per_epoch: int | None = None,
    past_end: str = "hold",
    max_angle: float = 0.5,
    non_layer_learning_rate: ScalarOrSchedule | None = None,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
    parallel_tol: float = DEFAULT_PARALLEL_TOL,
) -> optax.GradientTransformationExtraArgs:
    """Fused Layca whose per-layer rates replay a recording.

    The step-direction part of :func:`adapt_copy` (no ``base``); see there.
    """
    _check_args(past_end, target, max_angle, parallel_tol, non_layer_learning_rate)
    if non_layer_learning_rate is not None:
        non_layer_learning_rate = guard_rate(non_layer_learning_rate)
    angles = _step_table(history_or_table, target, steps_per_epoch)
    num_steps = next(iter(angles.values())).shape[0]
    if target == "step_angle":
        rates = {p: jnp.asarray(np.tan(v), jnp.float32) for p, v in angles.items()}
    else:
        rates = {p: jnp.asarray(v, jnp.float32) for p, v in angles.items()}
    layering = Layering(is_layer, layer_axis, per_unit)

    def init_fn(params):
        layers = {
            lo.path: (lo, x)
            for lo, x in zip(layering.layouts(params), jax.tree.leaves(params))
            if lo.is_layer
        }
        _check_recorded_layers(rates, layers, bool(jax.tree.leaves(params)))
        norms = initial_layer_norms(params, layering, "adapt_copy")
        return AdaptCopyState(
            count=jnp.zeros((), jnp.int32),
            initial_norm=norms,
            initial_layers=(
                {p: jnp.copy(x) for p, (lo, x) in layers.items()}
                if target == "cosine_distance"
                else {}
            ),
            zero_initial_norm=zero_norm_flags(params, norms, layering),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_params(updates, params)
        check_like_init(updates, state.initial_norm, layering, "adapt_copy")
        row = jnp.minimum(state.count, num_steps - 1)

        def one(lo, s, w, n0):
            if not lo.is_layer:
                s32 = upcast(s)
                if non_layer_learning_rate is None:  # frozen: 0, but NaN for a NaN gradient
                    return (0.0 * s32).astype(s.dtype)
                lr = value_at(non_layer_learning_rate, state.count).astype(s32.dtype)
                return (-lr * s32).astype(s.dtype)
            value = rates[lo.path][row]
            value = jnp.expand_dims(value, lo.reduce_axes) if lo.reduce_axes else value
            if target == "step_angle":
                rho = value
            else:
                rho = _rate_to_reach(lo, s, w, state.initial_layers[lo.path], value, max_angle)
            if past_end == "stop":
                rho = jnp.where(state.count < num_steps, rho, 0.0)
            return layca_layer_update(lo, s, w, n0, rho, parallel_tol)

        updates = layering.map(one, updates, params, state.initial_norm)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adapt_copy(
    history_or_table: RotationRecord | Mapping[str, Any],
    base: optax.GradientTransformation | None = None,
    *,
    target: str = "step_angle",
    steps_per_epoch: int | None = None,
    past_end: str = "hold",
    max_angle: float = 0.5,
    non_layer_learning_rate: ScalarOrSchedule | None = None,
    is_layer: IsLayer = None,
    layer_axis: LayerAxis = None,
    per_unit: bool = False,
    parallel_tol: float = DEFAULT_PARALLEL_TOL,
    check_base: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaptCopy: Layca replaying another run's per-layer rotation (Carbonnelle & De Vleeschouwer, 2019, extended version, §5.4).

    Record a run (e.g. Adam) with :func:`~optax_layca.rotation.track_rotation` and a
    :class:`~optax_layca.rotation.RotationHistory`; then train with Layca in the direction of
    ``base`` (e.g. SGD_AMom: ``optax.ema(0.9, debias=False)``) at per-layer rates

    .. math::
      \rho_l(t) = \tan \theta_l(t)

    where ``θ_l(t)`` is the recorded angle of layer ``l`` at update ``t``: Layca rotates each
    layer by exactly ``arctan ρ_l(t) = θ_l(t)`` per step, so the per-step rotation of the
    recording is reproduced (its direction is ``base``'s). The layer norms stay at their
    initial values (Layca op 4).

    The table of angles comes from ``history.step_angles()`` (exact per step if recorded every
    step; the mean angle per step between sparser records otherwise), or is given directly as
    ``{layer path: angles}`` with one row per step, or per epoch with ``steps_per_epoch``.
    Past the end of the table, ``past_end="hold"`` keeps the last rate and ``"stop"`` stops
    rotating (rate 0); raising is impossible inside a jitted step, so the choice is explicit.

    **Copying the curve** (``target="cosine_distance"``). Equal per-step angles do not give
    equal layer rotation curves: the angle to ``w⁰`` after many steps also depends on how
    consistent the step directions are, which differs between Adam and SGD_AMom (on an MLP,
    cosine distances differ by up to ~30 % with exact per-step angles). With
    ``target="cosine_distance"`` the recorded curve ``1 - cos(w_t, w⁰)`` (interpolated in angle
    between records) is the target instead: at each step the rate is solved in closed form so
    that the layer lands at the recorded angle from ``w⁰`` after the step (a deadbeat
    controller on the sphere; it needs a copy of ``w⁰`` in the state and six reductions per
    layer), with ``θ`` clipped to ``[0, max_angle]``.

    Args:
      history_or_table: a :class:`RotationHistory`, or ``{layer path: array (T, ...)}`` of
        per-step angles in radians (``[0, π/2)``) for ``target="step_angle"``, or of cosine
        distances to init after each step for ``target="cosine_distance"``.
      base: step direction in optax's gradient convention (None: SGD). Use
        ``optax.ema(0.9, debias=False)`` for SGD_AMom, the paper's choice when copying Adam.
      target: ``"step_angle"`` (``ρ = tan θ``, the paper's rule) or ``"cosine_distance"``.
      steps_per_epoch: rows of a given table are epochs: each row's angle is used for this many
        steps (``"step_angle"``), or is the cosine distance at the end of each epoch.
      past_end: ``"hold"`` or ``"stop"``.
      max_angle: largest rotation per step in ``target="cosine_distance"`` mode (radians).
      non_layer_learning_rate: learning rate for biases and other non-layer leaves
        (``-lr · base``); None freezes them.
      is_layer, layer_axis, per_unit, parallel_tol, check_base: as in
        :func:`~optax_layca.layca` (must match the monitor that recorded the history).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (needs ``params``).

    Examples:
      >>> import jax.numpy as jnp, numpy as np, optax
      >>> from optax_layca.rotation import angle
      >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, 0.0], [0.0, 1.0]])}}
      >>> tx = adapt_copy({"Dense_0/kernel": [0.1, 0.02]})
      >>> state = tx.init(params)
      >>> g = {"Dense_0": {"kernel": jnp.array([[0.0, 1.0], [2.0, 0.0]])}}
      >>> seen = []
      >>> for _ in range(3):
      ...     u, state = tx.update(g, state, params)
      ...     new = optax.apply_updates(params, u)
      ...     seen.append(angle(params["Dense_0"]["kernel"], new["Dense_0"]["kernel"]))
      ...     params = new
      >>> np.asarray(seen, float).round(4).tolist()  # the table, then its last rate held
      [0.1, 0.02, 0.02]

    References:
      Carbonnelle & De Vleeschouwer, `Layer rotation: a surprisingly simple indicator of
      generalization in deep networks?`, 2019, §5.4 and App. B.4.
    """
    tx = optax.chain(
        base_direction(base, check_base),
        scale_by_adapt_copy(
            history_or_table,
            target=target,
            steps_per_epoch=steps_per_epoch,
            past_end=past_end,
            max_angle=max_angle,
            non_layer_learning_rate=non_layer_learning_rate,
            is_layer=is_layer,
            layer_axis=layer_axis,
            per_unit=per_unit,
            parallel_tol=parallel_tol,
        ),
    )
    return guard_chain(tx, "adapt_copy", Layering(is_layer, layer_axis, per_unit), 1)
