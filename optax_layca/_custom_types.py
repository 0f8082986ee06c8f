"""Type aliases shared across the package."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]
"""A number, or an optax schedule ``step -> value``."""

IsLayer = Callable[[str, Any], bool] | Sequence[str] | None
"""Which leaves are layers: ``callable(path, leaf) -> bool``, a list of paths, or None (default)."""

LayerAxis = int | Mapping[str, int] | Callable[[str, Any], int | None] | None
"""Axis along which a leaf stacks several layers (``nn.scan``), per leaf."""

LayerOrder = Sequence[str] | None
"""Layer paths in forward (input → output) order; None: natural sort of the paths."""
