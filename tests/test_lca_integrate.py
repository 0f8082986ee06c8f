"""LCA integration maths: closed forms for quadratic, cubic, quintic and linear-regression losses."""

import jax.numpy as jnp
import numpy as np
import pytest

from optax_layca import lca


def _linreg(n=64, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=d) + 0.1 * rng.normal(size=n)).astype(np.float32)
    return x, y


def _linreg_loss(p, batch):
    x, y = batch
    return 0.5 * (x @ p["w"] + p["b"] - y) ** 2


def test_simpson_weights():
    for n in (2, 4, 8, 16):  # sub-intervals, the authors' num_splits
        w = lca.simpson_weights(n)
        np.testing.assert_allclose(w.sum(), 1.0)
        np.testing.assert_allclose(w * 3 * n, [1] + [4, 2] * (n // 2 - 1) + [4, 1])
    for bad in (0, 1, 3):
        with pytest.raises(ValueError, match="num_splits"):
            lca.simpson_weights(bad)


def test_linear_regression_per_param_closed_form():
    """Known GD trajectory of least squares: A_i = Δθ_i (∇L(θ_t) + ∇L(θ_{t+1}))_i / 2 exactly."""
    x, y = _linreg()
    n = len(y)
    xa = np.concatenate([x, np.ones((n, 1), np.float32)], 1).astype(np.float64)
    hess = xa.T @ xa / n
    lin = xa.T @ y.astype(np.float64) / n
    grad = lambda th: hess @ th - lin
    loss = lambda th: 0.5 * np.mean((xa @ th - y) ** 2)
    theta = np.zeros(6)
    traj = [theta]
    for _ in range(4):  # closed-form trajectory of full-batch GD, lr 0.3
        theta = theta - 0.3 * grad(theta)
        traj.append(theta)
    to_p = lambda th: {"w": jnp.asarray(th[:5], jnp.float32), "b": jnp.asarray(th[5], jnp.float32)}
    for t in range(4):
        t0, t1 = (np.asarray(np.float32(v), np.float64) for v in (traj[t], traj[t + 1]))
        r = lca.allocate(_linreg_loss, to_p(t0), to_p(t1), (x, y), batch_size=16)
        delta = t1 - t0
        expected = delta * (grad(t0) + grad(t1)) / 2
        got = np.concatenate([np.asarray(r.per_param["w"]), [float(r.per_param["b"])]])
        np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(r.per_layer["w"], expected[:5].sum(), rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(r.loss_change, loss(t1) - loss(t0), rtol=1e-4, atol=1e-6)
        assert r.num_splits == 2 and r.converged
        # first order: error = ΔL − Σ LCA = +½ Δθᵀ H Δθ exactly (quadratic loss; the authors'
        # sign, Table S1)
        fo = lca.allocate(_linreg_loss, to_p(t0), to_p(t1), (x, y), method="first_order")
        assert fo.num_splits == 1
        np.testing.assert_allclose(fo.error, 0.5 * delta @ hess @ delta, rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(
            np.concatenate([np.asarray(fo.per_param["w"]), [float(fo.per_param["b"])]]),
            delta * grad(t0),
            rtol=2e-4,
            atol=1e-6,
        )


def test_quadratic_rk4_exact():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 4)).astype(np.float32)
    data = np.ones((10, 1), np.float32)
    loss = lambda p, b: b[:, 0] * (jnp.sum((a @ p) ** 2) + jnp.sum(p))
    p0, p1 = (
        jnp.asarray(rng.normal(size=4), jnp.float32),
        jnp.asarray(rng.normal(size=4), jnp.float32),
    )
    r = lca.allocate(loss, p0, p1, data, tol=1e-6, max_splits=2)
    assert abs(r.error) < 1e-4 * max(1.0, abs(r.loss_change))
    h = 2 * a.T @ a
    d = np.asarray(p1 - p0, np.float64)
    g0 = h @ np.asarray(p0, np.float64) + 1
    np.testing.assert_allclose(
        np.asarray(r.per_param), d * (g0 + 0.5 * h @ d), rtol=1e-4, atol=1e-5
    )


def test_cubic_simpson_exact():
    """Cubic loss: the integrand is quadratic in s, so Simpson (RK4) is exact with no halving."""
    data = np.ones((3, 1), np.float32)
    loss = lambda p, b: b[:, 0] * jnp.sum(p**3 - 2 * p**2)
    p0, p1 = jnp.array([0.5, -1.0, 2.0]), jnp.array([1.5, 0.5, 1.0])
    r = lca.allocate(loss, p0, p1, data, tol=1e-5)
    assert r.num_splits == 2 and r.converged
    f = lambda v: v**3 - 2 * v**2
    np.testing.assert_allclose(
        np.asarray(r.per_param), f(np.asarray(p1)) - f(np.asarray(p0)), rtol=1e-5, atol=1e-5
    )


def test_quintic_composite_simpson_halving_matches_closed_form():
    """L = θ⁵ from 0 to 1: composite Simpson on n sub-intervals over-estimates by h⁴/180 · 120,
    h = 1/n, so error = ΔL − Σ LCA = −h⁴ · 2/3."""
    data = np.ones((2, 1), np.float32)
    loss = lambda p, b: b[:, 0] * jnp.sum(p**5)
    p0, p1 = jnp.zeros(1), jnp.ones(1)
    for n in (2, 4, 8, 16):
        r = lca.allocate(loss, p0, p1, data, tol=1e-12, max_splits=n)
        assert r.num_splits == n and not r.converged
        np.testing.assert_allclose(r.error, -((1 / n) ** 4) * 120 / 180, rtol=2e-3)
        assert abs(r.error) > r.noise_floor
    r = lca.allocate(loss, p0, p1, data, tol=1e-3)  # halving stops at n = 8 (err 1.6e-4)
    assert r.num_splits == 8 and r.converged
    r = lca.allocate(loss, p0, p1, data, tol=1e-3, max_splits=7)  # cap: largest 2^k <= 7
    assert r.num_splits == 4 and not r.converged
    fo = lca.allocate(loss, p0, p1, data, method="first_order")
    np.testing.assert_allclose(fo.error, 1.0, atol=1e-6)  # ∇L(0)·Δ = 0, ΔL = 1


def test_halving_reuses_points():
    ev = lca.Evaluator(lambda p, b: b[:, 0] * jnp.sum(p**5), np.ones((2, 1), np.float32))
    r = lca.allocate(None, jnp.zeros(1), jnp.ones(1), ev, tol=1e-3)
    assert r.num_splits == 8
    # start + end + midpoint, then 2 + 4 new points: n + 1 = 9 distinct points, none twice
    assert ev.num_evaluations == 9


def _big_linreg(scale, n=1000, d=50, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (scale * rng.normal(size=n)).astype(np.float32)
    p0 = jnp.zeros(d)
    p1 = jnp.asarray(rng.normal(size=d) * 0.01 * scale, jnp.float32)
    loss = lambda p, b: 0.5 * (b[0] @ p - b[1]) ** 2
    return x, y, p0, p1, loss


@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_noise_floor_bounds_rounding_and_stops_halving(scale):
    """A quadratic loss: Simpson is exact, so any error is float32 rounding. With losses of
    ~5e7 the rounding (~0.3) exceeds tol = 1e-3; v0.1 halved to its cap (65 passes) chasing it."""
    x, y, p0, p1, loss = _big_linreg(scale)
    ev = lca.Evaluator(loss, (x, y), batch_size=128)
    r = lca.allocate(None, p0, p1, ev)
    assert r.num_splits == 2 and ev.num_evaluations == 3
    assert abs(r.error) <= r.noise_floor and r.converged
    # the measured change is accurate to the floor's first term: (u32 + N u64)(S0 + S1)/N
    xd, yd = x.astype(np.float64), y.astype(np.float64)
    ell = lambda p: 0.5 * (xd @ np.asarray(p, np.float64) - yd) ** 2
    exact = ell(p1).mean() - ell(p0).mean()
    measured_floor = (2.0**-24 + len(y) * 2.0**-53) * (ell(p0).sum() + ell(p1).sum()) / len(y)
    assert abs(r.loss_change - exact) <= measured_floor <= r.noise_floor
    # a tolerance below the floor is no reason to halve either
    assert lca.allocate(None, p0, p1, ev, tol=1e-12).num_splits == 2


def test_relative_error_is_defined_when_the_loss_does_not_change():
    data = np.ones((4, 1), np.float32)
    loss = lambda p, b: b[:, 0] * jnp.sum(p**2)  # even: L(−1) = L(1)
    r = lca.allocate(loss, -jnp.ones(2), jnp.ones(2), data)
    assert r.loss_change == 0.0 and np.isfinite(r.relative_error)
    assert abs(r.relative_error) <= 1.0  # error within the noise floor
    same = lca.allocate(loss, jnp.ones(2), jnp.ones(2), data)
    assert same.loss_change == 0.0 and same.error == 0.0 and same.relative_error == 0.0
    h = lca.stack_results([r, same])
    assert np.isfinite(h.summary()["cumulative_error_pct"])


def test_joint_train_test_lca_and_test_error_in_the_halving():
    """θ⁵ from 0 to 1: the training loss is scaled by 1e-3 (its RK4 error 4e-5 < tol), the test
    loss is not (RK4 error 0.042): the authors' criterion max(|err_train|, |err_test|) halves."""
    loss = lambda p, b: b[:, 0] * jnp.sum(p**5)
    train, test = np.full((3, 1), 1e-3, np.float32), np.ones((2, 1), np.float32)
    p0, p1 = jnp.zeros(1), jnp.ones(1)
    r = lca.allocate(loss, p0, p1, train, test_data=test)
    assert r.num_splits == 8 and r.converged and r.test.converged
    np.testing.assert_allclose(r.test.loss_change, 1.0, rtol=1e-6)
    np.testing.assert_allclose(r.loss_change, 1e-3, rtol=1e-6)
    np.testing.assert_allclose(r.test.error, -((1 / 8) ** 4) * 2 / 3, rtol=2e-3)
    np.testing.assert_allclose(np.asarray(r.test.per_param), 1 + (1 / 8) ** 4 * 2 / 3, rtol=1e-5)
    only_train = lca.allocate(loss, p0, p1, train, test_data=test, refine_on_test=False)
    assert only_train.num_splits == 2 and not only_train.test.converged
    np.testing.assert_allclose(only_train.test.error, -((1 / 2) ** 4) * 2 / 3, rtol=2e-3)


def test_joint_lca_with_classes_and_a_recorder():
    x, y = _linreg(n=60, seed=2)
    xt, yt = _linreg(n=30, seed=3)
    labels, test_labels = (x[:, 0] > 0).astype(np.int32), (xt[:, 0] > 0).astype(np.int32)
    p = [{"w": jnp.full(5, v, jnp.float32), "b": jnp.float32(v)} for v in (0.0, 0.1, 0.25)]
    rec = lca.LCARecorder(
        _linreg_loss,
        (x, y),
        labels=labels,
        test_data=(xt, yt),
        test_labels=test_labels,
        class_strategy="reverse",
    )
    rec.start(p[0])
    for q in p[1:]:
        rec(q)
    h = rec.history()
    assert h.test is not None and h.test.per_class_leaf.shape == (2, 2, 2)
    # endpoint reuse on both sets (direction-free per-class gradients): start + 2 points per
    # step, on train and on test
    assert rec.evaluators[0].num_evaluations == rec.evaluators[1].num_evaluations == 1 + 2 * 2
    ell = lambda q, xx, yy: 0.5 * (xx @ np.asarray(q["w"]) + float(q["b"]) - yy) ** 2
    for t in range(2):
        d = ell(p[t + 1], xt, yt) - ell(p[t], xt, yt)
        np.testing.assert_allclose(h.test.loss_change[t], d.mean(), rtol=1e-5)
        np.testing.assert_allclose(
            h.test.class_loss_change[t],
            [d[test_labels == c].sum() / len(yt) for c in (0, 1)],
            rtol=1e-5,
        )
        np.testing.assert_allclose(h.test.per_class[t].sum(), h.test.total[t], rtol=1e-6)
