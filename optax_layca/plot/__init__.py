"""Figures of the papers (matplotlib, imported lazily inside each function).

Every function takes the measurement it needs (a live object or a loaded file), accepts
``ax=`` and returns a ``matplotlib.figure.Figure``; none calls ``plt.show()``.

Importing this module also registers the notebook displays of ``RotationHistory``,
``LCAResult`` and ``LCAHistory`` in a running IPython (see :func:`register_display`); it
imports neither matplotlib nor IPython.
"""

from ._display import lca_html as lca_html
from ._display import register_display as register_display
from ._display import rotation_history_html as rotation_history_html
from ._experiments import *  # noqa: F403  (each module lists its figures in __all__)
from ._experiments_lca import *  # noqa: F403  (each module lists its figures in __all__)
from ._lca import *  # noqa: F403
from ._rotation import *  # noqa: F403
from ._training import *  # noqa: F403

register_display()
