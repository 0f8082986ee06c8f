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


def _is_axis(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


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


@dataclasses.dataclass(frozen=True)
class Layering:
    """Static description of which leaves are layers and how each is reduced.

    Args:
      is_layer: ``callable(path, leaf) -> bool``, or a sequence of layer paths, or None for
        :func:`default_is_layer`.
      layer_axis: for leaves that stack several layers (``nn.scan``/``nnx.vmap``), the axis
        indexing them. An int: *every* layer leaf is such a stack, all of the same length
        (a tree that also holds unstacked layers, e.g. an embedding and a head, raises and
        must name its stacks); a ``{path: axis}`` mapping whose keys are leaf paths or
        module paths (``{"blocks": 0}``: every layer under ``blocks/``, which is then the
        *scan root* of those leaves); or ``callable(path, leaf) -> int | None``. None: every
        layer leaf is one layer. See :func:`layer_depths` for the depth of stacked layers.
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
        axis = self.layer_axis
        if isinstance(axis, Mapping):
            bad = {k: v for k, v in axis.items() if not _is_axis(v) or not isinstance(k, str)}
            if bad:
                raise TypeError(
                    "`layer_axis` as a mapping must map layer paths to int axes; got "
                    f"{bad!r}."
                )
            object.__setattr__(self, "layer_axis", tuple(sorted(axis.items())))
        elif not (axis is None or callable(axis) or _is_axis(axis)):
            raise TypeError(
                "`layer_axis` must be None, an int, a {path: int} mapping or "
                f"callable(path, leaf) -> int | None; got {axis!r}."
            )
        if not isinstance(self.per_unit, bool):
            raise TypeError(f"`per_unit` must be a bool; got {self.per_unit!r}.")

    def _is_layer(self, path: str, leaf: Any) -> bool:
        if self.is_layer is None:
            return default_is_layer(path, leaf)
        chosen = self.is_layer(path, leaf) if callable(self.is_layer) else path in self.is_layer
        if chosen and not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"`is_layer` chose leaf {path!r} of dtype {jnp.result_type(leaf)}, but layers "
                "must be floating point."
            )
        return bool(chosen)

    def scan_root(self, path: str) -> str | None:
        """The mapping key naming ``path``'s scanned module (``layer_axis={module: axis}``).

        None when ``layer_axis`` is not a mapping, or names ``path`` itself, or nothing.
        """
        if not isinstance(self.layer_axis, tuple):
            return None
        roots = [k for k, _ in self.layer_axis if path.startswith(k + "/")]
        return max(roots, key=len) if roots else None

    def _stack_axis(self, path: str, leaf: Any) -> int | None:
        spec = self.layer_axis
        if spec is None:
            return None
        if isinstance(spec, tuple):
            axes = dict(spec)
            root = self.scan_root(path)
            axis = axes.get(path, axes.get(root) if root is not None else None)
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
        """Layouts of every leaf of ``tree``, in ``jax.tree`` order (stacks checked)."""
        leaves = jtu.tree_flatten_with_path(tree)[0]
        layouts = [self.layout(path_str(p), x) for p, x in leaves]
        self._check_int_axis(layouts, [x for _, x in leaves])
        return layouts

    def _check_int_axis(self, layouts: Sequence[LeafLayout], leaves: Sequence[Any]) -> None:
        """An int ``layer_axis`` claims that every layer leaf is one stack of equal length.

        A leaf that is not such a stack (an embedding, a head beside ``nn.scan`` blocks)
        would otherwise be cut into ``shape[axis]`` silent "layers".
        """
        axis = self.layer_axis
        if not isinstance(axis, int) or isinstance(axis, bool):
            return
        sizes = {lo.path: shape_of(x)[lo.stack_axis]
                 for lo, x in zip(layouts, leaves) if lo.is_layer}
        if len(set(sizes.values())) <= 1:
            return
        counts: dict[int, list[str]] = {}
        for path, n in sizes.items():
            counts.setdefault(n, []).append(path)
        common = max(counts, key=lambda n: len(counts[n]))
        odd = sorted(p for n, ps in counts.items() if n != common for p in ps)
        raise ValueError(
            f"`layer_axis={axis}` is an int, so every layer leaf must stack the same number of "
            f"layers along axis {axis}; {counts[common][:3]} stack {common}, but leaf "
            f"{odd[0]!r} has {sizes[odd[0]]} there ({len(odd)} such leaves: {odd[:5]}). When "
            "stacked (nn.scan/nnx.vmap) and unstacked layers mix, name the stacks: "
            "`layer_axis={'<scanned module>': 0}` or `layer_axis=lambda path, leaf: 0 if "
            "path.startswith('<scanned module>/') else None`."
        )

    def map(self, fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
        """``jax.tree.map`` calling ``fn(layout, leaf, *rest_leaves)``."""
        self.layouts(tree)  # trace-time checks only (static shapes)
        return jtu.tree_map_with_path(
            lambda p, x, *r: fn(self.layout(path_str(p), x), x, *r), tree, *rest
        )

    def layer_paths(self, tree: Any) -> tuple[str, ...]:
        """Paths of the layer leaves of ``tree``, in ``jax.tree`` order."""
        return tuple(lo.path for lo in self.layouts(tree) if lo.is_layer)


def compute_dtype(*xs: Any) -> jnp.dtype:
    """dtype of the per-layer maths: that of the arrays, promoted to at least float32.

    bfloat16/float16 leaves are reduced in float32 (their sums of squares overflow and lose
    digits otherwise); float64 leaves (``jax_enable_x64``) stay in float64.
    """
    # Not jnp.promote_types: it refuses bfloat16 + float32 under strict dtype promotion.
    dtypes = [jnp.dtype(jnp.result_type(x)) for x in xs]
    wide = any(d.itemsize >= (16 if jnp.issubdtype(d, jnp.complexfloating) else 8) for d in dtypes)
    if any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes):
        return jnp.dtype(jnp.complex128 if wide else jnp.complex64)
    return jnp.dtype(jnp.float64 if wide else jnp.float32)


def upcast_all(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """The arrays cast to their common :func:`compute_dtype`."""
    dtype = compute_dtype(*xs)
    return tuple(jnp.asarray(x).astype(dtype) for x in xs)


def upcast(*xs: jax.Array) -> Any:
    """:func:`upcast_all`, but one array (not a tuple) for one argument."""
    out = upcast_all(*xs)
    return out[0] if len(out) == 1 else out


def layer_dot(x: jax.Array, y: jax.Array, lo: LeafLayout) -> jax.Array:
    """Per-layer inner product in :func:`compute_dtype` (float32 at least), reduced axes kept."""
    dtype = compute_dtype(x, y)
    return jnp.sum(x.astype(dtype) * y.astype(dtype), axis=lo.reduce_axes, keepdims=True)


def layer_norm(x: jax.Array, lo: LeafLayout) -> jax.Array:
    """Per-layer Euclidean norm in :func:`compute_dtype`, reduced axes kept."""
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
    xs32 = upcast_all(*xs)
    shape = xs32[0].shape
    last = len(shape) - 1
    if last < 0 or last not in lo.reduce_axes or shape[last] % DOTS_ROW or not shape[last]:
        return tuple(jnp.sum(xs32[i] * xs32[j], lo.reduce_axes, keepdims=True) for i, j in pairs)
    rows = [x.reshape(*shape[:-1], shape[-1] // DOTS_ROW, DOTS_ROW) for x in xs32]
    zero = jnp.zeros((), xs32[0].dtype)
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
        make = upcast_all
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
        peaks = [jnp.max(jnp.abs(upcast(r)), lo.reduce_axes, keepdims=True)
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


def check_same_shapes(tree: Any, reference: Any, name: str, ref_name: str = "params") -> None:
    """Raises a ValueError naming the first leaf whose shape differs (same structures)."""
    for (p, x), y in zip(jtu.tree_flatten_with_path(tree)[0], jax.tree.leaves(reference)):
        if shape_of(x) != shape_of(y):
            raise ValueError(
                f"`{name}` and `{ref_name}` must have the same leaf shapes; leaf "
                f"{path_str(p)!r} has shape {shape_of(x)} in `{name}` and {shape_of(y)} in "
                f"`{ref_name}`."
            )


def check_params(updates: Any, params: Any) -> None:
    """Raises unless ``params`` is given and has the structure and leaf shapes of ``updates``."""
    if params is None:
        raise ValueError(NO_PARAMS_MSG)
    check_same_structure(updates, params, "updates")
    check_same_shapes(updates, params, "updates")


def check_like_init(tree: Any, per_layer: Any, layering: Layering, where: str) -> None:
    """Checks ``tree`` against a per-layer state leaf built by ``init`` (reduced axes kept).

    Same structure, and every layer leaf of the same rank with the same kept axes (stack axis,
    units) as at init; names the leaf otherwise. A change of size along a reduced axis cannot
    be seen from a per-layer figure.
    """
    check_same_structure(tree, per_layer, "updates", "params at init")
    for (p, x), ref in zip(jtu.tree_flatten_with_path(tree)[0], jax.tree.leaves(per_layer)):
        lo = layering.layout(path_str(p), x)
        shape, ref_shape = shape_of(x), shape_of(ref)
        if not lo.is_layer:
            # a 0-d placeholder, or a whole-tensor norm kept per block (``non_layer="normalize"``)
            same = ref_shape == () or (
                len(ref_shape) == len(shape) and all(r in (1, n) for n, r in zip(shape, ref_shape))
            )
        else:
            same = len(ref_shape) == len(shape) and all(
                r in (1, n) and (r == n or i in lo.reduce_axes)
                for i, (n, r) in enumerate(zip(shape, ref_shape))
            )
        if not same:
            raise ValueError(
                f"`{where}`: leaf {lo.path!r} has shape {shape}, which does not match the "
                f"params seen at `init` (per-layer state of shape {ref_shape}). Call `init` "
                "again after changing the model."
            )


def no_layer_error(tree: Any, where: str) -> ValueError:
    """The "no layer found" error, saying when integer or complex dtypes are the reason."""
    msg = (
        f"No layer found in params (`{where}`): no leaf matches `is_layer` (default: "
        f"floating-point leaves named {'/'.join(LAYER_NAMES)} or with ndim >= 2). Pass "
        "`is_layer=` to choose them."
    )
    skipped = [
        f"{path_str(p)} ({jnp.result_type(x)})"
        for p, x in jtu.tree_flatten_with_path(tree)[0]
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating)
        and (path_str(p).rsplit("/", 1)[-1] in LAYER_NAMES or len(shape_of(x)) >= 2)
    ]
    if skipped:
        msg += (
            f" These leaves look like layers but are not floating point, and layers must be: "
            f"{skipped[:5]}."
        )
    return ValueError(msg)


def check_layer_order(layer_order: LayerOrder, where: str) -> None:
    """Type check of ``layer_order`` at construction (the paths are checked at ``init``)."""
    if layer_order is None:
        return
    if isinstance(layer_order, str) or not isinstance(layer_order, Iterable):
        raise TypeError(
            f"`{where}(layer_order=...)` must be a sequence of layer paths; got {layer_order!r}."
        )
    bad = [p for p in layer_order if not isinstance(p, str)]
    if bad:
        raise TypeError(f"`{where}(layer_order=...)` must hold path strings; got {bad[:3]}.")


# A path part that Flax or a Python list numbered: ``Dense_3``, ``layers_12``, ``12``.
_NUMBERED_PART = re.compile(r"^(?:.*_)?\d+$")


def natural_order_is_forward(paths: Iterable[str]) -> bool:
    """Whether the natural sort of layer ``paths`` is known to be their forward order.

    True only when every path differs from the others by the integer suffixes of
    auto-numbered parts (``Dense_0 … Dense_11``, ``layers_2/Dense_0``, list indices): Flax
    numbers such modules in creation order, which for sequential code is the forward order.
    Names chosen by hand (``stem``, ``head``, ``conv1``) or several module types (``Conv_k``
    and ``Dense_k``) say nothing about the forward order.

    Examples:
      >>> natural_order_is_forward(["Dense_10/kernel", "Dense_2/kernel"])
      True
      >>> natural_order_is_forward(["stem/kernel", "head/kernel", "ResBlock_0/conv1/kernel"])
      False
    """
    template = lambda path: tuple(
        re.sub(r"\d+$", "#", part) if _NUMBERED_PART.match(part) else part
        for part in path.split("/")
    )
    return len({template(p) for p in paths}) <= 1


def resolve_layer_order(
    params: Any,
    layering: Layering,
    layer_order: LayerOrder = None,
    where: str = "init",
    *,
    need_order: bool = True,
) -> tuple[str, ...]:
    """Validated forward order of the layer leaves of ``params``.

    With ``layer_order=None`` the natural sort of the paths (see :func:`natural_key`) is used,
    but when ``need_order`` (a non-zero α ranks the layers) only if
    :func:`natural_order_is_forward`; otherwise a ValueError asks for
    :func:`forward_order`. A given order must name every layer leaf exactly once, and
    nothing else.
    """
    paths = layering.layer_paths(params)
    if not jax.tree.leaves(params):
        return ()  # an empty tree (``optax.masked(tx, {})``, an unused partition label)
    if not paths:
        raise no_layer_error(params, where)
    if layer_order is None:
        if need_order and not natural_order_is_forward(paths):
            raise ValueError(
                "`layer_order` is needed: a non-zero `alpha` ranks the layers by depth, and the "
                "natural sort of these layer paths is not known to be their forward order "
                "(they are not all auto-numbered siblings like Dense_0 … Dense_k): "
                f"{list(natural_order(paths))[:8]}. Pass `layer_order=forward_order(apply_fn, "
                "params, example_input)` (traced from the model) or the paths in forward order."
            )
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


@dataclasses.dataclass(frozen=True)
class Stack:
    """Layer leaves that hold the blocks of one ``nn.scan``/``nnx.vmap`` (static).

    Attributes:
      root: path of the scanned module (``""``: the whole tree).
      axis: the stack axis of every leaf.
      length: number of blocks.
      paths: the leaves, in layer order (the forward order inside a block).
    """

    root: str
    axis: int
    length: int
    paths: tuple[str, ...]


def layer_stacks(params: Any, layering: Layering, order: Sequence[str]) -> tuple[Stack, ...]:
    """The stacks of ``params``: stacked layer leaves grouped by scanned module.

    Two stacked leaves share a stack when they have the same stack axis and length and the
    same *scan root*: the module named by a ``layer_axis={module: axis}`` key; the whole
    tree for an int ``layer_axis``; otherwise the highest module all of whose leaves (biases
    and norm scales included) have that length along that axis, which is what ``nn.scan``
    and ``nnx.vmap`` make of the scanned module and no unstacked sibling shares.
    """
    leaves = {path_str(p): x for p, x in jtu.tree_flatten_with_path(params)[0]}
    layouts = {lo.path: lo for lo in layering.layouts(params)}
    cache: dict[tuple[int, int], set[str]] = {}

    def unstacked_modules(axis: int, n: int) -> set[str]:
        """Modules holding a leaf that is not a stack of ``n`` along ``axis`` (one pass)."""
        if (axis, n) not in cache:
            bad = set()
            for path, x in leaves.items():
                lo, shape = layouts[path], shape_of(x)
                stacked = len(shape) > axis and shape[axis] == n
                if not stacked or (lo.is_layer and lo.stack_axis != axis):
                    parts = path.split("/")
                    bad.update("/".join(parts[:i]) for i in range(len(parts)))
            cache[(axis, n)] = bad
        return cache[(axis, n)]

    def root_of(path: str, axis: int, n: int) -> str:
        explicit = layering.scan_root(path)
        if explicit is not None:
            return explicit
        if isinstance(layering.layer_axis, int):
            return ""
        parts, bad = path.split("/"), unstacked_modules(axis, n)
        roots = ("/".join(parts[:i]) for i in range(len(parts)))
        return next((r for r in roots if r not in bad), path)

    groups: dict[tuple[str, int, int], list[str]] = {}
    for path in order:
        lo = layouts[path]
        if lo.stack_axis is not None:
            n = int(shape_of(leaves[path])[lo.stack_axis])
            groups.setdefault((root_of(path, lo.stack_axis, n), lo.stack_axis, n), []).append(path)
    return tuple(Stack(r, a, n, tuple(ps)) for (r, a, n), ps in groups.items())


def layer_depths(
    params: Any,
    layering: Layering,
    layer_order: LayerOrder = None,
    where: str = "init",
    *,
    need_order: bool = True,
):
    """Depth index ``l`` (0 = first layer) of every leaf, and the number of layers ``L``.

    Returns ``(depth, L)``: ``depth`` is a pytree like ``params`` of int32 arrays that
    broadcast against their leaf (-1 for non-layer leaves; a vector along the stack axis for
    stacked layers). The blocks of a stack (:func:`layer_stacks`) take depths block by block,
    in forward order inside the block: with ``attn`` and ``mlp`` kernels stacked over 3 blocks
    after an embedding, ``embed 0, attn 1 3 5, mlp 2 4 6``, head 7. The leaves of a stack
    must therefore be consecutive in the layer order (as :func:`forward_order` gives them).
    ``need_order``: see :func:`resolve_layer_order`.
    """
    order = resolve_layer_order(params, layering, layer_order, where, need_order=need_order)
    stack_of = {p: st for st in layer_stacks(params, layering, order) for p in st.paths}
    first: dict[str, tuple[int, int]] = {}  # path -> (depth of block 0, depth stride)
    total = 0
    for i, path in enumerate(order):
        st = stack_of.get(path)
        if st is None:
            first[path], total = (total, 1), total + 1
        elif path == st.paths[0]:
            between = [p for p in order[i:i + len(st.paths)] if p not in st.paths]
            if between:
                raise ValueError(
                    f"The stacked layers {list(st.paths)} ({st.length} blocks under "
                    f"{st.root or 'the root'!r}) must be consecutive in `layer_order` (one block "
                    f"in forward order); {between[0]!r} comes between them."
                )
            for j, q in enumerate(st.paths):
                first[q] = (total + j, len(st.paths))
            total += st.length * len(st.paths)

    def depth(lo: LeafLayout, x):
        if not lo.is_layer:
            return jnp.asarray(-1, jnp.int32)
        start, stride = first[lo.path]
        if lo.stack_axis is None:
            return jnp.asarray(start, jnp.int32)
        n = shape_of(x)[lo.stack_axis]
        shape = [1] * len(shape_of(x))
        shape[lo.stack_axis] = n
        return (start + stride * jnp.arange(n, dtype=jnp.int32)).reshape(shape)

    return layering.map(depth, params), total


def tensor_layouts(tree: Any, layering: Layering) -> dict[str, LeafLayout]:
    """``{path: layout}`` treating every leaf as one tensor, for non-layer policies.

    Layer leaves keep their layout. A non-layer leaf (bias, norm scale) is reduced whole, or
    per block when it lies under the scan root of a stack (:func:`layer_stacks`) with the
    stack's length along its axis (the bias of an ``nn.scan``-ed block). Used where non-layer
    leaves are normalised like layers, as the authors' LARS does.
    """
    flat = jtu.tree_flatten_with_path(tree)[0]
    layouts = layering.layouts(tree)
    stacks = sorted(layer_stacks(tree, layering, layering.layer_paths(tree)),
                    key=lambda st: -len(st.root))
    out = {}
    for lo, (_, x) in zip(layouts, flat):
        if lo.is_layer:
            out[lo.path] = lo
            continue
        shape, path = shape_of(x), lo.path
        st = next((st for st in stacks
                   if (not st.root or path.startswith(st.root + "/"))
                   and len(shape) > st.axis and shape[st.axis] == st.length), None)
        axis = None if st is None else st.axis
        out[lo.path] = LeafLayout(lo.path, False, axis, tuple(a for a in range(len(shape))
                                                               if a != axis))
    return out


def module_layer_depths(params: Any, layering: Layering, depth: Any) -> Any:
    """``depth`` with each non-layer leaf given the depth of the layer of its module.

    A bias ``Dense_3/bias`` takes the depth of ``Dense_3/kernel``, as the authors' SGD and
    LARS give every weight of a Keras layer that layer's multiplier (a module holding several
    layers lends the first in ``jax.tree`` order); a leaf whose module has no layer (a norm's
    scale) keeps -1. Under a stack the bias takes the per-block depths.
    """
    flat = jtu.tree_flatten_with_path(params)[0]
    layouts = layering.layouts(params)
    depths = jax.tree.leaves(depth)
    owner: dict[str, tuple[LeafLayout, Any]] = {}
    for lo, d in zip(layouts, depths):
        if lo.is_layer:
            owner.setdefault(module_path(lo.path), (lo, d))
    out = []
    for lo, (_, x), d in zip(layouts, flat, depths):
        if lo.is_layer or module_path(lo.path) not in owner:
            out.append(d)
            continue
        kernel, kd = owner[module_path(lo.path)]
        if kernel.stack_axis is None:
            out.append(jnp.copy(kd))  # its own buffer: a state sharing one cannot be donated
            continue
        shape, n = shape_of(x), np.size(kd)
        if len(shape) <= kernel.stack_axis or shape[kernel.stack_axis] != n:
            raise ValueError(
                f"Leaf {lo.path!r} (shape {shape}) sits beside the stacked layer "
                f"{kernel.path!r} ({n} blocks along axis {kernel.stack_axis}) but is not "
                "stacked along that axis: its layer's multiplier is ambiguous."
            )
        target = [1] * len(shape)
        target[kernel.stack_axis] = n
        out.append(jnp.reshape(kd, target))
    return jax.tree.unflatten(jax.tree.structure(depth), out)


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
        raise no_layer_error(params, "forward_order")
    ordered = [p for p in order if p in layers]
    unused = natural_order(layers - set(ordered))
    return tuple(ordered) + unused


def module_path(path: str) -> str:
    """The module a parameter leaf belongs to: its parent path (a top-level leaf is its own).

    Loss Change Allocation sums a module's leaves (kernel, bias, norm scale) into one
    "layer", the grouping of Lan et al. (2019, §4: "sum LCA over all parameters within each
    layer").

    Examples:
      >>> module_path("Dense_0/kernel"), module_path("layers/0/linear/bias"), module_path("w")
      ('Dense_0', 'layers/0/linear', 'w')
    """
    head, sep, _ = path.rpartition("/")
    return head if sep else path
