"""Figures of the papers (matplotlib, imported lazily inside each function).

Every function takes the measurement it needs (a live object or a loaded file), accepts
``ax=`` and returns a ``matplotlib.figure.Figure``; none calls ``plt.show()``.
"""

from ._experiments import *  # noqa: F403  (each module lists its figures in __all__)
from ._lca import *  # noqa: F403
from ._rotation import *  # noqa: F403
from ._training import *  # noqa: F403
