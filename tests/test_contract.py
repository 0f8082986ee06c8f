"""One contract for every transform and alias (the table ``TRANSFORMS`` in ``conftest.py``).

After optax's ``optax/contrib/_common_test.py``: each entry converges on a small problem where
that is meaningful, compiles once over many steps, ignores extra ``update`` arguments (as
optimistix and ``reduce_on_plateau`` pass them), equals its ``inject_hyperparams`` form, works
under ``optax.masked``/``optax.partition``/``optax.tree.map_params`` (empty trees included),
``optax.MultiSteps`` and ``optax.apply_if_finite``, requires ``params`` where it reads them,
keeps bfloat16/float16/float32/float64 and its state's dtypes, runs under strict dtype
promotion, and names the leaf when a tree does not match.

The problem: ``½ Σ ‖p − t‖²`` over an MLP-shaped tree, whose target kernels have the initial
kernels' norms (reachable on Layca's spheres) and whose target biases are arbitrary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _utils import (
    assert_tree_dtypes,
    assert_tree_finite,
    assert_trees_close,
    assert_trees_close_rel,
    flat,
    subtree,
)
from conftest import SIZES, STEPS, TRANSFORMS

# Two float32 programs computing the same update with different fusion (a wrapper's lax.cond,
# a masked tree): each per-layer reduction (n ≤ 20 terms) is within n·eps·Σ|x| of the other,
# i.e. ~20 · 1.2e-7 · ‖w‖, against updates of norm ≳ 0.3‖w‖ (step 0): 1e-5 of ‖u‖ per leaf.
SAME_MATHS = 1e-5

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
# Shape of every state leaf, with its dtype: must not change across steps (no retrace, no
# scan carry mismatch), as optax's ``test_state_shape_dtype_shard_stability`` asks.
avals = lambda tree: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def target(params):
    """Kernels: a random direction at each kernel's own norm; biases: random."""
    rng = np.random.default_rng(42)
    out = {}
    for name, layer in params.items():
        k = rng.standard_normal(np.shape(layer["kernel"]))
        k *= np.linalg.norm(np.asarray(layer["kernel"], np.float64)) / np.linalg.norm(k)
        out[name] = {"kernel": k.astype(np.float32),
                     "bias": rng.standard_normal(np.shape(layer["bias"])).astype(np.float32)}
    return out


def loss(p, t):
    return sum(0.5 * jnp.sum((a - b.astype(a.dtype)) ** 2)
               for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(t)))


def cast(tree, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


@functools.cache
def compiled(name: str):
    """(transform, its jitted ``update``) per entry, shared by the tests below: one
    compilation per entry and input dtype (an un-jitted update re-traces its ``lax.cond``s on
    every call)."""
    entry = next(e for e in TRANSFORMS if e.name == name)
    tx = entry.make()
    return tx, jax.jit(tx.update)


def first_update(entry, g, params):
    tx, update = compiled(entry.name)
    return update(g, tx.init(params), params)[0]


@pytest.fixture(scope="module")
def problem(mlp_params):
    """(params, target, gradient at params) of the contract problem, float32."""
    t = target(mlp_params)
    return mlp_params, t, jax.grad(loss)(mlp_params, t)


def test_converges_with_a_single_trace(entry, problem):
    params, t, _ = problem
    tx = entry.make()
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)  # runs only while tracing
        u, s = tx.update(jax.grad(loss)(p, t), s, p)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(STEPS if entry.converges else 3):
        p, s = step(p, s)
    assert len(traces) == 1
    assert_tree_finite(p)
    if entry.converges:
        # From ‖p − t‖ ≈ √2 ‖t‖ (kernels) down to 5% of ‖t‖ per leaf: a convergence criterion,
        # not a float tolerance (the last steps are ~3e-4 rad).
        for k, v in flat(p).items():
            err = np.linalg.norm(v - flat(t)[k]) / np.linalg.norm(flat(t)[k])
            assert err < 0.05, f"{entry.name}: leaf {k} at {err:.3g} of its target norm"


def test_extra_update_arguments_are_ignored(entry, problem):
    params, t, g = problem
    tx, _ = compiled(entry.name)
    value_fn = functools.partial(loss, t=t)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, value=value_fn(p), grad=g,
                                               value_fn=value_fn, unknown_arg=1))
    got, _ = update(g, tx.init(params), params)
    assert_trees_close(got, first_update(entry, g, params), rtol=0)  # extra args change nothing


def test_inject_hyperparams_equivalence(entry, problem):
    """Under ``jit``, where every float hyperparameter (defaults included) is traced."""
    params, _, g = problem
    tx, update = compiled(entry.name)
    txi = entry.injected()
    s, si = tx.init(params), jax.jit(txi.init)(params)
    update_i = jax.jit(txi.update)
    for _ in range(2):
        u, s = update(g, s, params)
        ui, si = update_i(g, si, params)
        # a traced hyperparameter only changes what XLA can fold
        assert_trees_close_rel(ui, u, tol=SAME_MATHS)


def _labels(tree, mask_out, inside, outside):
    return {name: {leaf: (outside if f"{name}/{leaf}" in mask_out else inside) for leaf in d}
            for name, d in tree.items()}


def test_masked_and_partition_equal_the_transform_on_the_subtree(entry, problem):
    params, _, g = problem
    keep = [k for k in flat(params) if k not in entry.mask_out]
    sub = subtree(params, keep)
    expected = first_update(entry, subtree(g, keep), sub)
    tx = optax.masked(entry.make(), _labels(params, entry.mask_out, True, False))
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    assert_trees_close_rel(subtree(u, keep), expected, tol=SAME_MATHS)
    assert_trees_close(subtree(u, entry.mask_out), subtree(g, entry.mask_out), rtol=0)
    labels = _labels(params, entry.mask_out, "ours", "sgd")
    tx = optax.partition({"ours": entry.make(), "sgd": optax.sgd(0.1)}, labels)
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    assert_trees_close_rel(subtree(u, keep), expected, tol=SAME_MATHS)
    sgd = jax.tree.map(lambda x: -0.1 * x, subtree(g, entry.mask_out))
    assert_trees_close(subtree(u, entry.mask_out), sgd, rtol=1e-6)  # one product: 1 ulp


def test_empty_trees(entry, problem):
    """``optax.masked(tx, {})``, a partition label no leaf uses, ``optax.tree.map_params``."""
    params, _, g = problem
    for empty in ({}, [], ()):
        tx = optax.masked(entry.make(), empty)
        u, _ = tx.update(empty, tx.init(empty), empty)
        assert u == empty
    tx = optax.partition({"ours": entry.make(), "sgd": optax.sgd(0.1)},
                         jax.tree.map(lambda _: "sgd", params))
    u, _ = tx.update(g, tx.init(params), params)
    assert_trees_close(u, jax.tree.map(lambda x: -0.1 * x, g), rtol=1e-6)
    tx = entry.make()
    state = tx.init(params)
    if entry.maps_params:
        mapped = optax.tree.map_params(tx, lambda v: v, state)
        assert jax.tree.structure(mapped) == jax.tree.structure(state)


def test_multisteps_applies_the_mean_gradient(entry, problem):
    params, _, g1 = problem
    g2 = jax.tree.map(lambda x: 0.5 - 2.0 * x, g1)
    tx = optax.MultiSteps(entry.make(), every_k_schedule=2)
    update = jax.jit(tx.update)
    s = tx.init(params)
    u1, s = update(g1, s, params)
    assert all(np.all(v == 0) for v in flat(u1).values())
    u2, s = update(g2, s, params)
    expected = first_update(entry, jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), params)
    # MultiSteps averages as acc + (g − acc)/k: the mean differs by ≤ 1 ulp from (a + b)/2,
    # far below SAME_MATHS.
    assert_trees_close_rel(u2, expected, tol=SAME_MATHS)


def test_apply_if_finite_skips_a_non_finite_step(entry, problem):
    params, _, g = problem
    tx = optax.apply_if_finite(entry.make(), max_consecutive_errors=3)
    update = jax.jit(tx.update)
    s = tx.init(params)
    bad = jax.tree.map(jnp.asarray, g)
    bad["Dense_1"]["kernel"] = bad["Dense_1"]["kernel"].at[0, 0].set(jnp.inf)
    u, s = update(bad, s, params)
    assert all(np.all(v == 0) for v in flat(u).values())
    assert int(s.notfinite_count) == 1
    u, s = update(g, s, params)
    # the inner state was left untouched: this is the first step of a fresh transform
    assert_trees_close_rel(u, first_update(entry, g, params), tol=SAME_MATHS)
    assert int(s.notfinite_count) == 0


def test_params_are_required_where_read(entry, problem):
    params, _, g = problem
    tx, update = compiled(entry.name)
    state = tx.init(params)
    if entry.needs_params:
        with pytest.raises(ValueError, match="reads the current parameters"):
            tx.update(g, state)
    else:
        u, _ = update(g, state)
        assert_trees_close(u, first_update(entry, g, params), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dtype_of_updates_and_state_is_kept(entry, problem, dtype):
    params, _, g = problem
    p, gd = cast(params, dtype), cast(g, dtype)
    tx, update = compiled(entry.name)
    s0 = tx.init(p)
    u, s1 = update(gd, s0, p)
    _, s2 = update(gd, s1, p)
    assert_tree_dtypes(u, jnp.dtype(dtype))
    assert avals(s1) == avals(s0) == avals(s2)
    # optax's own scale_by_adam divides 0/0 in float16 (its eps underflows): not ours.
    if not (dtype == jnp.float16 and "adam" in entry.name):
        assert_tree_finite(u)


def test_float64_is_computed_in_float64(entry, problem):
    """With x64 on, float64 params stay float64 through every reduction.

    Norm-keeping transforms put each layer back on its initial sphere: in float64 to
    ~n·eps64 (n = 20 terms, eps = 1.1e-16, so 1e-12 is ample), where float32 maths would leave
    ~1e-7.
    """
    params, _, g = problem
    with jax.enable_x64(True):
        p, gd = cast(params, jnp.float64), cast(g, jnp.float64)
        tx = entry.make()
        s0 = tx.init(p)
        u, s1 = jax.jit(tx.update)(gd, s0, p)
        assert_tree_dtypes(u, jnp.dtype(jnp.float64))
        assert avals(s1) == avals(s0)
        if entry.norm_keeping:
            for name in p:
                w = np.asarray(p[name]["kernel"])
                new = w + np.asarray(u[name]["kernel"])
                np.testing.assert_allclose(np.linalg.norm(new), np.linalg.norm(w), rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_strict_dtype_promotion(entry, problem, dtype):
    """Our transforms never rely on implicit promotion (optax's scale_by_adam does: skipped)."""
    if not entry.strict:
        pytest.skip("contains an optax transform that needs standard promotion")
    params, _, g = problem
    p, gd = cast(params, dtype), cast(g, dtype)
    with jax.numpy_dtype_promotion("strict"):
        tx = entry.make()
        u, _ = jax.jit(tx.update)(gd, tx.init(p), p)
    assert_tree_dtypes(u, jnp.dtype(dtype))


def _with(tree, path, value):
    out = jax.tree.map(lambda x: x, tree)
    name, leaf = path.split("/")
    out[name] = {**out[name], leaf: value}
    return out


def test_tree_mismatches_name_the_leaf(entry, problem):
    params, _, g = problem
    tx, _ = compiled(entry.name)
    state = tx.init(params)
    if not (entry.needs_params or entry.checks_init):
        return  # a plain optax chain (sgd_amom): optax's own tree errors apply
    missing = {k: dict(v) for k, v in g.items()}
    del missing["Dense_1"]["bias"]
    with pytest.raises(ValueError, match="Dense_1/bias"):
        tx.update(missing, state, params)
    wrong = _with(g, "Dense_0/kernel", jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"Dense_0/kernel.*\(2, 5\)"):
        tx.update(wrong, state, params)
    if not entry.checks_init:
        return
    grown = {**params, "Dense_2": {"kernel": np.ones((3, 2), np.float32),
                                   "bias": np.ones(2, np.float32)}}
    with pytest.raises(ValueError, match="Dense_2"):
        tx.update(grown, state, grown)
    if entry.name != "scale_by_layer_multipliers":  # its state holds depths, not shapes
        deeper = _with(params, "Dense_0/kernel", params["Dense_0"]["kernel"][..., None])
        with pytest.raises(ValueError, match="Dense_0/kernel"):
            tx.update(deeper, state, deeper)


def test_contract_problem_is_well_posed(mlp_params):
    """Sanity of the harness: the target kernels have the initial norms, the gradient is p − t."""
    t = target(mlp_params)
    for k, v in flat(mlp_params).items():
        if k.endswith("kernel"):
            np.testing.assert_allclose(np.linalg.norm(flat(t)[k]), np.linalg.norm(v), rtol=1e-6)
    g = jax.grad(loss)(mlp_params, t)
    assert_trees_close(g, jax.tree.map(lambda a, b: a - b, mlp_params, t), rtol=1e-6)
    assert tuple(np.shape(mlp_params["Dense_0"]["kernel"])) == SIZES[:2]


def test_state_can_be_donated(entry, problem):
    """Every state leaf owns its buffer: a jitted step may donate params and state (XLA refuses
    to donate one buffer twice, e.g. a depth array shared by a kernel and its bias)."""
    params, _, g = problem
    tx = entry.make()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = step(jax.tree.map(jnp.copy, params), tx.init(params))
    p, s = step(p, s)
    assert_tree_finite(p)
