"""What every wing of the package shares: the no-params message, concreteness, schedules.

Nothing here knows about layers; :mod:`optax_layca._layers` builds on it, the control
transforms on both, and the measurements (``rotation``, ``lca``) on all of them.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._custom_types import ScalarOrSchedule

NO_PARAMS_MSG = (
    "This transform reads the current parameters: call `update(updates, state, params)`."
)


def is_concrete(x: Any) -> bool:
    """True for Python numbers and arrays that are not being traced."""
    return not isinstance(x, jax.core.Tracer)


def value_at(x: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """Value of a scalar-or-schedule at step ``count``."""
    return jnp.asarray(x(count) if callable(x) else x)


def unwrap_variables(tree: Any) -> Any:
    """Replaces flax.nnx ``Variable`` leaves (anything with a ``.value`` array) by their value.

    Lets the measurement functions take ``nnx.state(model)`` or an ``nnx.Optimizer`` state as
    readily as plain arrays.
    """
    is_var = lambda x: hasattr(x, "value") and not isinstance(x, (np.ndarray, jax.Array))
    return jax.tree.map(lambda x: x.value if is_var(x) else x, tree, is_leaf=is_var)


# ----------------------------------------------------------------------------- argument checks


def _interval(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"be {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"be {'<' if high_open else '<='} {high:g}"
    return "be finite"


def _is_real_type(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):
        return True
    dtype = getattr(value, "dtype", None)
    return (
        isinstance(value, (np.ndarray, np.generic, jax.Array))
        and dtype is not None
        and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
    )


def check_number(
    value: Any,
    where: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises naming ``where`` unless ``value`` is a finite real scalar in the interval.

    A traced value (``jit``, ``inject_hyperparams``) passes: it cannot be read here, and the
    transform's documented run-time behaviour applies. ``where`` names the argument as in
    ``"layca(alpha=...)"``.
    """
    if not _is_real_type(value):
        raise TypeError(f"`{where}` must be a real number; got {value!r}.")
    if not is_concrete(value):
        return
    if np.ndim(value) != 0:
        raise ValueError(f"`{where}` must be a scalar; got shape {np.shape(value)}.")
    v = float(value)
    ok = np.isfinite(v)
    if low is not None:
        ok = ok and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"`{where}` must {_interval(low, high, low_open, high_open)}; got {v}.")


def check_scalar_or_schedule(value: Any, where: str, **interval: Any) -> None:
    """:func:`check_number` for a number, or for a schedule's value at step 0."""
    if value is None:
        raise TypeError(f"`{where}` must be a number or a schedule `step -> value`; got None.")
    if callable(value):
        at0 = value(jnp.zeros((), jnp.int32))
        check_number(at0, f"{where} (schedule at step 0)", **interval)
        return
    check_number(value, where, **interval)


def check_learning_rate(value: Any, where: str) -> None:
    """A learning rate: a number or schedule, finite and >= 0 (0 freezes; < 0 would ascend)."""
    check_scalar_or_schedule(value, where, low=0.0)


def nan_if_negative(x: jax.Array) -> jax.Array:
    """``x`` where it is >= 0, NaN elsewhere (NaN stays NaN): a visible failure under ``jit``."""
    return jnp.where(x >= 0, x, jnp.nan)


def guard_rate(rate: ScalarOrSchedule) -> ScalarOrSchedule:
    """A rate whose negative or NaN values come out as NaN when they cannot be checked early.

    A concrete number is checked at construction and returned as is; a traced number (from
    ``optax.inject_hyperparams``) and the values of a schedule go through
    :func:`nan_if_negative`, so a negative rate never silently ascends.
    """
    if callable(rate):
        return lambda count: nan_if_negative(jnp.asarray(rate(count)))
    if is_concrete(rate):
        return rate
    return nan_if_negative(jnp.asarray(rate))


def check_int(value: Any, where: str, *, low: int | None = None) -> int:
    """Returns ``value`` as an ``int`` (Python or numpy integer, not bool) >= ``low``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"`{where}` must be an int; got {value!r}.")
    if low is not None and int(value) < low:
        raise ValueError(f"`{where}` must be an int >= {low}; got {int(value)}.")
    return int(value)


def check_bool(value: Any, where: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{where}` must be a bool; got {value!r}.")


def check_choice(value: Any, choices: tuple[str, ...], where: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{where}` must be one of {choices}; got {value!r}.")
