"""optax_layca: control and measure layer-level training speed with JAX and Optax.

Control (optax transforms): :func:`layca`, :func:`lars`, :func:`sgd_amom`, :func:`adapt_copy`
and the operations they chain. Measure: :mod:`optax_layca.rotation` (main names re-exported
here) and :mod:`optax_layca.lca`. Show: :mod:`optax_layca.plot`. Command line:
:mod:`optax_layca.app`.
"""

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

__version__ = "0.2.0.dev0"
