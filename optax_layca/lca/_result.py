"""The result of one Loss Change Allocation step, and a stack of them over a run.

Conventions (Lan et al., "LCA: Loss Change Allocation for Neural Network Training", NeurIPS
2019, and their code ``uber-research/loss-change-allocation``):

* sign: negative LCA *helps* (lowers the loss), positive *hurts* (paper §2; code
  ``helped < 0``);
* error: ``error = ΔL − Σ LCA``, the measured loss change minus the allocated total (code
  ``calc_approx_error``: ``next_loss − (cur_loss + Σ)``; with it Table S1's first-order errors
  are negative on a decreasing loss);
* ``num_splits``: sub-intervals of the step (RK4/Simpson = 2, then 4, 8, 16, 32; first order
  = 1), the authors' ``num_splits``;
* a *layer* is a module: its leaves (``Dense_0/kernel`` and ``Dense_0/bias``) summed
  (:func:`optax_layca._layers.module_path`); the leaf-level numbers stay available by name
  (``per_leaf``, ``per_class_leaf``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .._layers import module_path, path_str


def module_grouping(leaf_names: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """``(module_names, G)``: modules in order of first appearance and the ``[K, M]`` 0/1
    matrix summing leaf columns into module columns (``per_layer = per_leaf @ G``).

    Examples:
      >>> names, g = module_grouping(["Dense_0/bias", "Dense_0/kernel", "Dense_1/kernel"])
      >>> names, g.astype(int).tolist()
      (('Dense_0', 'Dense_1'), [[1, 0], [1, 0], [0, 1]])
    """
    modules: dict[str, int] = {}
    for name in leaf_names:
        modules.setdefault(module_path(name), len(modules))
    g = np.zeros((len(leaf_names), len(modules)))
    for k, name in enumerate(leaf_names):
        g[k, modules[module_path(name)]] = 1.0
    return tuple(modules), g


def relative_error(error: Any, change: Any, floor: Any) -> Any:
    """``error / |ΔL|``, or ``error / floor`` when ``|ΔL|`` is below the float32 noise floor
    (so it stays defined when the loss does not change); 0 when all three are 0.

    Examples:
      >>> float(relative_error(1e-4, -1e-2, 1e-7)), float(relative_error(1e-8, 0.0, 1e-7))
      (0.01, 0.1)
    """
    error, change, floor = (np.asarray(v, np.float64) for v in (error, change, floor))
    denom = np.maximum(np.abs(change), floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            denom > 0, error / np.where(denom > 0, denom, 1.0), np.where(error == 0, 0.0, np.inf)
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LCAResult:
    """Loss Change Allocation of one training step ``θ_t → θ_{t+1}`` (Lan et al. 2019, Eq. 2–3).

    A pytree: every field but ``leaf_names``/``method`` is a child, so ``jax.tree.map`` and
    ``jax.device_get`` work on it. Host numbers are float64 numpy scalars/arrays.

    Attributes:
      per_param: LCA of every parameter, a pytree shaped like params (float32, on device);
        None unless the ``"grad"`` engine ran. Negative = helping, positive = hurting.
      per_leaf: ``{leaf path: LCA summed over that leaf}`` for every leaf (biases included).
      per_class_leaf: ``[C, K]``, LCA of class ``c``'s share of the loss
        (``L_c = (1/N) Σ_{i: y_i = c} ℓ_i``, so ``Σ_c L_c = L``) allocated to leaf ``k``
        (columns in ``leaf_names`` order); None without classes.
      class_loss_change: ``[C]`` measured ``L_c(θ_{t+1}) − L_c(θ_t)``; None without classes.
      total: ``Σ_i LCA_i`` (float64).
      loss_change: measured ``ΔL = L(θ_{t+1}) − L(θ_t)`` (float64).
      loss_before, loss_after: ``L(θ_t)``, ``L(θ_{t+1})``.
      error: ``ΔL − Σ_i LCA_i`` (the authors' sign).
      noise_floor: float32 noise floor of ``error`` (see :func:`~optax_layca.lca.allocate`):
        an error below it is rounding, not integration error.
      num_splits: sub-intervals the step was cut into (2 = RK4, then 4, 8, …; 1 for first
        order).
      converged: ``|error| <= max(tol, noise_floor)``.
      grad_before: full-dataset ``∇L(θ_t)`` (pytree) when the ``"grad"`` engine ran, else None.
      test: the same allocation of the test-set loss along the same path (``test_data=``),
        or None.
      leaf_names: leaf paths, the order of ``per_class_leaf`` columns (static).
      method: ``"rk4"`` or ``"first_order"`` (static).

    Properties ``layer_names``, ``per_layer`` and ``per_class`` give the module ("layer")
    view; ``relative_error`` is ``error / max(|ΔL|, noise_floor)``.
    """

    per_param: Any
    per_leaf: dict[str, Any]
    per_class_leaf: Any
    class_loss_change: Any
    total: Any
    loss_change: Any
    loss_before: Any
    loss_after: Any
    error: Any
    noise_floor: Any
    num_splits: Any
    converged: Any
    grad_before: Any = None
    test: Any = None
    leaf_names: tuple[str, ...] = dataclasses.field(default=(), metadata={"static": True})
    method: str = dataclasses.field(default="rk4", metadata={"static": True})

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Module paths ("layers"), in order of first appearance among the leaves."""
        return module_grouping(self.leaf_names)[0]

    @property
    def per_layer(self) -> dict[str, float]:
        """``{module: LCA}``: each module's leaves summed; sums to ``total``."""
        names, g = module_grouping(self.leaf_names)
        vals = np.asarray([self.per_leaf[n] for n in self.leaf_names], np.float64) @ g
        return dict(zip(names, vals.tolist()))

    @property
    def per_class(self) -> np.ndarray | None:
        """``[C, M]`` per-class LCA of each module (columns in ``layer_names`` order)."""
        if self.per_class_leaf is None:
            return None
        return np.asarray(self.per_class_leaf, np.float64) @ module_grouping(self.leaf_names)[1]

    @property
    def relative_error(self) -> float:
        return float(relative_error(self.error, self.loss_change, self.noise_floor))


@dataclasses.dataclass(frozen=True)
class LCAHistory:
    """Per-iteration LCA of a run, stacked along a leading time axis ``T`` (numpy, host).

    Built by :func:`stack_results` from ``LCAResult``s or loaded by
    :func:`~optax_layca.lca.load_trajectory`; the input of every analysis.

    Attributes:
      leaf_names: the ``K`` leaf paths.
      per_leaf: ``[T, K]`` LCA per leaf.
      total, loss_change, loss_before, loss_after, error: ``[T]`` float64
        (``error = loss_change − total``).
      num_splits: ``[T]`` int sub-intervals; converged: ``[T]`` bool.
      noise_floor: ``[T]`` float32 noise floor of ``error``, or None.
      per_class_leaf: ``[T, C, K]`` or None; class_loss_change: ``[T, C]`` or None.
      per_param: ``{path: [T, *leaf_shape]}`` or None.
      grad_before: ``{path: [T, *leaf_shape]}`` full-dataset gradient at the start of each
        step (recorded with ``store_grads=True``), or None.
      iterations: ``[T]`` int, the training iteration of each row.
      method: integration method.
      test: the test-set history on the same path, or None.

    Properties ``layer_names`` (modules), ``per_layer`` (``[T, M]``) and ``per_class``
    (``[T, C, M]``) give the module ("layer") view; ``relative_error`` is ``[T]``.
    """

    leaf_names: tuple[str, ...]
    per_leaf: np.ndarray
    total: np.ndarray
    loss_change: np.ndarray
    loss_before: np.ndarray
    loss_after: np.ndarray
    error: np.ndarray
    num_splits: np.ndarray
    converged: np.ndarray
    noise_floor: np.ndarray | None = None
    per_class_leaf: np.ndarray | None = None
    class_loss_change: np.ndarray | None = None
    per_param: dict[str, np.ndarray] | None = None
    grad_before: dict[str, np.ndarray] | None = None
    iterations: np.ndarray | None = None
    method: str = "rk4"
    test: LCAHistory | None = None

    def __len__(self) -> int:
        return int(self.total.shape[0])

    @property
    def layer_names(self) -> tuple[str, ...]:
        return module_grouping(self.leaf_names)[0]

    @property
    def per_layer(self) -> np.ndarray:
        """``[T, M]`` LCA per module (its leaves summed)."""
        return np.asarray(self.per_leaf, np.float64) @ module_grouping(self.leaf_names)[1]

    @property
    def per_class(self) -> np.ndarray | None:
        """``[T, C, M]`` per-class LCA per module, or None."""
        if self.per_class_leaf is None:
            return None
        return np.asarray(self.per_class_leaf) @ module_grouping(self.leaf_names)[1]

    @property
    def relative_error(self) -> np.ndarray:
        """``[T]`` ``error / max(|ΔL|, noise_floor)`` (defined when the loss does not change)."""
        floor = self.noise_floor if self.noise_floor is not None else np.zeros_like(self.error)
        return relative_error(self.error, self.loss_change, floor)

    @property
    def num_unconverged(self) -> int:
        return int(np.sum(~self.converged))

    def summary(self) -> dict[str, Any]:
        """Error budget of the run (Lan et al. 2019, §2 and Table S1).

        ``cumulative_error_pct`` is ``100 · Σ error / Σ ΔL`` (the authors' Table S1 form), with
        ``Σ noise_floor`` in place of ``ΣΔL`` when the loss changed less than that, so it stays
        defined on a flat run.

        Examples:
          >>> import numpy as np
          >>> h = LCAHistory(("w",), np.array([[-1.0], [-0.5]]), np.array([-1.0, -0.5]),
          ...     np.array([-1.001, -0.5]), np.zeros(2), np.zeros(2), np.array([-0.001, 0.0]),
          ...     np.full(2, 2), np.array([True, True]))
          >>> round(h.summary()["cumulative_error_pct"], 4)
          0.0666
        """
        cum_err = float(np.sum(self.error))
        cum_change = float(np.sum(self.loss_change))
        floor = float(np.sum(self.noise_floor)) if self.noise_floor is not None else 0.0
        denom = cum_change if abs(cum_change) > floor else floor
        return {
            "iterations": len(self),
            "num_unconverged": self.num_unconverged,
            "unconverged_iterations": self._iters()[~self.converged].astype(int).tolist(),
            "cumulative_error": cum_err,
            "cumulative_loss_change": cum_change,
            "cumulative_noise_floor": floor,
            "cumulative_error_pct": 100.0 * cum_err / denom if denom else 0.0,
            "mean_abs_error": float(np.mean(np.abs(self.error))) if len(self) else float("nan"),
        }

    def _iters(self) -> np.ndarray:
        return self.iterations if self.iterations is not None else np.arange(len(self))


def flat_per_param(per_param: Any) -> dict[str, np.ndarray]:
    """``{leaf path: array}`` of a params-shaped pytree (on host)."""
    return {
        path_str(p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(per_param))[0]
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
    names = results[0].leaf_names
    if any(r.leaf_names != names for r in results):
        raise ValueError("`stack_results`: results come from models with different leaves.")

    def arr(field, dtype=np.float64):
        return np.asarray([np.asarray(getattr(r, field)) for r in results], dtype=dtype)

    has_classes = results[0].per_class_leaf is not None
    per_param = None
    if results[0].per_param is not None:
        flats = [flat_per_param(r.per_param) for r in results]
        per_param = {k: np.stack([f[k] for f in flats]) for k in flats[0]}
    test = None
    if results[0].test is not None:
        test = stack_results([r.test for r in results], iterations)
    return LCAHistory(
        leaf_names=names,
        per_leaf=np.asarray([[r.per_leaf[n] for n in names] for r in results], np.float64),
        total=arr("total"),
        loss_change=arr("loss_change"),
        loss_before=arr("loss_before"),
        loss_after=arr("loss_after"),
        error=arr("error"),
        num_splits=arr("num_splits", np.int64),
        converged=arr("converged", bool),
        noise_floor=arr("noise_floor"),
        per_class_leaf=arr("per_class_leaf") if has_classes else None,
        class_loss_change=arr("class_loss_change") if has_classes else None,
        per_param=per_param,
        iterations=np.arange(len(results)) if iterations is None else np.asarray(iterations, int),
        method=results[0].method,
        test=test,
    )
