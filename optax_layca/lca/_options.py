"""One options object for every LCA entry point (:func:`allocate`, :class:`LCARecorder`,
:func:`allocate_trajectory`, :class:`Evaluator`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

METHODS = ("rk4", "first_order")
ENGINES = ("grad", "jvp")
CLASS_STRATEGIES = ("auto", "jvp", "reverse")
BN_MODES = ("auto", "batch", "inference")
EVALUATOR_FIELDS = ("batch_size", "bn_mode", "class_fn", "num_classes")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`LCAOptions({name}=...)` must be one of {choices}; got {value!r}.")


def _check_int(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`LCAOptions({name}=...)` must be an int >= {low}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class LCAOptions:
    r"""Settings of a Loss Change Allocation, shared by every entry point.

    Every function that takes ``options=`` also takes any of these fields as keyword
    arguments, which override the object's (``allocate(..., tol=1e-4)`` is
    ``allocate(..., options=LCAOptions(tol=1e-4))``).

    Attributes:
      method: ``"rk4"`` (Simpson's rule on the step, halved adaptively; Lan et al. 2019, §2)
        or ``"first_order"`` (Eq. 2–3: the gradient at the start of the step only).
      tol: absolute tolerance on the per-step error ``|ΔL − Σ LCA|`` (paper: 0.001).
      max_splits: most sub-intervals a step is cut into. RK4 is 2 sub-intervals (start,
        midpoint, end); halving doubles them (4, 8, …) while the error exceeds ``tol`` and
        the float32 noise floor. Default 32, the authors' cap.
      refine_on_test: with ``test_data``, halve while ``max(|err_train|, |err_test|)`` is
        too large (the authors' criterion); False: the training error only.
      engines: ``"grad"`` (per-parameter LCA by reverse mode), ``"jvp"`` (per-leaf LCA by
        forward mode, no per-parameter values) or both.
      class_strategy: per-class × per-leaf LCA by ``"jvp"`` (``K`` tangent passes),
        ``"reverse"`` (``C`` backward passes) or ``"auto"`` (the cheaper one).
      batch_size: examples per evaluated batch (default ``min(N, 1024)`` for arrays, the
        first batch's size for iterables). With ``bn_mode="batch"`` it is part of the loss's
        definition (the batch statistics are over that many examples).
      bn_mode: what ``loss_fn`` does with the examples of a batch. ``"batch"``: it couples
        them (BatchNorm normalising with the statistics of the batch, as the authors' code
        does), so no padded row may enter a batch: the last partial batch is evaluated
        unpadded as a batch of its own. ``"inference"``: per-example losses are independent
        (no BatchNorm, or BatchNorm with fixed running averages), so the last batch is
        padded and masked (one compiled shape); checked once, and a coupled loss raises.
        ``"auto"`` (default): the same check decides.
      class_fn: ``class_fn(batch) -> [B]`` integer classes (for batch iterables; in-memory
        data take ``labels=``).
      num_classes: number of classes (default ``max(labels) + 1``; required with
        ``class_fn``).

    Examples:
      >>> o = LCAOptions(tol=1e-4)
      >>> o.method, o.max_splits, o.engines, o.replace(engines="jvp").engines
      ('rk4', 32, ('grad',), ('jvp',))
    """

    method: str = "rk4"
    tol: float = 1e-3
    max_splits: int = 32
    refine_on_test: bool = True
    engines: tuple[str, ...] = ("grad",)
    class_strategy: str = "auto"
    batch_size: int | None = None
    bn_mode: str = "auto"
    class_fn: Callable[[Any], Any] | None = None
    num_classes: int | None = None

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        tol = self.tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol):
            raise ValueError(f"`LCAOptions(tol=...)` must be a finite number > 0; got {tol!r}.")
        if not tol > 0:
            raise ValueError(f"`LCAOptions(tol=...)` must be a finite number > 0; got {tol!r}.")
        object.__setattr__(self, "tol", float(tol))
        _check_int("max_splits", self.max_splits, 2 if self.method == "rk4" else 1)
        engines = (self.engines,) if isinstance(self.engines, str) else tuple(self.engines)
        if not engines or any(e not in ENGINES for e in engines):
            raise ValueError(
                f"`LCAOptions(engines=...)` must be a non-empty subset of {ENGINES}; "
                f"got {self.engines!r}."
            )
        object.__setattr__(self, "engines", tuple(sorted(set(engines))))
        _check_choice("class_strategy", self.class_strategy, CLASS_STRATEGIES)
        _check_choice("bn_mode", self.bn_mode, BN_MODES)
        _check_int("batch_size", self.batch_size, 1, allow_none=True)
        _check_int("num_classes", self.num_classes, 1, allow_none=True)
        if self.class_fn is not None and not callable(self.class_fn):
            raise TypeError(f"`LCAOptions(class_fn=...)` must be callable; got {self.class_fn!r}.")
        if not isinstance(self.refine_on_test, bool):
            raise TypeError(
                f"`LCAOptions(refine_on_test=...)` must be a bool; got {self.refine_on_test!r}."
            )

    def replace(self, **changes: Any) -> LCAOptions:
        """A copy with ``changes`` applied (unknown names raise ``TypeError``)."""
        check_names(changes, "LCAOptions.replace")
        return dataclasses.replace(self, **changes)

    def evaluator_fields(self) -> dict[str, Any]:
        """The fields an :class:`Evaluator` owns (they describe how the data are read)."""
        return {k: getattr(self, k) for k in EVALUATOR_FIELDS}


FIELDS = tuple(f.name for f in dataclasses.fields(LCAOptions))


def check_names(changes: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(changes) - set(FIELDS))
    if unknown:
        raise TypeError(
            f"`{where}` got unknown option(s) {unknown}; the options are {list(FIELDS)}."
        )


def resolve(options: LCAOptions | None, overrides: Mapping[str, Any], where: str) -> LCAOptions:
    """``options`` (default ``LCAOptions()``) with the keyword ``overrides`` applied."""
    if options is not None and not isinstance(options, LCAOptions):
        raise TypeError(f"`{where}(options=...)` must be an LCAOptions; got {options!r}.")
    check_names(overrides, where)
    return dataclasses.replace(options or LCAOptions(), **overrides)
