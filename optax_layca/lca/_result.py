"""The result of one Loss Change Allocation step, and a stack of them over a run."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LCAResult:
    """Loss Change Allocation of one training step ``θ_t → θ_{t+1}`` (seed 004, Eq. 2–3).

    A pytree: every field but ``layer_names``/``method`` is a child, so ``jax.tree.map`` and
    ``jax.device_get`` work on it. Host numbers are float64 numpy scalars/arrays.

    Attributes:
      per_param: LCA of every parameter, a pytree shaped like params (float32, on device);
        None unless the ``"grad"`` engine ran. Negative = helping, positive = hurting.
      per_layer: ``{path: LCA summed over that leaf}`` for *every* parameter leaf (biases
        included), so ``sum(per_layer.values()) == total``.
      per_class: ``[C, K]`` array, LCA of class ``c``'s share of the loss
        (``L_c = (1/N) Σ_{i: y_i = c} ℓ_i``, so ``Σ_c L_c = L``) allocated to leaf ``k``
        (columns in ``layer_names`` order); None without labels.
      class_loss_change: ``[C]`` measured ``L_c(θ_{t+1}) − L_c(θ_t)``; None without labels.
      total: ``Σ_i LCA_i`` (float64).
      loss_change: measured ``L(θ_{t+1}) − L(θ_t)`` (float64).
      loss_before: ``L(θ_t)``.
      loss_after: ``L(θ_{t+1})``.
      error: ``total − loss_change``.
      num_splits: number of Simpson panels the step was cut into (1 = RK4 with the midpoint;
        2, 4, … after halving; 1 for first order).
      converged: ``|error| < tol``.
      grad_before: full-dataset ``∇L(θ_t)`` (pytree) when the ``"grad"`` engine ran, else None.
      layer_names: leaf paths, the order of ``per_class`` columns (static).
      method: ``"rk4"`` or ``"first_order"`` (static).
    """

    per_param: Any
    per_layer: dict[str, Any]
    per_class: Any
    class_loss_change: Any
    total: Any
    loss_change: Any
    loss_before: Any
    loss_after: Any
    error: Any
    num_splits: Any
    converged: Any
    grad_before: Any = None
    layer_names: tuple[str, ...] = dataclasses.field(default=(), metadata={"static": True})
    method: str = dataclasses.field(default="rk4", metadata={"static": True})


@dataclasses.dataclass(frozen=True)
class LCAHistory:
    """Per-iteration LCA of a run, stacked along a leading time axis ``T`` (numpy, host).

    Built by :func:`stack_results` from ``LCAResult``s or loaded by
    :func:`~optax_layca.lca.load_trajectory`; the input of every analysis.

    Attributes:
      layer_names: the ``K`` leaf paths.
      per_layer: ``[T, K]`` LCA per leaf.
      total, loss_change, loss_before, loss_after, error: ``[T]`` float64.
      num_splits: ``[T]`` int; converged: ``[T]`` bool.
      per_class: ``[T, C, K]`` or None; class_loss_change: ``[T, C]`` or None.
      per_param: ``{path: [T, *leaf_shape]}`` or None.
      grad_before: ``{path: [T, *leaf_shape]}`` full-dataset gradient at the start of each
        step (recorded with ``store_grads=True``), or None.
      iterations: ``[T]`` int, the training iteration of each row.
      method: integration method.
    """

    layer_names: tuple[str, ...]
    per_layer: np.ndarray
    total: np.ndarray
    loss_change: np.ndarray
    loss_before: np.ndarray
    loss_after: np.ndarray
    error: np.ndarray
    num_splits: np.ndarray
    converged: np.ndarray
    per_class: np.ndarray | None = None
    class_loss_change: np.ndarray | None = None
    per_param: dict[str, np.ndarray] | None = None
    grad_before: dict[str, np.ndarray] | None = None
    iterations: np.ndarray | None = None
    method: str = "rk4"

    def __len__(self) -> int:
        return int(self.total.shape[0])

    @property
    def num_unconverged(self) -> int:
        return int(np.sum(~self.converged))

    def summary(self) -> dict[str, Any]:
        """Error budget of the run: unconverged iterations and cumulative error in % (seed 004 §2).

        Examples:
          >>> import numpy as np
          >>> h = LCAHistory(("w",), np.array([[-1.0], [-0.5]]), np.array([-1.0, -0.5]),
          ...     np.array([-1.001, -0.5]), np.zeros(2), np.zeros(2), np.array([0.001, 0.0]),
          ...     np.ones(2, int), np.array([True, True]))
          >>> round(h.summary()["cumulative_error_pct"], 4)
          -0.0666
        """
        cum_err = float(np.sum(self.error))
        cum_change = float(np.sum(self.loss_change))
        return {
            "iterations": len(self),
            "num_unconverged": self.num_unconverged,
            "unconverged_iterations": (self._iters()[~self.converged].astype(int).tolist()),
            "cumulative_error": cum_err,
            "cumulative_loss_change": cum_change,
            "cumulative_error_pct": 100.0 * cum_err / cum_change if cum_change else float("nan"),
            "mean_abs_error": float(np.mean(np.abs(self.error))) if len(self) else float("nan"),
        }

    def _iters(self) -> np.ndarray:
        return self.iterations if self.iterations is not None else np.arange(len(self))


def _flat_per_param(per_param: Any) -> dict[str, np.ndarray]:
    from .._layers import path_str

    return {
        path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(per_param)[0]
    }


def stack_results(
    results: Sequence[LCAResult], iterations: Sequence[int] | None = None
) -> LCAHistory:
    """Stacks per-iteration ``LCAResult``s into an :class:`LCAHistory`.

    Args:
      results: a non-empty sequence of results of the same model.
      iterations: training iteration of each result (default ``0 … T-1``).

    Returns:
      An ``LCAHistory`` (numpy arrays on host).
    """
    results = list(results)
    if not results:
        raise ValueError("`stack_results(results=...)` needs at least one LCAResult.")
    names = results[0].layer_names
    for r in results:
        if r.layer_names != names:
            raise ValueError("`stack_results`: results come from models with different leaves.")

    def arr(field, dtype=np.float64):
        return np.asarray([np.asarray(getattr(r, field)) for r in results], dtype=dtype)

    per_class = None
    if results[0].per_class is not None:
        per_class = arr("per_class")
        class_change = arr("class_loss_change")
    else:
        class_change = None
    per_param = None
    if results[0].per_param is not None:
        flats = [_flat_per_param(r.per_param) for r in results]
        per_param = {k: np.stack([f[k] for f in flats]) for k in flats[0]}
    its = np.arange(len(results)) if iterations is None else np.asarray(iterations, int)
    return LCAHistory(
        layer_names=names,
        per_layer=np.asarray([[r.per_layer[n] for n in names] for r in results], np.float64),
        total=arr("total"),
        loss_change=arr("loss_change"),
        loss_before=arr("loss_before"),
        loss_after=arr("loss_after"),
        error=arr("error"),
        num_splits=arr("num_splits", np.int64),
        converged=arr("converged", bool),
        per_class=per_class,
        class_loss_change=class_change,
        per_param=per_param,
        iterations=its,
        method=results[0].method,
    )
