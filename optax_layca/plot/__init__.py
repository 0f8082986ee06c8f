"""Figures of the papers (matplotlib, imported lazily inside each function).

Every function takes the measurement it needs (a live object or a loaded file), accepts
``ax=`` and returns a ``matplotlib.figure.Figure``; none calls ``plt.show()``.
"""
