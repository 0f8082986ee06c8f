"""optax_layca: control and measure layer-level training speed with JAX and Optax.

Control (optax transforms): :func:`layca`, :func:`lars`, :func:`sgd_amom`, :func:`adapt_copy`
and the operations they chain. Measure: :mod:`optax_layca.rotation` (main names re-exported
here) and :mod:`optax_layca.lca`; :mod:`optax_layca.metrics` sends both to TensorBoard, W&B or
clu. Show: :mod:`optax_layca.plot`. Command line: :mod:`optax_layca.app`.

The names below are imported on first use (PEP 562): ``import optax_layca`` imports neither
jax nor matplotlib, so the command line answers ``--help`` at once. In IPython,
:mod:`optax_layca.plot` is imported with the package, so that the measurements display
themselves in notebooks.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0.dev0"

# public name -> (module relative to this package, attribute; "" for the module itself)
_LAZY = {
    "lca": (".lca", ""),
    "metrics": (".metrics", ""),
    "plot": (".plot", ""),
    "rotation": (".rotation", ""),
    "AdaptCopyState": ("._adapt_copy", "AdaptCopyState"),
    "adapt_copy": ("._adapt_copy", "adapt_copy"),
    "scale_by_adapt_copy": ("._adapt_copy", "scale_by_adapt_copy"),
    "DEFAULT_PARALLEL_TOL": ("._layca", "DEFAULT_PARALLEL_TOL"),
    "InitialNormState": ("._layca", "InitialNormState"),
    "ScaleByLaycaState": ("._layca", "ScaleByLaycaState"),
    "cap_norm_increase": ("._layca", "cap_norm_increase"),
    "project_orthogonal": ("._layca", "project_orthogonal"),
    "project_to_initial_norm": ("._layca", "project_to_initial_norm"),
    "scale_by_layca": ("._layca", "scale_by_layca"),
    "scale_to_weight_norm": ("._layca", "scale_to_weight_norm"),
    "default_is_layer": ("._layers", "default_is_layer"),
    "forward_order": ("._layers", "forward_order"),
    "layer_paths": ("._layers", "layer_paths"),
    "natural_order": ("._layers", "natural_order"),
    "natural_order_is_forward": ("._layers", "natural_order_is_forward"),
    "path_str": ("._layers", "path_str"),
    "ScaleByLayerMultipliersState": ("._multipliers", "ScaleByLayerMultipliersState"),
    "layer_multipliers": ("._multipliers", "layer_multipliers"),
    "scale_by_layer_multipliers": ("._multipliers", "scale_by_layer_multipliers"),
    "lars": ("._optimizers", "lars"),
    "layca": ("._optimizers", "layca"),
    "sgd_amom": ("._optimizers", "sgd_amom"),
    "RotationHistory": (".rotation", "RotationHistory"),
    "TrackRotationState": (".rotation", "TrackRotationState"),
    "layer_convergence_rate": (".rotation", "layer_convergence_rate"),
    "layer_rotation": (".rotation", "layer_rotation"),
    "track_rotation": (".rotation", "track_rotation"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'optax_layca' has no attribute {name!r}") from None
    value = importlib.import_module(module, __name__)
    if attr:
        value = getattr(value, attr)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if "IPython" in sys.modules:  # a notebook: register the measurements' displays now
    from . import plot as plot  # noqa: E402

if TYPE_CHECKING:  # static analysis and IDEs see the eager imports
    from . import lca as lca
    from . import metrics as metrics
    from . import plot as plot
    from . import rotation as rotation
    from ._adapt_copy import AdaptCopyState as AdaptCopyState
    from ._adapt_copy import adapt_copy as adapt_copy
    from ._adapt_copy import scale_by_adapt_copy as scale_by_adapt_copy
    from ._layca import DEFAULT_PARALLEL_TOL as DEFAULT_PARALLEL_TOL
    from ._layca import InitialNormState as InitialNormState
    from ._layca import ScaleByLaycaState as ScaleByLaycaState
    from ._layca import cap_norm_increase as cap_norm_increase
    from ._layca import project_orthogonal as project_orthogonal
    from ._layca import project_to_initial_norm as project_to_initial_norm
    from ._layca import scale_by_layca as scale_by_layca
    from ._layca import scale_to_weight_norm as scale_to_weight_norm
    from ._layers import default_is_layer as default_is_layer
    from ._layers import forward_order as forward_order
    from ._layers import layer_paths as layer_paths
    from ._layers import natural_order as natural_order
    from ._layers import natural_order_is_forward as natural_order_is_forward
    from ._layers import path_str as path_str
    from ._multipliers import ScaleByLayerMultipliersState as ScaleByLayerMultipliersState
    from ._multipliers import layer_multipliers as layer_multipliers
    from ._multipliers import scale_by_layer_multipliers as scale_by_layer_multipliers
    from ._optimizers import lars as lars
    from ._optimizers import layca as layca
    from ._optimizers import sgd_amom as sgd_amom
    from .rotation import RotationHistory as RotationHistory
    from .rotation import TrackRotationState as TrackRotationState
    from .rotation import layer_convergence_rate as layer_convergence_rate
    from .rotation import layer_rotation as layer_rotation
    from .rotation import track_rotation as track_rotation
