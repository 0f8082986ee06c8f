"""Layer-rotation figures (issue 4)."""

__all__: list[str] = []
