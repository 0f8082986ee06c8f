"""What every wing of the package shares: the no-params message, concreteness, schedules.

Nothing here knows about layers; :mod:`optax_layca._layers` builds on it, the control
transforms on both, and the measurements (``rotation``, ``lca``) on all of them.
"""

from __future__ import annotations

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
