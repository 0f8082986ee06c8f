"""Property-based tests (hypothesis) over random pytrees for every Layca-family transform.

Random nested dicts/lists/tuples of leaves with shapes including 0-d and size-0, dtypes
float32/bfloat16/float16, tiny and huge scales: no NaN/Inf comes out unless one came in,
structure and dtypes are preserved, and the Layca invariants hold.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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


TRANSFORMS = {
    "layca_fused": lambda: ol.layca(0.1),
    "layca_chain": lambda: ol.layca(0.1, fused=False),
    # α ≠ 0 needs a forward order; any order of the random tree's layers will do here.
    "layca_adam": lambda p: ol.layca(0.1, base=optax.scale_by_adam(), alpha=0.5,
                                     layer_order=ol.layer_paths(p)),
    "lars": lambda p: ol.lars(0.1, alpha=-0.5, layer_order=ol.layer_paths(p)),
    "per_unit": lambda: ol.layca(0.1, per_unit=True),
    "project_orthogonal": lambda: ol.project_orthogonal(),
    "scale_to_weight_norm": lambda: ol.scale_to_weight_norm(),
    "monitored": lambda: optax.chain(ol.layca(0.1), ol.track_rotation()),
    "monitor_adam": lambda: ol.track_rotation(optax.scale_by_adam()),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    if name in ("layca_adam", "monitor_adam") and any(x.dtype == jnp.float16 for x in jax.tree.leaves(params)):
        return  # optax's own scale_by_adam gives 0/0 = NaN in float16 (eps underflows)
    factory = TRANSFORMS[name]
    tx = factory(params) if name in ("layca_adam", "lars") else factory()
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for x in jax.tree.leaves(state):  # monitor figures, norms, moments: finite too
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))), name
    for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
        assert u.dtype == w.dtype and u.shape == w.shape
        assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32)))), name


@settings(max_examples=40, deadline=None)
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
