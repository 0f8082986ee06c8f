"""LCA on a small MLP: conservation, engines agree, per-class sums, exact padded mean, reuse."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_layca import lca


def make_problem(n=150, d=6, h=12, c=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, c, size=n).astype(np.int32)
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    params = {
        "Dense_0": {"kernel": jax.random.normal(k[0], (d, h)) / np.sqrt(d), "bias": jnp.zeros(h)},
        "Dense_1": {"kernel": jax.random.normal(k[1], (h, c)) / np.sqrt(h), "bias": jnp.zeros(c)},
    }

    def loss_fn(p, batch):
        xb, yb = batch
        z = jnp.tanh(xb @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        logits = z @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb)

    return x, y, params, loss_fn


def sgd_trajectory(params, loss_fn, x, y, steps=5, lr=0.5, bs=32):
    opt = optax.sgd(lr, momentum=0.9)
    state = opt.init(params)
    traj = [params]

    @jax.jit
    def step(p, s, xb, yb):
        g = jax.grad(lambda q: jnp.mean(loss_fn(q, (xb, yb))))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for t in range(steps):
        i = (t * bs) % len(x)
        params, state = step(params, state, x[i : i + bs], y[i : i + bs])
        traj.append(params)
    return traj


@pytest.fixture(scope="module")
def problem():
    x, y, params, loss_fn = make_problem()
    return x, y, sgd_trajectory(params, loss_fn, x, y), loss_fn


def test_conservation_every_iteration_with_endpoint_reuse(problem):
    x, y, traj, loss_fn = problem
    rec = lca.LCARecorder(loss_fn, (x, y), batch_size=40, tol=1e-4, keep_results=True)
    rec.start(traj[0])
    for p in traj[1:]:
        rec(p)
    h = rec.history()
    assert h.converged.all()
    np.testing.assert_array_less(np.abs(h.total - h.loss_change), 1e-4)
    np.testing.assert_allclose(h.error, h.loss_change - h.total, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(h.per_layer.sum(1), h.total, rtol=1e-12)
    np.testing.assert_allclose(h.per_leaf.sum(1), h.total, rtol=1e-12)
    assert h.layer_names == ("Dense_0", "Dense_1")  # a layer is a module: kernel + bias
    np.testing.assert_allclose(h.per_layer[:, 0], h.per_leaf[:, 0] + h.per_leaf[:, 1], rtol=1e-12)
    # independent check of the measured loss change
    mean = lambda p: float(np.mean(loss_fn(p, (x, y))))
    np.testing.assert_allclose(
        h.loss_change, [mean(b) - mean(a) for a, b in itertools.pairwise(traj)], atol=2e-6
    )
    # the endpoint gradient of step t is the start of step t + 1: 1 + Σ_t n_t passes
    # (n_t sub-intervals: the end point and n_t − 1 interior points)
    assert rec.evaluator.num_evaluations == 1 + int(h.num_splits.sum())
    # per-parameter LCA sums to per-leaf LCA
    for r in rec.results:
        for path, v in lca.stack_results([r]).per_param.items():
            np.testing.assert_allclose(v.sum(), r.per_leaf[path], rtol=1e-4, atol=1e-7)
    # against a direct (unbatched) Simpson of full-batch gradients
    r0 = rec.results[0]
    p0, p1 = traj[0], traj[1]
    d = jax.tree.map(jnp.subtract, p1, p0)
    g = lambda s: jax.grad(lambda p: jnp.mean(loss_fn(p, (x, y))))(
        jax.tree.map(lambda a, b: a + s * b, p0, d)
    )
    n = int(r0.num_splits)
    w = lca.simpson_weights(n)
    ref = jax.tree.map(
        lambda *gs: sum(wi * gi for wi, gi in zip(w, gs)),
        *[g(s) for s in np.linspace(0, 1, n + 1)],
    )
    jax.tree.map(
        lambda a, b, dd: np.testing.assert_allclose(a, b * dd, rtol=2e-3, atol=1e-6),
        r0.per_param,
        ref,
        d,
    )


def test_jvp_per_layer_equals_grad_per_layer(problem):
    x, y, traj, loss_fn = problem
    for t in (0, 3):
        rg = lca.allocate(loss_fn, traj[t], traj[t + 1], (x, y), engines="grad", batch_size=64)
        rj = lca.allocate(loss_fn, traj[t], traj[t + 1], (x, y), engines="jvp", batch_size=64)
        assert rj.per_param is None
        assert (
            set(rg.per_leaf)
            == set(rj.per_leaf)
            == {"Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"}
        )
        assert set(rg.per_layer) == {"Dense_0", "Dense_1"}
        for k in rg.per_leaf:
            np.testing.assert_allclose(rj.per_leaf[k], rg.per_leaf[k], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(rj.loss_change, rg.loss_change, atol=1e-7)


@pytest.mark.parametrize("strategy", ["jvp", "reverse"])
def test_per_class_sums_to_total(problem, strategy):
    x, y, traj, loss_fn = problem
    r = lca.allocate(
        loss_fn,
        traj[1],
        traj[2],
        (x, y),
        labels=y,
        class_strategy=strategy,
        engines="jvp",
        batch_size=50,
    )
    assert r.per_class_leaf.shape == (3, 4) and r.per_class.shape == (3, 2)
    np.testing.assert_allclose(
        r.per_class_leaf.sum(0), [r.per_leaf[k] for k in r.leaf_names], rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(
        r.per_class.sum(0), [r.per_layer[k] for k in r.layer_names], rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(r.per_class.sum(), r.total, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(r.class_loss_change.sum(), r.loss_change, atol=1e-6)
    np.testing.assert_allclose(r.per_class.sum(1), r.class_loss_change, atol=2e-4)
    # per-class loss = (1/N) Σ_{y_i = c} ℓ_i: independent numpy reference
    ll = np.asarray(loss_fn(traj[2], (x, y)), np.float64) - np.asarray(loss_fn(traj[1], (x, y)))
    np.testing.assert_allclose(
        r.class_loss_change, [ll[y == c].sum() / len(y) for c in range(3)], atol=1e-6
    )


def test_class_strategies_agree(problem):
    x, y, traj, loss_fn = problem
    a = lca.allocate(loss_fn, traj[0], traj[1], (x, y), labels=y, class_strategy="jvp")
    b = lca.allocate(loss_fn, traj[0], traj[1], (x, y), labels=y, class_strategy="reverse")
    np.testing.assert_allclose(a.per_class_leaf, b.per_class_leaf, rtol=1e-4, atol=1e-7)
    assert lca.choose_class_strategy(4, 3) == "jvp"


def test_padded_batch_mean_equals_unbatched(problem):
    x, y, traj, loss_fn = problem
    p = traj[2]
    ref_loss = np.mean(np.asarray(loss_fn(p, (x, y)), np.float64))
    ref_grad = jax.grad(lambda q: jnp.mean(loss_fn(q, (x, y))))(p)
    for bs in (7, 64, 150, 1000):  # 150 = 21·7 + 3: last batch padded and masked
        e = lca.Evaluator(loss_fn, (x, y), batch_size=bs).evaluate(p)
        np.testing.assert_allclose(e.loss, ref_loss, rtol=1e-6)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), e.grad, ref_grad
        )
        assert e.num_examples == 150
    # a list of uneven batches gives the same
    batches = [(x[i : i + 40], y[i : i + 40]) for i in range(0, 150, 40)]
    e = lca.Evaluator(loss_fn, batches).evaluate(p)
    assert e.num_examples == 150
    np.testing.assert_allclose(e.loss, ref_loss, rtol=1e-6)
    gen = lambda: ((x[i : i + 40], y[i : i + 40]) for i in range(0, 150, 40))
    r1 = lca.allocate(loss_fn, traj[0], traj[1], gen, class_fn=lambda b: b[1], num_classes=3)
    r2 = lca.allocate(loss_fn, traj[0], traj[1], (x, y), labels=y, batch_size=40)
    np.testing.assert_allclose(r1.total, r2.total, rtol=1e-5)
    np.testing.assert_allclose(r1.per_class_leaf, r2.per_class_leaf, rtol=1e-4, atol=1e-7)


def test_result_is_a_pytree(problem):
    x, y, traj, loss_fn = problem
    r = lca.allocate(loss_fn, traj[0], traj[1], (x, y))
    r2 = jax.tree.map(lambda v: v, r)
    assert r2.leaf_names == r.leaf_names and r2.per_layer == r.per_layer
    assert jax.device_get(r).total == r.total


def test_no_retrace_across_iterations(problem):
    x, y, traj, loss_fn = problem
    ev = lca.Evaluator(loss_fn, (x, y), batch_size=50)
    rec = lca.LCARecorder(None, ev)
    rec.start(traj[0])
    rec(traj[1])
    size = ev.kernels.step._cache_size()
    for p in traj[2:]:
        rec(p)
    assert ev.kernels.step._cache_size() == size


def test_jvp_loop_and_vmap_paths_agree(problem, monkeypatch):
    from optax_layca.lca import _engines

    x, y, traj, loss_fn = problem
    a = lca.allocate(
        loss_fn, traj[0], traj[1], (x, y), engines="jvp", labels=y, class_strategy="jvp"
    )
    monkeypatch.setattr(_engines, "LOOP_MAX_LEAVES", 0)  # force vmap over leaf masks
    b = lca.allocate(
        loss_fn, traj[0], traj[1], (x, y), engines="jvp", labels=y, class_strategy="jvp"
    )
    np.testing.assert_allclose(a.per_class_leaf, b.per_class_leaf, rtol=1e-5, atol=1e-8)
    for k in a.per_leaf:
        np.testing.assert_allclose(a.per_leaf[k], b.per_leaf[k], rtol=1e-5, atol=1e-8)
