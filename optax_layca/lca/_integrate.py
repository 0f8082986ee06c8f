"""Integration of the path integral of seed 004 (Eq. 1–3): first order, RK4/Simpson, composite
Simpson with halving that reuses every evaluated point, and :func:`allocate`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._layers import check_same_structure, path_str
from ._engines import Quantities, choose_class_strategy
from ._evaluate import Evaluator, make_evaluator
from ._result import LCAResult

METHODS = ("rk4", "first_order")
ENGINES = ("grad", "jvp")
CLASS_STRATEGIES = ("auto", "jvp", "reverse")


def simpson_weights(num_panels: int) -> np.ndarray:
    """Composite Simpson weights ``[1, 4, 2, 4, …, 4, 1] / (3n)`` on ``n = 2·num_panels + 1``
    equally spaced points of ``[0, 1]`` (``num_panels = 1`` is RK4's ``[1, 4, 1] / 6``).

    Examples:
      >>> np.asarray(simpson_weights(1), float).round(4).tolist()
      [0.1667, 0.6667, 0.1667]
      >>> (simpson_weights(2) * 12).round(4).tolist()
      [1.0, 4.0, 2.0, 4.0, 1.0]
    """
    if num_panels < 1:
        raise ValueError(f"`num_panels` must be >= 1; got {num_panels}.")
    n = 2 * num_panels
    w = np.full(n + 1, 2.0)
    w[1::2] = 4.0
    w[0] = w[-1] = 1.0
    return w / (3.0 * n)


@dataclasses.dataclass(frozen=True)
class Options:
    """Validated settings of one allocation (see :func:`allocate`)."""

    method: str
    tol: float
    max_splits: int
    engines: tuple[str, ...]
    class_strategy: str | None
    q: Quantities


def resolve_options(
    method: str,
    tol: float,
    max_splits: int,
    engines: str | Sequence[str],
    class_strategy: str,
    num_leaves: int,
    num_classes: int,
) -> Options:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
    if (
        isinstance(tol, bool)
        or not isinstance(tol, (int, float))
        or not tol > 0
        or not math.isfinite(tol)
    ):
        raise ValueError(f"`tol` must be a finite number > 0; got {tol!r}.")
    if isinstance(max_splits, bool) or not isinstance(max_splits, int) or max_splits < 1:
        raise ValueError(f"`max_splits` must be an int >= 1; got {max_splits!r}.")
    engines = (engines,) if isinstance(engines, str) else tuple(engines)
    if not engines or any(e not in ENGINES for e in engines):
        raise ValueError(f"`engines` must be a non-empty subset of {ENGINES}; got {engines!r}.")
    if class_strategy not in CLASS_STRATEGIES:
        raise ValueError(
            f"`class_strategy` must be one of {CLASS_STRATEGIES}; got {class_strategy!r}."
        )
    grad = "grad" in engines
    strategy = None
    if num_classes:
        strategy = class_strategy
        if strategy == "auto":
            strategy = choose_class_strategy(num_leaves, num_classes)
    q = Quantities(
        grad=grad,
        class_grads=strategy == "reverse",
        jvp_layers=("jvp" in engines and not grad) or strategy == "jvp",
        jvp_classes=strategy == "jvp",
    )
    return Options(method, float(tol), max_splits, engines, strategy, q)


@jax.jit
def _sub(a, b):
    return jax.tree.map(jnp.subtract, a, b)


@jax.jit
def _leaf_dots(grad, delta):
    return jnp.stack(
        [
            jnp.vdot(g, d.astype(jnp.float32))
            for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(delta))
        ]
    )


@jax.jit
def _class_leaf_dots(class_grads, delta):
    cols = [
        jnp.einsum("c...,...->c", g, d.astype(jnp.float32))
        for g, d in zip(jax.tree.leaves(class_grads), jax.tree.leaves(delta))
    ]
    return jnp.stack(cols, axis=1)


@jax.jit
def _mul(a, b):
    return jax.tree.map(lambda x, d: x * d.astype(x.dtype), a, b)


def _f64(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float64)


def _integrand(small: dict, big: dict, delta: Any, opts: Options) -> dict:
    """Point value of the integrand ``∇L(θ(s)) · Δθ`` in the forms the result needs.

    Host (float64): ``layers`` [K] and ``classes`` [C, K]; device: ``grad`` pytree.
    """
    out = {}
    if "grad" in big:
        out["grad"] = big["grad"]
        out["layers"] = _f64(_leaf_dots(big["grad"], delta))
    else:
        out["layers"] = np.asarray(small["jvp_layers"], np.float64)
    if opts.class_strategy == "jvp":
        out["classes"] = np.asarray(small["jvp_classes"], np.float64)
    elif opts.class_strategy == "reverse":
        out["classes"] = _f64(_class_leaf_dots(big["class_grads"], delta))
    return out


@jax.jit
def _weighted_sum(weights, trees):
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *trees)


def _combine(terms: Sequence[tuple[float, dict]]) -> dict:
    """``Σ w · f`` over dicts whose ``grad`` entry is a device pytree (one jitted call) and whose
    other entries are float64 host arrays (summed in numpy)."""
    weights = [w for w, _ in terms]
    out = {k: sum(w * f[k] for w, f in terms) for k in terms[0][1] if k != "grad"}
    if "grad" in terms[0][1]:
        out["grad"] = _weighted_sum(
            jnp.asarray(weights, jnp.float32), [f["grad"] for _, f in terms]
        )
    return out


class Stepper:
    """Allocates consecutive steps, reusing the end point of step ``t`` as the start of ``t+1``.

    With the ``grad`` engine (and per-class by ``reverse``) everything evaluated at a point is
    independent of the step direction, so RK4 costs two full-dataset passes per step (midpoint
    and end). Directional (``jvp``) quantities depend on ``Δθ`` and are recomputed at the start.
    """

    def __init__(self, evaluator: Evaluator, opts: Options):
        self.ev = evaluator
        self.opts = opts
        self._cache = None  # (params identity, small, big) of the last end point

    def reset(self):
        self._cache = None

    def step(self, p0: Any, p1: Any, *, keep_end: bool = True) -> LCAResult:
        ev, opts, q = self.ev, self.opts, self.opts.q
        delta = _sub(p1, p0)
        cache = self._cache
        if cache is not None and cache[0] is p0:
            small0, big0 = dict(cache[1]), dict(cache[2])
            if q.needs_delta:
                extra, _ = ev.run(p0, delta, 0.0, q.direction_only())
                small0.update({k: v for k, v in extra.items() if k.startswith("jvp")})
        else:
            small0, big0 = ev.run(p0, delta, 0.0, q)
        q_end = q
        if opts.method == "first_order" and not keep_end:
            q_end = Quantities()
        small1, big1 = ev.run(p1, delta, 0.0, q_end)
        self._cache = (
            (p1, {k: v for k, v in small1.items() if not k.startswith("jvp")}, big1)
            if keep_end
            else None
        )

        f0 = _integrand(small0, big0, delta, opts)
        measured = float(small1["loss"]) - float(small0["loss"])
        if opts.method == "first_order":
            integral, panels = f0, 1
        else:
            f1 = _integrand(small1, big1, delta, opts)
            ends = _combine([(1.0, f0), (1.0, f1)])
            odd = _integrand(*ev.run(p0, delta, 0.5, q), delta, opts)
            even = None
            panels = 1
            while True:
                h = 1.0 / (2 * panels)
                terms = [(h / 3, ends), (4 * h / 3, odd)]
                if even is not None:
                    terms.append((2 * h / 3, even))
                integral = _combine(terms)
                err = float(np.sum(integral["layers"])) - measured
                if abs(err) < opts.tol or 2 * panels > opts.max_splits:
                    break
                even = odd if even is None else _combine([(1.0, even), (1.0, odd)])
                panels *= 2
                h = 1.0 / (2 * panels)
                new = [
                    _integrand(*ev.run(p0, delta, (2 * j + 1) * h, q), delta, opts)
                    for j in range(panels)
                ]
                odd = _combine([(1.0, f) for f in new])
        total = float(np.sum(integral["layers"]))
        error = total - measured
        names = tuple(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(p0)[0])
        per_class = class_change = None
        if opts.class_strategy is not None:
            per_class = integral["classes"]
            class_change = np.asarray(small1["class_loss"]) - np.asarray(small0["class_loss"])
        return LCAResult(
            per_param=_mul(integral["grad"], delta) if "grad" in integral else None,
            per_layer={n: float(v) for n, v in zip(names, integral["layers"])},
            per_class=per_class,
            class_loss_change=class_change,
            total=total,
            loss_change=measured,
            loss_before=float(small0["loss"]),
            loss_after=float(small1["loss"]),
            error=error,
            num_splits=panels,
            converged=bool(abs(error) < opts.tol),
            grad_before=big0.get("grad"),
            layer_names=names,
            method=opts.method,
        )


def check_params(params_before: Any, params_after: Any) -> None:
    check_same_structure(params_after, params_before, "params_after", "params_before")
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(params_before)[0], jax.tree.leaves(params_after)
    ):
        if np.shape(a) != np.shape(b):
            raise ValueError(
                f"Leaf {path_str(path)!r} has shape {np.shape(a)} in `params_before` but "
                f"{np.shape(b)} in `params_after`."
            )
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise TypeError(
                f"Leaf {path_str(path)!r} of params has dtype {jnp.result_type(a)}; LCA needs "
                "floating-point parameters (filter them out of the params you pass)."
            )
    if not jax.tree.leaves(params_before):
        raise ValueError("`params_before` has no leaves.")



def allocate(
    loss_fn: Callable[[Any, Any], jax.Array],
    params_before: Any,
    params_after: Any,
    data: Any,
    *,
    method: str = "rk4",
    tol: float = 1e-3,
    max_splits: int = 32,
    engines: str | Sequence[str] = ("grad",),
    labels: Any = None,
    class_fn: Callable[[Any], jax.Array] | None = None,
    num_classes: int | None = None,
    class_strategy: str = "auto",
    batch_size: int | None = None,
) -> LCAResult:
    r"""Loss Change Allocation of one step ``θ_t → θ_{t+1}`` over the whole dataset.

    With ``Δθ = θ_{t+1} − θ_t`` and ``θ(s) = θ_t + s Δθ``, ``L(θ_{t+1}) − L(θ_t) = ∫_0^1
    ∇L(θ(s))·Δθ ds``, split per parameter ``i``:

    .. math::
       \begin{align*}
       \text{first order:}\quad & A_i = ∇L(θ_t)_i Δθ_i \\
       \text{RK4/Simpson:}\quad & A_i = \tfrac16 \big(∇L(θ_t) + 4∇L(θ_{t+½}) + ∇L(θ_{t+1})\big)_i Δθ_i \\
       \text{composite:}\quad & A_i = \textstyle\sum_j w_j ∇L(θ(j/2n))_i Δθ_i,\quad
         w = [1, 4, 2, 4, …, 4, 1] / (6n)
       \end{align*}

    For ``method="rk4"`` the number of panels ``n`` doubles (reusing every point already
    evaluated) until ``|Σ_i A_i − (L(θ_{t+1}) − L(θ_t))| < tol`` or ``n`` would exceed
    ``max_splits``; an unconverged step is reported (``converged=False``), never hidden.

    Args:
      loss_fn: ``loss_fn(params, batch) -> [B]`` per-example losses; the library takes the exact
        mean. Run BatchNorm/dropout models in inference mode inside it.
      params_before: ``θ_t``.
      params_after: ``θ_{t+1}``, same tree structure and shapes.
      data: the training set: a pytree of arrays sharing a leading axis (``(x, y)``, a dict),
        a list/re-iterable of such batches, a callable returning a fresh iterator, or an
        :class:`Evaluator` (to reuse its compiled functions and device-resident data).
      method: ``"rk4"`` (default; composite Simpson with halving) or ``"first_order"``.
      tol: absolute tolerance on the per-step error (default 1e-3 as in the paper).
      max_splits: most Simpson panels per step (1 = plain RK4).
      engines: ``"grad"`` (per-parameter LCA, reverse mode), ``"jvp"`` (per-leaf LCA by
        forward mode, no per-parameter values) or both; per-leaf values come from ``grad``
        when it runs.
      labels: ``[N]`` integer classes enabling per-class LCA (or ``class_fn`` +
        ``num_classes``).
      class_fn: ``class_fn(batch) -> [B]`` classes, for batch iterables.
      num_classes: number of classes (default ``max(labels) + 1``).
      class_strategy: per-class × per-leaf by ``"jvp"`` (``K`` tangent passes), ``"reverse"``
        (``C`` backward passes) or ``"auto"`` (the cheaper; see ``choose_class_strategy``).
      batch_size: examples per scanned batch (see :class:`Evaluator`).

    Returns:
      An :class:`LCAResult`.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> x = np.linspace(-1, 1, 8, dtype=np.float32)[:, None]
      >>> loss = lambda p, b: (b @ p["w"] + p["b"] - 1.0) ** 2  # per-example, shape [B]
      >>> p0 = {"w": jnp.zeros(1), "b": jnp.zeros(())}
      >>> p1 = {"w": jnp.ones(1), "b": jnp.full((), 0.5)}
      >>> r = allocate(loss, p0, p1, x)
      >>> {k: round(v, 4) for k, v in r.per_layer.items()}, round(r.total, 4), round(r.loss_change, 4)
      ({'b': -0.75, 'w': 0.4286}, -0.3214, -0.3214)

    References:
      Lan, Liu, Zhou, Yosinski, `LCA: Loss Change Allocation for Neural Network Training
      <https://arxiv.org/abs/1909.01440>`_, NeurIPS 2019 (Eq. 2–3, §2).
    """
    check_params(params_before, params_after)
    num_leaves = len(jax.tree.leaves(params_before))
    ev = make_evaluator(loss_fn, data, batch_size, labels, class_fn, num_classes)
    opts = resolve_options(
        method, tol, max_splits, engines, class_strategy, num_leaves, ev.num_classes
    )
    return Stepper(ev, opts).step(params_before, params_after, keep_end=False)
