"""Loss Change Allocation figures (issue 5)."""

__all__: list[str] = []
