"""What a *layer* is: discovery, paths, forward order and per-layer reductions.

A layer is one multiplicative weight tensor (the kernel of a Dense/Conv/Embed/attention
projection), flattened. Everything here is static: it looks at key paths, shapes and dtypes,
never at values, so it runs at trace time and never causes a retrace.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._base import NO_PARAMS_MSG
from ._custom_types import IsLayer, LayerAxis, LayerOrder

LAYER_NAMES = ("kernel", "embedding", "w")
NON_LAYER_NAMES = ("bias", "scale")


def shape_of(leaf: Any) -> tuple[int, ...]:
    """Shape of an array, a Python scalar or a ``jax.ShapeDtypeStruct``."""
    return tuple(getattr(leaf, "shape", np.shape(leaf)))


def path_str(path: Sequence[Any]) -> str:
    """Turns a JAX key path into ``"Dense_0/kernel"`` form.

    flax.nnx ``Variable`` leaves flatten under a trailing ``GetAttrKey('value')`` when
    ``tx.init`` sees them but not when ``tx.update`` does (``nnx.Optimizer`` passes pure
    arrays then), so that key is dropped: one path names the same leaf in both calls.

    Examples:
      >>> import jax
      >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      ...     {"Dense_0": {"kernel": 1, "bias": 2}, "scan": [3]})[0]]
      ['Dense_0/bias', 'Dense_0/kernel', 'scan/0']
    """
    path = tuple(path)
    if path and isinstance(path[-1], jtu.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def default_is_layer(path: str, leaf: Any) -> bool:
    """Default layer predicate: a leaf named kernel/embedding/w, or any leaf with ndim >= 2.

    Biases, norm scales and other 0-d/1-d leaves are *non-layer* leaves. Leaves named
    ``bias``/``scale`` never are layers, even when ``nn.scan``/``nnx.vmap`` stacks them to
    ndim >= 2.
    """
    name = path.rsplit("/", 1)[-1]
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        return False
    if name in NON_LAYER_NAMES:
        return False
    return name in LAYER_NAMES or len(shape_of(leaf)) >= 2


def natural_key(path: str) -> tuple:
    """Sort key ordering digit runs by value: ``Dense_2`` before ``Dense_10``.

    ``jax.tree`` orders dict keys as strings, which puts ``Dense_10`` between ``Dense_1`` and
    ``Dense_2``. Flax numbers auto-named submodules in creation order, which for sequential
    models is the forward order, so the natural sort is a sound fallback when no forward
    order is known.
    """
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", path)
        if part
    )


def natural_order(paths: Iterable[str]) -> tuple[str, ...]:
    """Paths sorted with :func:`natural_key`.

    Examples:
      >>> natural_order(["Dense_10/kernel", "Dense_2/kernel", "Dense_1/kernel"])
      ('Dense_1/kernel', 'Dense_2/kernel', 'Dense_10/kernel')
    """
    return tuple(sorted(paths, key=natural_key))


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """How one leaf is seen by the per-layer transforms (static, computed at trace time).

    Attributes:
      path: the leaf's ``"a/b/c"`` path.
      is_layer: whether the leaf is a multiplicative weight (else a non-layer leaf).
      stack_axis: axis along which the leaf stacks several layers (``nn.scan``), or None.
      reduce_axes: axes summed over to get one number per layer (or per unit).
    """

    path: str
    is_layer: bool
    stack_axis: int | None
    reduce_axes: tuple[int, ...]

    def num_stacked(self, shape: Sequence[int]) -> int:
        if not self.is_layer:
            return 0
        return 1 if self.stack_axis is None else int(shape[self.stack_axis])


@dataclasses.dataclass(frozen=True)
class Layering:
    """Static description of which leaves are layers and how each is reduced.

    Args:
      is_layer: ``callable(path, leaf) -> bool``, or a sequence of layer paths, or None for
        :func:`default_is_layer`.
      layer_axis: for leaves that stack several layers (``nn.scan``/``nnx.vmap``), the axis
        indexing them: an int for every layer leaf, a ``{path: axis}`` mapping, or
        ``callable(path, leaf) -> int | None``. None: every layer leaf is one layer.
      per_unit: if True, each output unit (slice along the last axis, Flax kernel layout) is
        its own "layer" for the norm and rotation operations (as in Nero); the depth index
        used by the α multipliers stays that of the whole leaf.
    """

    is_layer: IsLayer = None
    layer_axis: LayerAxis = None
    per_unit: bool = False

    def __post_init__(self):
        if self.is_layer is not None and not callable(self.is_layer):
            if isinstance(self.is_layer, str) or not isinstance(self.is_layer, Iterable):
                raise TypeError(
                    "`is_layer` must be callable(path, leaf) -> bool or a sequence of layer "
                    f"paths; got {self.is_layer!r}."
                )
            object.__setattr__(self, "is_layer", tuple(self.is_layer))
        if isinstance(self.layer_axis, Mapping):
            object.__setattr__(self, "layer_axis", tuple(sorted(self.layer_axis.items())))
        if not isinstance(self.per_unit, bool):
            raise TypeError(f"`per_unit` must be a bool; got {self.per_unit!r}.")

    def _is_layer(self, path: str, leaf: Any) -> bool:
        if self.is_layer is None:
            return default_is_layer(path, leaf)
        if callable(self.is_layer):
            return bool(self.is_layer(path, leaf))
        return path in self.is_layer

    def _stack_axis(self, path: str, leaf: Any) -> int | None:
        spec = self.layer_axis
        if spec is None:
            return None
        if isinstance(spec, tuple):
            axis = dict(spec).get(path)
        elif callable(spec):
            axis = spec(path, leaf)
        else:
            axis = spec
        if axis is None:
            return None
        ndim = len(shape_of(leaf))
        if not -ndim <= int(axis) < ndim:
            raise ValueError(f"`layer_axis={axis}` is out of range for leaf {path!r} of ndim {ndim}.")
        return int(axis) % ndim

    def layout(self, path: str, leaf: Any) -> LeafLayout:
        if not self._is_layer(path, leaf):
            return LeafLayout(path, False, None, ())
        ndim = len(shape_of(leaf))
        stack = self._stack_axis(path, leaf)
        keep = {stack} if stack is not None else set()
        if self.per_unit and ndim - len(keep) >= 2:
            keep.add(ndim - 1)
        reduce = tuple(a for a in range(ndim) if a not in keep)
        return LeafLayout(path, True, stack, reduce)

    def layouts(self, tree: Any) -> list[LeafLayout]:
        """Layouts of every leaf of ``tree``, in ``jax.tree`` order."""
        return [self.layout(path_str(p), x) for p, x in jtu.tree_flatten_with_path(tree)[0]]

    def map(self, fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
        """``jax.tree.map`` calling ``fn(layout, leaf, *rest_leaves)``."""
        return jtu.tree_map_with_path(
            lambda p, x, *r: fn(self.layout(path_str(p), x), x, *r), tree, *rest
        )

    def layer_paths(self, tree: Any) -> tuple[str, ...]:
        """Paths of the layer leaves of ``tree``, in ``jax.tree`` order."""
        return tuple(lo.path for lo in self.layouts(tree) if lo.is_layer)


def layer_dot(x: jax.Array, y: jax.Array, lo: LeafLayout) -> jax.Array:
    """Per-layer inner product in float32, with the reduced axes kept (for broadcasting)."""
    return jnp.sum(
        x.astype(jnp.float32) * y.astype(jnp.float32), axis=lo.reduce_axes, keepdims=True
    )


def layer_norm(x: jax.Array, lo: LeafLayout) -> jax.Array:
    """Per-layer Euclidean norm in float32, reduced axes kept."""
    return jnp.sqrt(layer_dot(x, x, lo))


# Row length of the one-pass reduction of :func:`layer_dots`: one 512-bit vector of float32.
# Measured on AVX-512 (benchmarks/update_step.py): rows of 16 read the operands at the speed
# of a single dot product; rows of 8 or 32 are 1.5-3x slower.
DOTS_ROW = 16


def layer_dots(lo: LeafLayout, pairs: Sequence[tuple[int, int]], *xs: jax.Array):
    """Per-layer inner products ``xs[i]·xs[j]`` for ``(i, j)`` in ``pairs`` (float32, keepdims).

    XLA:CPU runs sibling ``jnp.sum`` reductions one after the other, each re-reading its
    operands: ``w·w, s·w, s·s`` cost four tensor reads. When the last axis is reduced and
    holds a multiple of :data:`DOTS_ROW` elements, this computes every product in *one* pass
    instead: a variadic ``lax.reduce`` over rows of 16 (splitting only the last axis, so a
    sharded leaf stays sharded alike), then a short sum of the row partials. Otherwise (e.g.
    ``per_unit``, which keeps the last axis) it falls back to one ``jnp.sum`` per pair.

    Error: a 16-term sequential float32 sum, then the ``jnp.sum`` of the partials, so the
    usual blocked-summation bound ``|err| <= (16 + log2 n) eps sum|x_i y_i|`` (eps = 2**-24)
    plus the products' own rounding.
    """
    xs32 = [x.astype(jnp.float32) for x in xs]
    shape = xs32[0].shape
    last = len(shape) - 1
    if last < 0 or last not in lo.reduce_axes or shape[last] % DOTS_ROW or not shape[last]:
        return tuple(jnp.sum(xs32[i] * xs32[j], lo.reduce_axes, keepdims=True) for i, j in pairs)
    rows = [x.reshape(*shape[:-1], shape[-1] // DOTS_ROW, DOTS_ROW) for x in xs32]
    zero = jnp.zeros((), jnp.float32)
    partial = jax.lax.reduce(
        tuple(rows[i] * rows[j] for i, j in pairs),
        (zero,) * len(pairs),
        lambda acc, x: tuple(p + q for p, q in zip(acc, x)),
        (last + 1,),
    )
    return tuple(jnp.sum(p, lo.reduce_axes, keepdims=True) for p in partial)


# A per-layer float32 sum of n squares is exact to float32 precision only inside
# [n * SUM_TINY, SUM_HUGE]: XLA:CPU flushes products below 2**-126 (subnormal) to zero, and n
# such losses stay under eps = 2**-24 of the sum only if it is >= n * 2**-126 / eps; above
# 2**100 the scalar algebra on the sums (b * (b / a), 16 * c, a * (1 + rho**2)) could overflow.
SUM_TINY = 2.0**-102
SUM_HUGE = 2.0**100
_NAN = float("nan")


def nan_where(poisoned: jax.Array, x: jax.Array) -> jax.Array:
    """``x`` with NaN in the layers flagged ``poisoned``: a NaN or Inf that came in must come
    out visibly, never as the plausible 0 that a ``jnp.where`` guard would make of it."""
    return jnp.where(poisoned, _NAN, x)


def pow2(e: jax.Array) -> jax.Array:
    """Exact float32 ``2**e`` for int32 ``e`` in ``[-126, 127]`` (built from its bits)."""
    bits = (jnp.asarray(e, jnp.int32) + 127) << 23
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def reduced_size(lo: LeafLayout, shape: Sequence[int]) -> int:
    """Number of elements summed into each per-layer figure of a leaf."""
    return int(np.prod([shape[a] for a in lo.reduce_axes], dtype=np.int64))


def scaled_layer_dots(
    lo: LeafLayout,
    pairs: Sequence[tuple[int, int]],
    *raw: jax.Array,
    make: Callable[..., tuple[jax.Array, ...]] | None = None,
    groups: Sequence[int] | None = None,
    sources: Sequence[Sequence[int]] | None = None,
):
    """:func:`layer_dots` that stay exact at any float32 scale: ``(dots, exponents)``.

    The inputs are ``xs = make(*raw)`` (default: ``raw`` in float32): passing the stored
    arrays and a function deriving the inputs from them (e.g. ``w + u``) keeps the derived
    ones fused into the reductions; a ``lax.cond`` operand is always materialised.
    ``sources[i]`` lists the ``raw`` arrays that bound ``xs[i]`` (default ``(i,)``; ``w + u``
    is bounded by ``w`` and ``u``): exponents come from their ``max |raw|``, never from a
    materialised derived array.

    Returns the per-layer dots of the rescaled inputs ``x_i · 2^-e_g`` and the int32
    per-layer exponent ``e_g`` of each group ``g`` (keepdims): inputs in one group (``groups[i]``,
    default: each input its own) share an exponent, so that ``xs[i]·xs[j] = dots[k] · 2^(e_gi
    + e_gj)``. When, in every group, the largest
    square lies in ``[n SUM_TINY, SUM_HUGE]`` and none is above (the usual case) the exponents
    are 0 and the dots are those of one :func:`layer_dots` pass. Otherwise, and only then
    (``lax.cond``; one extra pass for the per-layer ``max |x_i|``), each group is rescaled by
    the power of two ``2^-e_g`` that brings its largest entry below 1 (below 2 for inputs
    with several sources; exact: only exponents change) and the dots are recomputed. A layer with a NaN or Inf entry in any
    input gets NaN dots. Each group needs one of its squares among ``pairs`` (its scale);
    a cross term is bounded by the squares of its factors' groups.
    """
    if make is None:
        make = lambda *r: tuple(x.astype(jnp.float32) for x in r)  # noqa: E731
    xs = make(*raw)
    groups = tuple(range(len(xs))) if groups is None else tuple(groups)
    sources = tuple((i,) for i in range(len(xs))) if sources is None else tuple(sources)
    dots = layer_dots(lo, pairs, *xs)
    diag = {i: dots[k] for k, (i, j) in enumerate(pairs) if i == j}
    tiny = reduced_size(lo, xs[0].shape) * SUM_TINY
    members = {g: [i for i in range(len(xs)) if groups[i] == g] for g in sorted(set(groups))}
    squares = {g: [diag[i] for i in m if i in diag] for g, m in members.items()}
    if not all(squares.values()):
        raise ValueError("scaled_layer_dots: every group needs a square among `pairs`.")
    bad = [(functools.reduce(jnp.maximum, sq) < tiny)
           | functools.reduce(jnp.logical_or, [~(x <= SUM_HUGE) for x in sq])
           for sq in squares.values()]
    zeros = {g: jnp.zeros(dots[0].shape, jnp.int32) for g in members}

    def rescaled(*raw):
        peaks = [jnp.max(jnp.abs(r.astype(jnp.float32)), lo.reduce_axes, keepdims=True)
                 for r in raw]
        exps = {}
        for g, m in members.items():
            src = sorted({j for i in m for j in sources[i]})
            top = functools.reduce(jnp.maximum, [peaks[j] for j in src])
            carry = int(any(len(sources[i]) > 1 for i in m))  # a sum of two may double
            exps[g] = jnp.clip(jnp.frexp(top)[1] + carry, -126, 126).astype(jnp.int32)
        finite = functools.reduce(jnp.logical_and, [jnp.isfinite(m) for m in peaks])
        xs = make(*raw)  # recomputed here, fused into the one reduction below
        out = layer_dots(lo, pairs, *(x * pow2(-exps[g]) for x, g in zip(xs, groups)))
        return tuple(jnp.where(finite, d, _NAN) for d in out), exps

    dots, exps = jax.lax.cond(jnp.any(functools.reduce(jnp.logical_or, bad)), rescaled,
                              lambda *raw: (dots, zeros), *raw)
    return dots, tuple(exps[g] for g in members)


def scaled_layer_norm(x: jax.Array, lo: LeafLayout) -> jax.Array:
    """Per-layer Euclidean norm (float32, keepdims), right at any scale of ``x`` (NaN for a
    layer with a NaN or Inf entry); see :func:`scaled_layer_dots`."""
    (xx,), (e,) = scaled_layer_dots(lo, ((0, 0),), x)
    return jnp.sqrt(xx) * pow2(e)


# One-pass ‖x⊥‖² = ‖x‖² - (x·r)²/‖r‖² (and the law of cosines) carry an error of ~4 eps ‖x‖²
# (eps = 2**-24, the float32 sums and the squared radial part): relative to ‖x⊥‖² that is
# <= 4 eps / CANCEL = 2.4e-5 while ‖x⊥‖² >= CANCEL ‖x‖²; below, the projection is formed
# explicitly. Within ~1e-3 rad of w⁰ (‖e‖² below NEAR_REFERENCE ‖w⁰‖²) the distance is also
# formed explicitly: there the rounding of ‖w'‖ - ‖w⁰‖ (~eps ‖w⁰‖) matters against ‖e‖.
CANCEL = 1e-2
NEAR_REFERENCE = 1e-6


def distance_to_reference(
    lo: LeafLayout,
    ee: jax.Array,
    a: jax.Array,
    b: jax.Array,
    vectors: Callable,
    *raw: jax.Array,
    gate: jax.Array | bool = True,
) -> jax.Array:
    """Per-layer ``1 - cos(w', w⁰)`` (keepdims, in ``[0, 2]``, 0 if either is zero).

    From ``ee = ‖e‖²`` (one pass), ``e = w' - w⁰``, ``a = ‖w⁰‖`` and ``b = ‖w'‖`` (all in the
    same units) by the law of cosines, ``(‖e‖² - (b - a)²) / (2ab)`` with ``b - a = (b² - a²)
    / (a + b)``. Where that cancels (see :data:`CANCEL`, :data:`NEAR_REFERENCE`; ``lax.cond``)
    ``(e, w⁰) = vectors(*raw)`` are recomputed from the stored arrays ``raw`` and ``e`` is
    projected off ``w⁰`` explicitly, its coefficient refined once (which removes the radial
    residue of its own rounding), each pass fused into its reduction. ``gate`` False skips
    that fallback (a step whose figures are not kept).
    """
    radial = (b * b - a * a) / jnp.where(a + b > 0, a + b, 1.0)
    tangential2 = jnp.maximum(ee - radial * radial, 0.0)  # 2ab (1 - cos)
    inexact = gate & jnp.any((tangential2 < CANCEL * ee) | (ee < NEAR_REFERENCE * a * a))

    def explicit(*raw):
        w00 = jnp.where(a > 0, a * a, 1.0)
        (ew,) = layer_dots(lo, ((0, 1),), *vectors(*raw))
        off = lambda f: (lambda e, w0: (e - f * w0, w0))(*vectors(*raw))  # noqa: E731
        f = ew / w00
        f = f + layer_dots(lo, ((0, 1),), *off(f))[0] / w00
        (epp,) = layer_dots(lo, ((0, 0),), off(f)[0])
        theta = jnp.arctan2(jnp.sqrt(epp) * a, a * a + ew)
        return 4.0 * a * b * jnp.square(jnp.sin(0.5 * theta))

    tangential2 = jax.lax.cond(inexact, explicit, lambda *_: tangential2, *raw)
    ab = a * b
    return jnp.where(ab > 0, jnp.clip(tangential2 / jnp.where(ab > 0, 2.0 * ab, 1.0), 0, 2), 0)


def kept_shape(lo: LeafLayout, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of one per-layer figure of a leaf: its axes that are not reduced."""
    return tuple(int(n) for i, n in enumerate(shape) if i not in lo.reduce_axes)


def squeeze_reduced(x: jax.Array, lo: LeafLayout) -> jax.Array:
    """Drops the (size-1) reduced axes of a keepdims per-layer reduction."""
    return jnp.squeeze(x, axis=lo.reduce_axes) if lo.reduce_axes else x


def layer_paths(params: Any, is_layer: IsLayer = None) -> tuple[str, ...]:
    """Paths of the layer leaves of ``params`` in ``jax.tree`` order.

    Examples:
      >>> import jax.numpy as jnp
      >>> layer_paths({"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}})
      ('Dense_0/kernel',)
    """
    return Layering(is_layer).layer_paths(params)


def check_same_structure(tree: Any, reference: Any, name: str, ref_name: str = "params") -> None:
    """Raises a ValueError naming the first differing leaf when two trees differ."""
    s1, s2 = jax.tree.structure(tree), jax.tree.structure(reference)
    if s1 == s2:
        return
    p1 = {path_str(p) for p, _ in jtu.tree_flatten_with_path(tree)[0]}
    p2 = {path_str(p) for p, _ in jtu.tree_flatten_with_path(reference)[0]}
    detail = ""
    if p1 - p2:
        detail += f" `{name}` has leaves missing from `{ref_name}`: {sorted(p1 - p2)[:5]}."
    if p2 - p1:
        detail += f" `{ref_name}` has leaves missing from `{name}`: {sorted(p2 - p1)[:5]}."
    raise ValueError(
        f"`{name}` and `{ref_name}` must have the same tree structure.{detail or ' ' + str(s1)}"
    )


def check_params(updates: Any, params: Any) -> None:
    """Raises unless ``params`` is given and has the structure of ``updates``."""
    if params is None:
        raise ValueError(NO_PARAMS_MSG)
    check_same_structure(updates, params, "updates")


def resolve_layer_order(
    params: Any, layering: Layering, layer_order: LayerOrder = None
) -> tuple[str, ...]:
    """Validated forward order of the layer leaves of ``params``.

    With ``layer_order=None`` the natural sort of the paths is used (see :func:`natural_key`).
    A given order must name every layer leaf exactly once, and nothing else.
    """
    paths = layering.layer_paths(params)
    if not paths:
        raise ValueError(
            "No layer found in params: no leaf matches `is_layer` (default: leaves named "
            f"{'/'.join(LAYER_NAMES)} or with ndim >= 2). Pass `is_layer=` to choose them."
        )
    if layer_order is None:
        return natural_order(paths)
    if isinstance(layer_order, str) or not isinstance(layer_order, Iterable):
        raise TypeError(f"`layer_order` must be a sequence of layer paths; got {layer_order!r}.")
    order = tuple(layer_order)
    known = set(paths)
    unknown = [p for p in order if p not in known]
    if unknown:
        raise ValueError(
            f"`layer_order` names paths that are not layers of params: {unknown}. "
            f"Layers are: {list(natural_order(paths))}."
        )
    dup = sorted({p for p in order if order.count(p) > 1})
    if dup:
        raise ValueError(f"`layer_order` names these layers more than once: {dup}.")
    missing = [p for p in natural_order(paths) if p not in set(order)]
    if missing:
        raise ValueError(f"`layer_order` is missing these layers of params: {missing}.")
    return order


def layer_depths(params: Any, layering: Layering, layer_order: LayerOrder = None):
    """Depth index ``l`` (0 = first layer) of every leaf, and the number of layers ``L``.

    Returns ``(depth, L)``: ``depth`` is a pytree like ``params`` of int32 arrays that
    broadcast against their leaf (-1 for non-layer leaves; a vector along the stack axis for
    stacked layers, whose slices take consecutive depths).
    """
    order = resolve_layer_order(params, layering, layer_order)
    shapes = {lo.path: (lo, shape_of(x)) for lo, x in zip(
        layering.layouts(params), jax.tree.leaves(params))}
    start, total = {}, 0
    for path in order:
        lo, shape = shapes[path]
        start[path] = total
        total += lo.num_stacked(shape)

    def depth(lo: LeafLayout, x):
        if not lo.is_layer:
            return jnp.asarray(-1, jnp.int32)
        if lo.stack_axis is None:
            return jnp.asarray(start[lo.path], jnp.int32)
        n = shape_of(x)[lo.stack_axis]
        shape = [1] * len(shape_of(x))
        shape[lo.stack_axis] = n
        return jnp.arange(start[lo.path], start[lo.path] + n, dtype=jnp.int32).reshape(shape)

    return layering.map(depth, params), total


# ----------------------------------------------------------------------------- forward order


def _sub_jaxprs(eqn) -> list[tuple[Any, list[Any]]]:
    """(sub-jaxpr, the eqn inputs bound to its invars) for every sub-jaxpr of ``eqn``."""
    out = []
    prim = eqn.primitive.name
    for key, value in eqn.params.items():
        values = value if isinstance(value, (tuple, list)) else [value]
        for sub in values:
            jaxpr = getattr(sub, "jaxpr", sub)
            if not hasattr(jaxpr, "eqns") or not hasattr(jaxpr, "invars"):
                continue
            n = len(jaxpr.invars)
            ins = list(eqn.invars)
            if prim == "cond":
                ins = ins[1:]
            elif prim == "while":
                nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
                carry = ins[nc + nb:]
                ins = ins[:nc] + carry if key == "cond_jaxpr" else ins[nc:nc + nb] + carry
            if len(ins) != n:
                # Unknown binding (e.g. a custom rule's extra residuals): align from the end,
                # which matches the primal inputs of custom_jvp/custom_vjp calls.
                ins = ins[-n:] if len(ins) >= n else [None] * (n - len(ins)) + ins
            out.append((jaxpr, ins))
    return out


def _first_uses(jaxpr, env: dict, order: list, seen: set) -> None:
    """Walks eqns in program order, recording the first eqn that reads each param leaf."""
    for eqn in jaxpr.eqns:
        subs = _sub_jaxprs(eqn)
        if subs:
            for sub, ins in subs:
                inner = {}
                for var, outer in zip(sub.invars, ins):
                    leaf = env.get(outer) if outer is not None and not _is_literal(outer) else None
                    if leaf is not None:
                        inner[var] = leaf
                _first_uses(sub, inner, order, seen)
        for var in eqn.invars:
            if _is_literal(var):
                continue
            leaf = env.get(var)
            if leaf is not None and leaf not in seen:
                seen.add(leaf)
                order.append(leaf)


def _is_literal(var) -> bool:
    return isinstance(var, jax_core.Literal)


def forward_order(
    apply_fn: Callable[..., Any],
    params: Any,
    *args: Any,
    is_layer: IsLayer = None,
    **kwargs: Any,
) -> tuple[str, ...]:
    """Layer paths in forward (input → output) order, from the traced computation.

    Traces ``apply_fn(params, *args, **kwargs)`` to a jaxpr (no FLOPs are spent) and orders
    the layer leaves by the first equation that reads them, recursing into the sub-jaxprs of
    ``scan``, ``while``, ``cond``, ``remat``, ``pjit`` and custom derivative rules. Layers that
    the function never reads are appended at the end in natural order.

    Args:
      apply_fn: ``apply_fn(params, *args, **kwargs)``, e.g. ``lambda p, x: model.apply({"params":
        p}, x)`` for Flax linen, or ``lambda s, x: nnx.merge(graphdef, s)(x)`` for nnx.
      params: the parameter pytree whose layers are ordered (arrays, or shape stubs from
        ``jax.eval_shape``: nothing is computed).
      *args: example inputs (only shapes and dtypes matter: arrays or ``jax.ShapeDtypeStruct``).
      is_layer: layer predicate or list of paths (default :func:`default_is_layer`).
      **kwargs: passed to ``apply_fn``.

    Returns:
      A tuple of layer paths, ready for ``layer_order=``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = {f"Dense_{i}": {"kernel": jnp.ones((2, 2))} for i in (10, 2, 7)}
      >>> apply = lambda p, x: x @ p["Dense_7"]["kernel"] @ p["Dense_2"]["kernel"] @ p["Dense_10"]["kernel"]
      >>> forward_order(apply, params, jnp.ones((1, 2)))
      ('Dense_7/kernel', 'Dense_2/kernel', 'Dense_10/kernel')
    """
    layering = Layering(is_layer)
    leaves_with_paths = jtu.tree_flatten_with_path(params)[0]
    paths = [path_str(p) for p, _ in leaves_with_paths]
    # Example inputs that are all arrays or ``jax.ShapeDtypeStruct``s are traced (so shape
    # stubs from ``jax.eval_shape`` work, as they do for params); others (flags) stay static.
    traced = [all(hasattr(x, "shape") and hasattr(x, "dtype") for x in jax.tree.leaves(a))
              for a in args]

    def call(p, dynamic):
        it = iter(dynamic)
        full = [next(it) if t else a for a, t in zip(args, traced)]
        return apply_fn(p, *full, **kwargs)

    closed = jax.make_jaxpr(call)(params, [a for a, t in zip(args, traced) if t])
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.invars, paths))
    order: list[str] = []
    _first_uses(jaxpr, env, order, set())
    layers = set(layering.layer_paths(params))
    if not layers:
        raise ValueError("`forward_order`: no layer found in params (check `is_layer`).")
    ordered = [p for p in order if p in layers]
    unused = natural_order(layers - set(ordered))
    return tuple(ordered) + unused
