"""Analyses of a run's LCA (Lan et al., "LCA: Loss Change Allocation for Neural Network
Training", NeurIPS 2019, §3–5, Tables 1, S1, S2): plain functions over an
:class:`~optax_layca.lca.LCAHistory` (or a sequence of ``LCAResult``s, stacked on the fly).

Sign convention: negative LCA *helps* (lowers the loss), positive *hurts*. A *layer* is a
module (its leaves summed, :func:`optax_layca._layers.module_path`); leaf-level views are
available by name (``level="leaf"``, ``per_neuron(path)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from .._layers import module_path, path_str
from ._result import LCAHistory, LCAResult, stack_results

LEVELS = ("layer", "leaf")


def as_history(h: Any) -> LCAHistory:
    """``h`` as an :class:`LCAHistory` (an ``LCAResult`` or a sequence of them is stacked)."""
    if isinstance(h, LCAHistory):
        return h
    if isinstance(h, LCAResult):
        return stack_results([h])
    if isinstance(h, Sequence) and h and isinstance(h[0], LCAResult):
        return stack_results(h)
    raise TypeError(
        f"Expected an LCAHistory, an LCAResult or a sequence of LCAResults; got {type(h).__name__}."
    )


def require_per_param(h: LCAHistory, what: str) -> dict[str, np.ndarray]:
    """``h.per_param``, or a clear error naming ``what`` needs it."""
    if h.per_param is None:
        raise ValueError(
            f"`{what}` needs per-parameter LCA: run with the 'grad' engine (and "
            "`store_per_param=True` when recording to disk)."
        )
    return h.per_param



def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise ValueError(f"`level` must be one of {LEVELS}; got {level!r}.")


class HelpingFractions(NamedTuple):
    """Fractions of parameters helping / hurting / not affecting the loss.

    Attributes:
      helping, hurting, zero: ``[T]`` over all parameters.
      layer_names: the ``M`` modules (or ``K`` leaves with ``level="leaf"``).
      layer_helping, layer_hurting, layer_zero: ``[T, M]`` within each module (leaf).
      iterations: ``[T]`` the training iteration of each row.
    """

    helping: np.ndarray
    hurting: np.ndarray
    zero: np.ndarray
    layer_names: tuple[str, ...]
    layer_helping: np.ndarray
    layer_hurting: np.ndarray
    layer_zero: np.ndarray
    iterations: np.ndarray


def helping_fraction(
    history: Any, *, zero_tol: float = 0.0, level: str = "layer"
) -> HelpingFractions:
    """Fraction of parameters with LCA ``< −zero_tol`` (helping), ``> zero_tol`` (hurting) or in
    between (zero), per iteration and per module or leaf (Lan et al. 2019, §3, Fig. 3,
    Table 1; the authors' code counts ``helped < 0``, i.e. ``zero_tol = 0``).

    Examples:
      >>> import numpy as np
      >>> from optax_layca.lca import LCAHistory
      >>> pp = {"w": np.array([[-1.0, 2.0, 0.0, -3.0]])}
      >>> h = LCAHistory(("w",), np.array([[-2.0]]), *[np.zeros(1)] * 5, np.full(1, 2),
      ...                np.ones(1, bool), per_param=pp)
      >>> f = helping_fraction(h)
      >>> f.helping.tolist(), f.hurting.tolist(), f.zero.tolist()
      ([0.5], [0.25], [0.25])
    """
    h = as_history(history)
    pp = require_per_param(h, "helping_fraction")
    _check_level(level)
    if zero_tol < 0:
        raise ValueError(f"`zero_tol` must be >= 0; got {zero_tol}.")
    group = (lambda k: k) if level == "leaf" else module_path
    names = tuple(dict.fromkeys(group(k) for k in pp))
    cnt = {k: {n: 0 for n in names} for k in ("help", "hurt", "n")}
    for leaf, v in pp.items():
        x = v.reshape(v.shape[0], -1)
        cnt["help"][group(leaf)] = cnt["help"][group(leaf)] + (x < -zero_tol).sum(1)
        cnt["hurt"][group(leaf)] = cnt["hurt"][group(leaf)] + (x > zero_tol).sum(1)
        cnt["n"][group(leaf)] = cnt["n"][group(leaf)] + x.shape[1]
    t = len(h.total)
    arr = {
        k: np.stack([np.broadcast_to(np.asarray(c[n], np.float64), (t,)) for n in names], 1)
        for k, c in cnt.items()
    }
    arr["zero"] = arr["n"] - arr["help"] - arr["hurt"]
    n = arr["n"].sum(1)
    return HelpingFractions(
        helping=arr["help"].sum(1) / n,
        hurting=arr["hurt"].sum(1) / n,
        zero=arr["zero"].sum(1) / n,
        layer_names=names,
        layer_helping=arr["help"] / arr["n"],
        layer_hurting=arr["hurt"] / arr["n"],
        layer_zero=arr["zero"] / arr["n"],
        iterations=h._iters(),
    )


def fraction_of_iterations_helping(history: Any) -> dict[str, np.ndarray]:
    """For every parameter (by leaf), the fraction of iterations in which it helps (Lan et
    al. 2019, Fig. 3d; the authors' code: ``(helped < 0).sum(axis=0)``, here divided by T)."""
    pp = require_per_param(as_history(history), "fraction_of_iterations_helping")
    return {k: (v < 0).mean(axis=0) for k, v in pp.items()}


def cumulative_per_layer(history: Any, *, level: str = "layer") -> dict[str, np.ndarray]:
    """``{module: [T] cumulative LCA}`` — each layer's own "loss curve"; the last value is the
    layer's total contribution (Lan et al. 2019, §4: positive = the layer hurt overall).
    ``level="leaf"`` gives the same per leaf.

    Examples:
      >>> import numpy as np
      >>> from optax_layca.lca import LCAHistory
      >>> h = LCAHistory(("a/kernel", "a/bias", "b/kernel"),
      ...                np.array([[-1.0, 0.25, 0.5], [-2.0, 0.0, 0.25]]), *[np.zeros(2)] * 5,
      ...                np.full(2, 2), np.ones(2, bool))
      >>> {k: v.tolist() for k, v in cumulative_per_layer(h).items()}
      {'a': [-0.75, -2.75], 'b': [0.5, 0.75]}
    """
    h = as_history(history)
    _check_level(level)
    names, vals = (h.leaf_names, h.per_leaf) if level == "leaf" else (h.layer_names, h.per_layer)
    cum = np.cumsum(vals, axis=0)
    return {n: cum[:, k] for k, n in enumerate(names)}


def per_neuron(history: Any, path: str, *, axis: int = -1) -> np.ndarray:
    """``[T, units]`` LCA per unit of a leaf or a module.

    For a leaf ``path``: summed over all axes but ``axis`` (default the output units of a Flax
    kernel; ``axis=0`` groups a Dense kernel by input). For a module ``path``: its kernel summed
    over all but the last axis plus its 1-d leaves (bias) per unit — the authors'
    ``get_neurons_plus_biases``.
    """
    pp = require_per_param(as_history(history), "per_neuron")
    if path not in pp:
        leaves = [k for k in pp if module_path(k) == path and k != path]
        if not leaves:
            raise ValueError(f"`path={path!r}` is neither a leaf nor a module; leaves: {list(pp)}.")
        return sum(per_neuron(history, k) if pp[k].ndim > 2 else pp[k] for k in leaves)
    x = pp[path]
    if x.ndim < 2:
        raise ValueError(f"Leaf {path!r} is a scalar: it has no units.")
    ax = axis % (x.ndim - 1) + 1
    other = tuple(a for a in range(1, x.ndim) if a != ax)
    return x.sum(axis=other) if other else x


def _sign_changes(x: np.ndarray) -> np.ndarray:
    """Sign changes along axis 0, ignoring zeros (a sign carries over a zero)."""
    s = np.sign(x)
    last = s[0].copy()
    count = np.zeros(s.shape[1:], np.int64)
    for t in range(1, s.shape[0]):
        cur = s[t]
        flip = (cur != 0) & (last != 0) & (cur != last)
        count += flip
        last = np.where(cur != 0, cur, last)
    return count


class Oscillations(NamedTuple):
    """Sign changes per parameter of its motion and of its full-dataset gradient (Table S2).

    Attributes:
      motion_changes, grad_changes: pytrees of per-parameter counts.
      iterations_per_motion_change, iterations_per_grad_change: ``T · P / total changes``.
    """

    motion_changes: Any
    grad_changes: Any
    iterations_per_motion_change: float
    iterations_per_grad_change: float


def motion_from_trajectory(trajectory: Sequence[Any]) -> dict[str, np.ndarray]:
    """``{path: [T, *leaf_shape]}`` parameter motion ``θ_{t+1} − θ_t`` of ``T + 1`` snapshots."""
    if len(trajectory) < 2:
        raise ValueError("`trajectory` needs at least 2 param snapshots.")
    flat = [
        {path_str(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(p)[0]}
        for p in trajectory
    ]
    return {k: np.diff(np.stack([f[k] for f in flat]), axis=0) for k in flat[0]}


def oscillations(motion: Any, grad: Any) -> Oscillations:
    """How often each parameter's motion ``Δθ_t`` and gradient ``∇L(θ_t)`` change sign.

    Lan et al. (2019, §3, Table S2) report "number of iterations per weight movement direction
    change" and "number of iterations every time gradient crosses zero". Their code for it is
    not public, so the pooling is ours: ``T · P / Σ_p changes_p`` (iterations per change over
    all parameters pooled); a zero motion or gradient carries the previous sign (a frozen or
    dead parameter does not oscillate). Averaging ``T / changes_p`` per parameter instead
    weights rarely-changing parameters more and can differ by a factor ~2.

    Args:
      motion: pytree of ``[T, ...]`` arrays (``θ_{t+1} − θ_t`` stacked over iterations), e.g.
        :func:`motion_from_trajectory`.
      grad: pytree of ``[T, ...]`` arrays, e.g. ``LCAHistory.grad_before`` (recorded with
        ``store_grads=True``).

    Examples:
      >>> import numpy as np
      >>> o = oscillations(np.array([1.0, -1.0, 0.0, 1.0]), np.array([1.0, 1.0, -1.0, -1.0]))
      >>> int(o.motion_changes), int(o.grad_changes), o.iterations_per_motion_change
      (2, 1, 2.0)
    """
    mc = jax.tree.map(lambda x: _sign_changes(np.asarray(x)), motion)
    gc = jax.tree.map(lambda x: _sign_changes(np.asarray(x)), grad)

    def per(counts, tree):
        leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
        if not leaves:
            raise ValueError("`motion`/`grad` hold no arrays.")
        n = sum(x.size for x in leaves)
        c = sum(int(np.sum(x)) for x in jax.tree.leaves(counts))
        return n / c if c else math.inf

    return Oscillations(mc, gc, per(mc, motion), per(gc, grad))


class Moments(NamedTuple):
    """Moments of learning (Lan et al. 2019, §5, Fig. 6, S17).

    Attributes:
      moments: ``[T, M]`` bool (``[C, T, M]`` per class): the top-k local minima per curve.
      synchronized: same shape: moments shared with at least one other layer at that iteration.
      num_synchronized: number of synchronized moments (summed over classes).
      baseline: ``[num_shuffles]`` the same count when every layer is shifted by a random
        ±1 or ±2 iterations.
      p_value: ``(1 + #{baseline >= observed}) / (1 + num_shuffles)``.
    """

    moments: np.ndarray
    synchronized: np.ndarray
    num_synchronized: int
    baseline: np.ndarray
    p_value: float


def local_minima(curves: np.ndarray, k: int | None = 20) -> np.ndarray:
    """``[T, K]`` bool: the ``k`` most negative strict interior local minima of each column.

    Examples:
      >>> c = np.array([0.0, -1.0, 0.0, -3.0, -2.0, -2.5, 0.0])
      >>> np.flatnonzero(local_minima(c[:, None], k=2)[:, 0]).tolist()
      [3, 5]
    """
    c = np.asarray(curves, np.float64)
    if c.ndim != 2:
        raise ValueError(f"`curves` must be [T, K]; got shape {c.shape}.")
    out = np.zeros(c.shape, bool)
    if c.shape[0] < 3:
        return out
    mid = c[1:-1]
    is_min = (mid < c[:-2]) & (mid < c[2:]) & (mid < 0)
    for j in range(c.shape[1]):
        idx = np.flatnonzero(is_min[:, j]) + 1
        if k is not None:
            idx = idx[np.argsort(c[idx, j], kind="stable")[:k]]
        out[idx, j] = True
    return out


def _synchronized(m: np.ndarray) -> np.ndarray:
    return m & (m.sum(axis=1, keepdims=True) >= 2)


def _shift(col: np.ndarray, s: int) -> np.ndarray:
    out = np.zeros_like(col)
    if s > 0:
        out[s:] = col[:-s]
    else:
        out[:s] = col[-s:]
    return out


def moments_of_learning(
    curves: Any,
    *,
    k: int | None = 20,
    num_shuffles: int = 200,
    seed: int = 0,
    level: str = "layer",
) -> Moments:
    """Moments of learning and their synchronization across layers, with the shift baseline.

    A moment is a negative local minimum of a layer's (or a class's per-layer) LCA curve — an
    iteration where that layer helped more than on the iterations before and after (Lan et al.
    2019, §5) — keeping the ``k`` largest in magnitude per curve (paper: 20). It is
    *synchronized* when another layer has a moment at the same iteration. The baseline shifts
    each layer's moments by a random ±1 or ±2 iterations (per class independently) and recounts
    (§5: "randomly shifted to one or two iterations earlier or later"). The authors' code for
    this is not public; a *layer* here is a module (kernel and bias together), so a bias never
    counts as a layer synchronised with its own kernel.

    Args:
      curves: an ``LCAHistory`` (uses ``per_class`` when present, else ``per_layer``; with
        ``level="leaf"`` their per-leaf versions), or an array ``[T, M]`` (per layer) or
        ``[T, C, M]`` (per class per layer).
      k: moments kept per curve (None: all).
      num_shuffles: baseline draws.
      seed: random seed of the baseline.
      level: ``"layer"`` (modules) or ``"leaf"``, for an ``LCAHistory``.
    """
    if isinstance(curves, (LCAHistory, LCAResult)) or (
        isinstance(curves, Sequence) and curves and isinstance(curves[0], LCAResult)
    ):
        h = as_history(curves)
        _check_level(level)
        if level == "leaf":
            arr = h.per_class_leaf if h.per_class_leaf is not None else h.per_leaf
        else:
            arr = h.per_class if h.per_class is not None else h.per_layer
    else:
        arr = np.asarray(curves, np.float64)
    if arr.ndim == 2:
        arr3 = arr[:, None, :]
    elif arr.ndim == 3:
        arr3 = arr
    else:
        raise ValueError(f"`curves` must be [T, K] or [T, C, K]; got shape {arr.shape}.")
    if arr3.shape[2] == 0:
        raise ValueError("`curves` has no layer (its last axis is empty): nothing to compare.")
    per_class = [local_minima(arr3[:, c, :], k) for c in range(arr3.shape[1])]
    moments = np.stack(per_class)  # [C, T, K]
    sync = np.stack([_synchronized(m) for m in moments])
    observed = int(sync.sum())
    rng = np.random.default_rng(seed)
    base = np.zeros(num_shuffles, np.int64)
    for i in range(num_shuffles):
        count = 0
        for m in moments:
            shifts = rng.choice([-2, -1, 1, 2], size=m.shape[1])
            shifted = np.stack([_shift(m[:, j], int(s)) for j, s in enumerate(shifts)], axis=1)
            count += int(_synchronized(shifted).sum())
        base[i] = count
    p = (1 + int(np.sum(base >= observed))) / (1 + num_shuffles)
    if arr.ndim == 2:
        moments, sync = moments[0], sync[0]
    return Moments(moments, sync, observed, base, p)


class ErrorRow(NamedTuple):
    name: str
    total_error_rk4_pct: float
    total_error_fo_pct: float
    mean_iteration_error_rk4: float
    mean_iteration_error_fo: float


def error_table(runs: Mapping[str, Mapping[str, Any]]) -> tuple[list[ErrorRow], str]:
    """First-order vs RK4 error table in the format of Lan et al. (2019), Table S1.

    Args:
      runs: ``{name: {"rk4": history, "first_order": history}}`` of the same trajectory.

    Returns:
      ``(rows, markdown)``: total error ``Σ (ΔL − Σ LCA)`` as % of the total loss change
      (``LCAHistory.summary``; the authors' sign, so a first-order allocation that overshoots a
      decreasing loss is negative, as in Table S1), and the mean absolute per-iteration error,
      for both methods.

    Examples:
      >>> import numpy as np
      >>> from optax_layca.lca import LCAHistory
      >>> mk = lambda err: LCAHistory(("w",), np.zeros((2, 1)), np.zeros(2), np.array([-1.0, -1.0]),
      ...     np.zeros(2), np.zeros(2), np.array(err), np.full(2, 2), np.ones(2, bool))
      >>> rows, md = error_table({"toy": {"rk4": mk([1e-4, -1e-4]), "first_order": mk([0.5, 0.3])}})
      >>> round(rows[0].total_error_fo_pct, 4), round(rows[0].mean_iteration_error_fo, 4)
      (-40.0, 0.4)
    """
    rows = []
    for name, pair in runs.items():
        missing = {"rk4", "first_order"} - set(pair)
        if missing:
            raise ValueError(f"`runs[{name!r}]` lacks {sorted(missing)}.")
        r, f = as_history(pair["rk4"]), as_history(pair["first_order"])

        rows.append(
            ErrorRow(
                name,
                r.summary()["cumulative_error_pct"],
                f.summary()["cumulative_error_pct"],
                float(np.mean(np.abs(r.error))),
                float(np.mean(np.abs(f.error))),
            )
        )
    lines = [
        (
            "| | Total error, RK4 | Total error, FO | Average iteration error, RK4 | "
            "Average iteration error, FO |"
        ),
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.total_error_rk4_pct:.4g}% | "
            f"{row.total_error_fo_pct:.2f}% | {row.mean_iteration_error_rk4:.2E} | "
            f"{row.mean_iteration_error_fo:.5f} |"
        )
    return rows, "\n".join(lines)
