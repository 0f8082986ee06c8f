"""The path integral of Lan et al. (2019, Eq. 1–3): first order, RK4/Simpson, composite Simpson
with halving that reuses every evaluated point, the float32 noise floor, and :func:`allocate`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._layers import check_same_structure, path_str
from ._engines import Quantities, choose_class_strategy
from ._evaluate import Evaluator, Point, fetch, make_evaluator
from ._options import LCAOptions, resolve
from ._result import LCAResult

# Unit roundoffs. The noise floor of a step (see `allocate`) is built from them.
U32 = 2.0**-24
U64 = 2.0**-53


def simpson_weights(num_splits: int) -> np.ndarray:
    """Composite Simpson weights ``[1, 4, 2, 4, …, 4, 1] / (3 n)`` on the ``n + 1`` equally
    spaced points of ``[0, 1]`` cut into ``n = num_splits`` (even) sub-intervals; ``n = 2`` is
    RK4's ``[1, 4, 1] / 6`` (the authors' ``get_rk_coeffs(n) / sum``).

    Examples:
      >>> np.asarray(simpson_weights(2), float).round(4).tolist()
      [0.1667, 0.6667, 0.1667]
      >>> (simpson_weights(4) * 12).round(4).tolist()
      [1.0, 4.0, 2.0, 4.0, 1.0]
    """
    if num_splits < 2 or num_splits % 2:
        raise ValueError(f"`num_splits` must be an even number >= 2; got {num_splits}.")
    w = np.full(num_splits + 1, 2.0)
    w[1::2] = 4.0
    w[0] = w[-1] = 1.0
    return w / (3.0 * num_splits)


def plan(opts: LCAOptions, num_leaves: int, num_classes: int) -> tuple[Quantities, str | None]:
    """What each point evaluates, and the per-class strategy (None without classes)."""
    grad = "grad" in opts.engines
    strategy = None
    if num_classes:
        strategy = opts.class_strategy
        if strategy == "auto":
            strategy = choose_class_strategy(num_leaves, num_classes)
    q = Quantities(
        grad=grad,
        class_grads=strategy == "reverse",
        jvp_layers=("jvp" in opts.engines and not grad) or strategy == "jvp",
        jvp_classes=strategy == "jvp",
    )
    return q, strategy


@jax.jit
def _sub(a, b):
    return jax.tree.map(jnp.subtract, a, b)


@jax.jit
def _finalize(weights, trees, delta, grad0, inv_n):
    """``(Σ_j w_j tree_j) ⊙ Δθ`` (cast to each leaf's dtype) and the mean start gradient."""

    def leaf(d, *xs):
        acc = sum(w * x for w, x in zip(weights, xs))
        return (acc * d.astype(jnp.float32)).astype(d.dtype)

    return jax.tree.map(leaf, delta, *trees), jax.tree.map(lambda g: g * inv_n, grad0)


@jax.jit
def _weighted_sum(weights, trees):
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *trees)


@dataclasses.dataclass
class _Integrand:
    """``Σ_j w_j f(s_j)`` of the integrand ``∇(Σ_n ℓ_n)·Δθ`` (sums over examples).

    ``layers [K]``, ``classes [C, K]`` and ``abs`` (``Σ_i |∂_i Σ_n ℓ_n · Δθ_i|``) are host
    float64; ``grads`` is a list of ``(weight, device gradient sum)`` kept lazy so a whole
    step needs one device combination at the end.
    """

    layers: np.ndarray
    classes: np.ndarray | None
    abs: float
    grads: list

    def scaled(self, w: float) -> _Integrand:
        classes = None if self.classes is None else w * self.classes
        return _Integrand(
            w * self.layers, classes, w * self.abs, [(w * c, g) for c, g in self.grads]
        )

    def __add__(self, other: _Integrand) -> _Integrand:
        classes = None if self.classes is None else self.classes + other.classes
        grads = self.grads + other.grads
        if len(grads) > 4:  # bound the number of live gradient pytrees
            weights = np.asarray([c for c, _ in grads], np.float32)
            grads = [(1.0, _weighted_sum(weights, [g for _, g in grads]))]
        return _Integrand(self.layers + other.layers, classes, self.abs + other.abs, grads)


class _Track:
    """One dataset (training or test) followed along the step path."""

    def __init__(self, ev: Evaluator, opts: LCAOptions, num_leaves: int):
        self.ev = ev
        self.q, self.strategy = plan(opts, num_leaves, ev.num_classes)
        self.cache: tuple[Any, Point] | None = None

    def start(self, p0: Any, delta: Any) -> Point:
        """The point at ``θ_t`` (launched), reusing the last step's end point when ``p0`` is it:
        its direction-free sums are kept, only what depends on ``Δθ`` is recomputed."""
        if self.cache is None or self.cache[0] is not p0:
            return self.ev.launch(p0, delta, 0.0, self.q)
        pt = self.cache[1]
        post = jvp = None
        if self.q.grad or self.q.class_grads:
            post = self.ev.kernels.finish(pt.carry, self.ev.replicate(delta), q=self.q)
        if self.q.needs_delta:
            jvp = self.ev.launch(p0, delta, 0.0, self.q.direction_only())
        return pt.redirect(post, jvp)

    def integrand(self, pt: Point) -> _Integrand:
        if "dots" in pt.post:
            layers, absval = pt.post["dots"], float(pt.post["absdot"])
        else:  # jvp engine: per-leaf values only, so the leaf sums bound the rounding
            layers = pt.jvp["jvp_layers"]
            absval = float(np.sum(np.abs(layers)))
        classes = None
        if self.strategy == "jvp":
            classes = pt.jvp["jvp_classes"]
        elif self.strategy == "reverse":
            classes = pt.post["class_dots"]
        grads = [(1.0, pt.carry["grad"])] if self.q.grad else []
        return _Integrand(np.asarray(layers, np.float64), classes, absval, grads)


def noise_floor(pt0: Point, pt1: Point, integral: _Integrand) -> float:
    r"""Float32 noise floor of ``error = ΔL − Σ LCA`` of one step (mean over examples).

    .. math::
       \varepsilon = \big(u_{32} + N u_{64}\big)\,\frac{S_0 + S_1}{N}
         + u_{32}\,\frac{1}{N}\sum_j w_j \sum_i \big|\partial_i \textstyle\sum_n \ell_n(θ(s_j))\,Δθ_i\big|

    with ``S = Σ_n |ℓ_n|`` at each end. The first term bounds the measured change: every
    example's loss is a float32 value (rounding ``≤ u32 |ℓ_n|``) summed on the host in float64
    (recursive summation of ``N`` terms errs by ``≤ (N − 1) u64 Σ|ℓ_n|``, Higham 2002,
    Eq. 4.4). The second is the rounding of the allocated terms themselves. Forward/backward
    rounding inside ``loss_fn`` is not counted: it is part of the loss as computed.
    """
    n = pt0.n
    return float((U32 + n * U64) * (pt0.abs_loss + pt1.abs_loss) / n + U32 * integral.abs / n)


def _per_param(ev: Evaluator, integral: _Integrand, delta: Any, pt0: Point) -> tuple[Any, Any]:
    """``(per_param, grad_before)`` (device pytrees) with the ``grad`` engine, else Nones."""
    if not integral.grads:
        return None, None
    n = pt0.n
    weights = np.asarray([c / n for c, _ in integral.grads], np.float32)
    trees = [g for _, g in integral.grads]
    return _finalize(weights, trees, ev.replicate(delta), pt0.carry["grad"], np.float32(1.0 / n))


def _result(track, pt0, pt1, integral, delta, splits, opts, names) -> LCAResult:
    n = pt0.n
    per_leaf = integral.layers / n
    total = float(np.sum(per_leaf))
    measured = (pt1.loss - pt0.loss) / n
    error = measured - total
    floor = noise_floor(pt0, pt1, integral)
    class_change = per_class = None
    if track.strategy is not None:
        per_class = np.asarray(integral.classes, np.float64) / n
        class_change = (pt1.class_loss - pt0.class_loss) / n
    per_param, grad_before = _per_param(track.ev, integral, delta, pt0)
    return LCAResult(
        per_param=per_param,
        per_leaf={k: float(v) for k, v in zip(names, per_leaf)},
        per_class_leaf=per_class,
        class_loss_change=class_change,
        total=total,
        loss_change=measured,
        loss_before=pt0.loss / n,
        loss_after=pt1.loss / n,
        error=error,
        noise_floor=floor,
        num_splits=splits,
        converged=bool(abs(error) <= max(opts.tol, floor)),
        grad_before=grad_before,
        leaf_names=names,
        method=opts.method,
    )


def _needs_halving(tracks, ends, integrals, opts) -> bool:
    """Authors' criterion ``max(|err_train|, |err_test|) > tol``, each error also above its
    noise floor (halving cannot resolve rounding)."""
    checked = len(tracks) if opts.refine_on_test else 1
    for (pt0, pt1), integral in zip(ends[:checked], integrals[:checked]):
        err = (pt1.loss - pt0.loss - float(np.sum(integral.layers))) / pt0.n
        if abs(err) > max(opts.tol, noise_floor(pt0, pt1, integral)):
            return True
    return False


class Stepper:
    """Allocates consecutive steps, reusing the end point of step ``t`` as the start of ``t+1``.

    With the ``grad`` engine (and per-class by ``reverse``) everything evaluated at a point is
    independent of the step direction, so RK4 costs two full-dataset passes per step (midpoint
    and end) per dataset. Directional (``jvp``) quantities are recomputed at the start.
    """

    def __init__(self, evaluators: Sequence[Evaluator], opts: LCAOptions, num_leaves: int):
        self.opts = opts
        self.tracks = [_Track(ev, opts, num_leaves) for ev in evaluators]

    def reset(self) -> None:
        for t in self.tracks:
            t.cache = None

    def _points(self, p0, delta, ss) -> list[_Integrand]:
        """``Σ_s f(s)`` per track; all points launched, then fetched with one sync."""
        pts = [[t.ev.launch(p0, delta, s, t.q) for s in ss] for t in self.tracks]
        fetch([p for row in pts for p in row])
        return [
            sum(map(t.integrand, row[1:]), t.integrand(row[0])) for t, row in zip(self.tracks, pts)
        ]

    def _simpson(self, p0, delta, f0, f1, mid, ends) -> tuple[list[_Integrand], int]:
        """Composite Simpson, halving while needed; every point evaluated once."""
        opts = self.opts
        tips = [a + b for a, b in zip(f0, f1)]
        odd, even = mid, None
        splits = 2
        while True:
            h = 1.0 / splits
            integrals = []
            for i in range(len(self.tracks)):
                acc = tips[i].scaled(h / 3) + odd[i].scaled(4 * h / 3)
                integrals.append(acc + even[i].scaled(2 * h / 3) if even else acc)
            if 2 * splits > opts.max_splits or not _needs_halving(
                self.tracks, ends, integrals, opts
            ):
                return integrals, splits
            even = odd if even is None else [a + b for a, b in zip(even, odd)]
            splits *= 2
            odd = self._points(p0, delta, [(2 * j + 1) / splits for j in range(splits // 2)])

    def step(self, p0: Any, p1: Any, *, keep_end: bool = True) -> LCAResult:
        opts = self.opts
        delta = _sub(p1, p0)
        starts = [t.start(p0, delta) for t in self.tracks]
        end_q = [t.q if keep_end or opts.method == "rk4" else Quantities() for t in self.tracks]
        stops = [t.ev.launch(p1, delta, 0.0, q) for t, q in zip(self.tracks, end_q)]
        mids = []
        if opts.method == "rk4":
            mids = [t.ev.launch(p0, delta, 0.5, t.q) for t in self.tracks]
        fetch(starts + stops + mids)  # the step's first points run back to back: one sync
        for t, pt in zip(self.tracks, stops):
            t.cache = (p1, pt) if keep_end else None
        f0 = [t.integrand(pt) for t, pt in zip(self.tracks, starts)]
        ends = list(zip(starts, stops))
        if opts.method == "first_order":
            integrals, splits = f0, 1
        else:
            f1 = [t.integrand(pt) for t, pt in zip(self.tracks, stops)]
            fm = [t.integrand(pt) for t, pt in zip(self.tracks, mids)]
            integrals, splits = self._simpson(p0, delta, f0, f1, fm, ends)
        names = tuple(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(p0)[0])
        results = [
            _result(t, a, b, f, delta, splits, opts, names)
            for t, (a, b), f in zip(self.tracks, ends, integrals)
        ]
        if len(results) > 1:
            return dataclasses.replace(results[0], test=results[1])
        return results[0]


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
        dtype = getattr(a, "dtype", None) or np.result_type(a)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"Leaf {path_str(path)!r} of params has dtype {dtype}; LCA needs "
                "floating-point parameters (filter them out of the params you pass)."
            )
    if not jax.tree.leaves(params_before):
        raise ValueError("`params_before` has no leaves.")


def make_evaluators(loss_fn, data, labels, test_data, test_labels, opts) -> list[Evaluator]:
    """The training :class:`Evaluator` and, with ``test_data``, the test-set one."""
    train = make_evaluator(loss_fn, data, labels, opts)
    if test_data is None:
        if test_labels is not None:
            raise ValueError("`test_labels=` needs `test_data=`.")
        return [train]
    test = make_evaluator(loss_fn or train.loss_fn, test_data, test_labels, opts)
    if test.loss_fn is not train.loss_fn:
        raise ValueError("`data` and `test_data` must be evaluated with the same `loss_fn`.")
    return [train, test]


def allocate(
    loss_fn: Callable[[Any, Any], jax.Array] | None,
    params_before: Any,
    params_after: Any,
    data: Any,
    *,
    labels: Any = None,
    test_data: Any = None,
    test_labels: Any = None,
    options: LCAOptions | None = None,
    **overrides: Any,
) -> LCAResult:
    r"""Loss Change Allocation of one step ``θ_t → θ_{t+1}`` over the whole dataset.

    With ``Δθ = θ_{t+1} − θ_t`` and ``θ(s) = θ_t + s Δθ``, ``L(θ_{t+1}) − L(θ_t) = ∫_0^1
    ∇L(θ(s))·Δθ ds``, split per parameter ``i``:

    .. math::
       \begin{align*}
       \text{first order:}\quad & A_i = ∇L(θ_t)_i Δθ_i \\
       \text{RK4/Simpson:}\quad & A_i = \tfrac16 \big(∇L(θ_t) + 4∇L(θ_{t+½}) + ∇L(θ_{t+1})\big)_i Δθ_i \\
       \text{composite:}\quad & A_i = \textstyle\sum_j w_j ∇L(θ(j/n))_i Δθ_i,\quad
         w = [1, 4, 2, 4, …, 4, 1] / (3n)
       \end{align*}

    For ``method="rk4"`` the number of sub-intervals ``n`` starts at 2 and doubles (reusing
    every point already evaluated) while ``|error| > max(tol, noise_floor)`` and ``2n <=
    max_splits``, where ``error = ΔL − Σ_i A_i`` (the authors' sign) and ``noise_floor`` is
    the float32 rounding level of that error (:func:`noise_floor`): halving stops there,
    since it cannot reduce rounding. An unconverged step is reported (``converged=False``),
    never hidden. With ``test_data`` the test-set loss is allocated along the same path (the
    authors' joint train/test LCA) and, with ``refine_on_test``, its error enters the
    halving criterion too.

    Args:
      loss_fn: ``loss_fn(params, batch) -> [B]`` per-example float losses; the library takes
        the exact mean. May be None when ``data`` is an :class:`Evaluator`. BatchNorm models:
        see ``LCAOptions.bn_mode``.
      params_before: ``θ_t``.
      params_after: ``θ_{t+1}``, same tree structure and shapes.
      data: the training set: a pytree of arrays sharing a leading axis (``(x, y)``, a dict),
        a list/re-iterable of such batches, a callable returning a fresh iterator, or an
        :class:`Evaluator`.
      labels: ``[N]`` integer classes enabling per-class LCA (or ``class_fn`` +
        ``num_classes`` in the options).
      test_data, test_labels: the same for a held-out set (optional).
      options: an :class:`LCAOptions`; its fields may also be given as keyword arguments
        (``method``, ``tol``, ``max_splits``, ``engines``, ``batch_size``, …).

    Returns:
      An :class:`LCAResult` (with ``.test`` when ``test_data`` is given).

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> x = np.linspace(-1, 1, 8, dtype=np.float32)[:, None]
      >>> loss = lambda p, b: (b @ p["w"] + p["b"] - 1.0) ** 2  # per-example, shape [B]
      >>> p0 = {"w": jnp.zeros(1), "b": jnp.zeros(())}
      >>> p1 = {"w": jnp.ones(1), "b": jnp.full((), 0.5)}
      >>> r = allocate(loss, p0, p1, x)
      >>> {k: round(v, 4) for k, v in r.per_layer.items()}, round(r.total, 4), round(r.loss_change, 4)
      ({'b': -0.75, 'w': 0.4286}, -0.3214, -0.3214)
      >>> r.num_splits, bool(abs(r.error) <= r.noise_floor + 1e-3)
      (2, True)

    References:
      Lan, Liu, Zhou, Yosinski, `LCA: Loss Change Allocation for Neural Network Training
      <https://arxiv.org/abs/1909.01440>`_, NeurIPS 2019 (Eq. 1–3, §2, Table S1).
    """
    opts = resolve(options, overrides, "allocate")
    check_params(params_before, params_after)
    evs = make_evaluators(loss_fn, data, labels, test_data, test_labels, opts)
    for ev in evs:
        ev.prepare(params_before)
    stepper = Stepper(evs, opts, len(jax.tree.leaves(params_before)))
    return stepper.step(params_before, params_after, keep_end=False)
