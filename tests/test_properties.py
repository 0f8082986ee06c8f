"""Property-based tests (hypothesis) over random pytrees and random arguments.

Random nested dicts/lists/tuples of leaves with shapes including 0-d and size-0, dtypes
float32/bfloat16/float16, tiny and huge scales: no NaN/Inf comes out unless one came in,
structure and dtypes are preserved, and the Layca invariants hold; a leaf dropped or reshaped
is named in the error. Random bad values of every numeric argument raise, naming it, and
random good ones are accepted. The transforms are rows of the table in ``conftest.py``.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TRANSFORMS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optax_layca as ol

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SHAPES = [(), (0,), (3,), (2, 3), (4, 1), (2, 0), (2, 2, 3)]


@st.composite
def leaves(draw):
    shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(DTYPES))
    # float16 overflows past 65504, so its "huge" is smaller.
    top = 1e3 if dtype == jnp.float16 else 1e15
    scale = draw(st.sampled_from([1e-3, 1.0, top]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * scale
    g = rng.standard_normal(shape) * draw(st.sampled_from([0.0, 1e-6, 1.0, top]))
    return jnp.asarray(w, dtype), jnp.asarray(g, dtype)


def trees(leaf):
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.dictionaries(st.sampled_from(["a", "b", "kernel", "bias", "Dense_1"]), children,
                            min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.tuples(children, children),
        ),
        max_leaves=6,
    )


def split(tree):
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and hasattr(x[0], "dtype")
    params = jax.tree.map(lambda p: p[0], tree, is_leaf=is_pair)
    grads = jax.tree.map(lambda p: p[1], tree, is_leaf=is_pair)
    return params, grads


def has_layer(params):
    return bool(ol.layer_paths(params))


def nonzero_layers(params):
    # Layers of zero norm are rejected at init by design (tested elsewhere); size-0 layers too.
    return all(
        float(jnp.linalg.norm(x.astype(jnp.float32))) > 0
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if ol.default_is_layer(ol.path_str(p), x)
    )


ENTRIES = {e.name: e for e in TRANSFORMS}
# The rows that take any tree (AdaptCopy's table names fixed layers), and Layca per unit.


def _any_tree(entry):
    """``params -> transform``: α ≠ 0 needs a forward order, and a random tree's layer paths are
    not auto-numbered siblings, so any order of its layers is passed (the maths checked here
    does not depend on which)."""
    if entry.kwargs.get("alpha", 0.0) == 0.0:
        return lambda params: entry.make()
    return lambda params: entry.make(layer_order=ol.layer_paths(params))


ANY_TREE = {name: _any_tree(e) for name, e in ENTRIES.items() if name != "adapt_copy"}
ANY_TREE["per_unit"] = lambda params: ENTRIES["layca_sgd"].make(per_unit=True)
RANDOM_TREES = ["layca_sgd", "layca_sgd_chained", "layca_adam", "lars", "per_unit",
                "project_orthogonal", "scale_to_weight_norm", "chain(layca, track_rotation)",
                "track_rotation(adam)"]


@pytest.mark.parametrize("name", RANDOM_TREES)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees(leaves()))
def test_finite_in_finite_out_structure_and_dtype(name, tree):
    params, grads = split(tree)
    if not has_layer(params) or not nonzero_layers(params):
        return
    if name == "per_unit" and not all(
        float(jnp.min(jnp.linalg.norm(
            x.astype(jnp.float32).reshape(-1, x.shape[-1] if x.ndim >= 2 else 1), axis=0))) > 0
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if ol.default_is_layer(ol.path_str(p), x) and x.size
    ):
        return
    if "adam" in name and any(x.dtype == jnp.float16 for x in jax.tree.leaves(params)):
        return  # optax's own scale_by_adam gives 0/0 = NaN in float16 (eps underflows)
    tx = ANY_TREE[name](params)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for x in jax.tree.leaves(state):  # monitor figures, norms, moments: finite too
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))), name
    for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
        assert u.dtype == w.dtype and u.shape == w.shape
        assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32)))), name


@settings(max_examples=15, deadline=None)
@given(tree=trees(leaves()), lr=st.sampled_from([1e-4, 0.05, 1.0, 10.0]))
def test_layca_keeps_norm_and_rotates_by_arctan(tree, lr):
    params, grads = split(tree)
    # The invariant is about float32 maths; lower precisions are covered by the dtype test.
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    grads = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
    if not has_layer(params) or not nonzero_layers(params):
        return
    tx = ol.layca(lr)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for (path, w), w1, g in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                               jax.tree.leaves(new), jax.tree.leaves(grads)):
        if not ol.default_is_layer(ol.path_str(path), w) or w.size == 0:
            continue
        w, w1, g = (np.asarray(v, np.float64).ravel() for v in (w, w1, g))
        np.testing.assert_allclose(np.linalg.norm(w1), np.linalg.norm(w), rtol=2e-5)
        perp = g - (g @ w) / (w @ w) * w
        moved = np.linalg.norm(perp) > 1e-3 * np.linalg.norm(g) * 1.01
        cos = np.clip(w @ w1 / (np.linalg.norm(w) * np.linalg.norm(w1)), -1, 1)
        unit = w / np.linalg.norm(w)
        angle = np.arctan2(np.linalg.norm(w1 - (w1 @ unit) * unit), w1 @ unit)
        if moved and np.linalg.norm(perp) > 1e-2 * np.linalg.norm(g):
            np.testing.assert_allclose(angle, np.arctan(lr), rtol=1e-3, atol=1e-6)
        elif np.linalg.norm(perp) <= 1e-3 * np.linalg.norm(g) * 0.99:
            assert cos > 1 - 1e-6  # parallel step: no rotation


def test_long_run_keeps_initial_norm():
    """10,000 float32 Layca steps keep every layer's norm to 1e-5 relative."""
    key = jax.random.key(0)
    params = {f"Dense_{i}": {"kernel": jax.random.normal(jax.random.fold_in(key, i), (32, 32))}
              for i in range(3)}
    tx = ol.layca(0.3)
    norms0 = jax.tree.map(jnp.linalg.norm, params)

    def body(carry, k):
        p, s = carry
        g = jax.tree.map(lambda x: jax.random.normal(k, x.shape), p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    keys = jax.random.split(jax.random.key(1), 10_000)
    (params, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, keys))((params, tx.init(params)))
    for n0, n in zip(jax.tree.leaves(norms0), jax.tree.leaves(jax.tree.map(jnp.linalg.norm, params))):
        np.testing.assert_allclose(float(n), float(n0), rtol=1e-5)


# ----------------------------------------------------------------------------- tree mismatches


def _replace_leaf(tree, index, fn):
    leaves, treedef = jax.tree.flatten(tree)
    leaves[index] = fn(leaves[index])
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("name", ["layca_sgd", "layca_sgd_chained", "lars", "scale_by_layca",
                                  "project_orthogonal", "project_to_initial_norm",
                                  "cap_norm_increase", "chain(layca, track_rotation)"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees(leaves()), pick=st.integers(0, 100), reshape=st.booleans())
def test_a_dropped_or_reshaped_leaf_is_named(name, tree, pick, reshape):
    params, grads = split(tree)
    if not has_layer(params) or not nonzero_layers(params):
        return
    tx = ANY_TREE[name](params)
    state = tx.init(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    index = pick % len(flat)
    path = ol.path_str(flat[index][0])
    if reshape:  # one more axis: broadcasting would otherwise let it through
        bad = _replace_leaf(grads, index, lambda x: jnp.ones((*x.shape, 2), x.dtype))
    else:  # the leaf disappears (None is an empty subtree)
        bad = _replace_leaf(grads, index, lambda x: None)
    with pytest.raises(ValueError, match=re.escape(repr(path))):
        tx.update(bad, state, params)


# ----------------------------------------------------------------------------- bad arguments

TABLE = {"Dense_0/kernel": [0.1]}
inf = math.inf
# (call with the value, argument name, interval (low, high, low_open, high_open))
NUMERIC_ARGS = {
    "layca.learning_rate": (lambda v: ol.layca(v), "learning_rate", (0, inf, False, True)),
    "lars.learning_rate": (lambda v: ol.lars(v), "learning_rate", (0, inf, False, True)),
    "scale_by_layca.learning_rate": (lambda v: ol.scale_by_layca(v), "learning_rate",
                                     (0, inf, False, True)),
    "sgd_amom.learning_rate": (lambda v: ol.sgd_amom(v), "learning_rate", (0, inf, False, True)),
    "adapt_copy.non_layer_learning_rate": (
        lambda v: ol.adapt_copy(TABLE, non_layer_learning_rate=v), "non_layer_learning_rate",
        (0, inf, False, True)),
    "layca.alpha": (lambda v: ol.layca(0.1, alpha=v), "alpha", (-1, 1, False, False)),
    "lars.alpha": (lambda v: ol.lars(0.1, alpha=v), "alpha", (-1, 1, False, False)),
    "scale_by_layer_multipliers.alpha": (lambda v: ol.scale_by_layer_multipliers(v), "alpha",
                                         (-1, 1, False, False)),
    "layer_multipliers.alpha": (lambda v: ol.layer_multipliers(v, 3), "alpha",
                                (-1, 1, False, False)),
    "layca.parallel_tol": (lambda v: ol.layca(0.1, parallel_tol=v), "parallel_tol",
                           (0, 1, False, True)),
    "project_orthogonal.parallel_tol": (lambda v: ol.project_orthogonal(parallel_tol=v),
                                        "parallel_tol", (0, 1, False, True)),
    "sgd_amom.momentum": (lambda v: ol.sgd_amom(0.1, momentum=v), "momentum",
                          (0, 1, False, True)),
    "cap_norm_increase.max_increase": (lambda v: ol.cap_norm_increase(v), "max_increase",
                                       (0, inf, False, True)),
    "lars.max_norm_increase": (lambda v: ol.lars(0.1, max_norm_increase=v), "max_norm_increase",
                               (0, inf, False, True)),
    "adapt_copy.max_angle": (lambda v: ol.adapt_copy(TABLE, max_angle=v), "max_angle",
                             (0, math.pi / 2, True, True)),
}
ANY_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2.0, 2.0),
    st.integers(-3, 3),
    st.builds(np.float32, st.floats(-2.0, 2.0, width=32)),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
)


def _valid(value, interval):
    low, high, low_open, high_open = interval
    if isinstance(value, (bool, str)) or value is None:
        return False
    v = float(value)
    return (math.isfinite(v) and (v > low if low_open else v >= low)
            and (v < high if high_open else v <= high))


@pytest.mark.parametrize("which", sorted(NUMERIC_ARGS))
@settings(max_examples=12, deadline=None)
@given(value=ANY_VALUE)
def test_every_numeric_argument_is_validated_by_name(which, value):
    make, arg, interval = NUMERIC_ARGS[which]
    none_ok = arg == "non_layer_learning_rate"  # None: non-layer leaves frozen
    if _valid(value, interval) or (value is None and none_ok):
        make(value)
    else:
        with pytest.raises((ValueError, TypeError), match=re.escape(f"{arg}=...)")):
            make(value)


INT_ARGS = {
    "track_rotation.every": lambda v: ol.track_rotation(every=v),
    "RotationHistory.every": lambda v: ol.RotationHistory(every=v),
    "adapt_copy.steps_per_epoch": lambda v: ol.adapt_copy(TABLE, steps_per_epoch=v),
    "layer_multipliers.num_layers": lambda v: ol.layer_multipliers(0.5, v),
}


@pytest.mark.parametrize("which", sorted(INT_ARGS))
@settings(max_examples=12, deadline=None)
@given(value=st.one_of(st.integers(-3, 5), st.builds(np.int64, st.integers(-3, 5)),
                       st.floats(-3, 5), st.booleans(), st.none(), st.text(max_size=2)))
def test_every_int_argument_takes_python_and_numpy_ints_only(which, value):
    arg = which.split(".")[1]
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
    if ok or (value is None and arg == "steps_per_epoch"):  # None: one row per step
        INT_ARGS[which](value)
    else:
        with pytest.raises((ValueError, TypeError), match=re.escape(f"{arg}=...)")):
            INT_ARGS[which](value)
