"""Type aliases shared across the package."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]
"""A number, or an optax schedule ``step -> value``."""

IsLayer = Union[None, Callable[[str, Any], bool], Sequence[str]]
"""Which leaves are layers: ``callable(path, leaf) -> bool``, a list of paths, or None (default)."""

LayerAxis = Union[None, int, Mapping[str, int], Callable[[str, Any], Union[int, None]]]
"""Axis along which a leaf stacks several layers (``nn.scan``), per leaf."""

LayerOrder = Union[None, Sequence[str]]
"""Layer paths in forward (input → output) order; None: natural sort of the paths."""
