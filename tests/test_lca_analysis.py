"""Analyses (helping fraction, cumulative, per neuron, oscillations, tails, moments, Table S1)
against hand counts, and the figures."""

import matplotlib
import numpy as np
import pytest
from test_lca_mlp import make_problem, sgd_trajectory

import optax_layca.plot as oplot
from optax_layca import lca


def _hist(per_param, per_layer=None):
    t = next(iter(per_param.values())).shape[0]
    names = tuple(per_param)
    if per_layer is None:
        per_layer = np.stack([v.reshape(t, -1).sum(1) for v in per_param.values()], 1)
    z = np.zeros(t)
    return lca.LCAHistory(
        names,
        per_layer,
        per_layer.sum(1),
        per_layer.sum(1),
        z,
        z,
        z,
        np.full(t, 2),
        np.ones(t, bool),
        per_param=per_param,
        iterations=np.arange(t),
    )


def test_helping_fraction_and_per_layer_counts():
    pp = {
        "a": np.array([[[-1.0, 1.0], [0.0, -2.0]], [[1.0, 1.0], [1.0, 1.0]]]),
        "b": np.array([[-1.0, -1.0], [0.0, 0.0]]),
    }
    f = lca.helping_fraction(_hist(pp))
    np.testing.assert_allclose(f.helping, [4 / 6, 0])
    np.testing.assert_allclose(f.hurting, [1 / 6, 4 / 6])
    np.testing.assert_allclose(f.zero, [1 / 6, 2 / 6])
    np.testing.assert_allclose(f.layer_helping, [[0.5, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(f.helping + f.hurting + f.zero, 1.0)
    z = lca.helping_fraction(_hist(pp), zero_tol=1.5)
    np.testing.assert_allclose(z.helping, [1 / 6, 0])
    frac = lca.fraction_of_iterations_helping(_hist(pp))
    np.testing.assert_allclose(frac["b"], [0.5, 0.5])
    neurons = lca.per_neuron(_hist(pp), "a")
    np.testing.assert_allclose(neurons, [[-1.0, -1.0], [2.0, 2.0]])
    np.testing.assert_allclose(lca.per_neuron(_hist(pp), "a", axis=0), [[0.0, -2.0], [2.0, 2.0]])
    cum = lca.cumulative_per_layer(_hist(pp))
    np.testing.assert_allclose(cum["a"], [-2.0, 2.0])


def test_oscillations_counts():
    motion = {"w": np.array([[1.0, 1.0], [-1.0, 1.0], [0.0, 1.0], [1.0, -1.0]])}
    grad = {"w": np.array([[1.0, -1.0], [1.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]])}
    o = lca.oscillations(motion, grad)
    np.testing.assert_array_equal(o.motion_changes["w"], [2, 1])
    np.testing.assert_array_equal(o.grad_changes["w"], [1, 2])
    assert o.iterations_per_motion_change == pytest.approx(8 / 3)


def test_tail_heaviness_vs_gaussian_and_laplace_closed_forms():
    rng = np.random.default_rng(0)
    n = 400_000
    g = lca.tail_heaviness(rng.normal(size=(3, n)))
    # sampling error of a tail mean from ~1,000 tail values: a few % (5σ bounds below)
    np.testing.assert_allclose(g.kurtosis, 0.0, atol=0.05)
    np.testing.assert_allclose(g.frac_beyond, 0.0027, rtol=0.1)
    np.testing.assert_allclose(g.tail_vs_gaussian, 1.0, rtol=0.12)
    np.testing.assert_allclose(g.tail_share_ratio, 1.0, rtol=0.12)
    # Laplace(b): σ = √2 b, E[|X|; |X| > t] = (t + b) e^{−t/b}, E|X| = b; z = 3
    b, z = 1.0, 3.0
    t = z * np.sqrt(2) * b
    tail = (t + b) * np.exp(-t / b)
    gauss = 2 * np.sqrt(2) * b * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    lap = lca.tail_heaviness(rng.laplace(scale=b, size=(2, n)), z=z)
    np.testing.assert_allclose(lap.tail_vs_gaussian, tail / gauss, rtol=0.1)
    np.testing.assert_allclose(lap.tail_share, tail / b, rtol=0.1)
    np.testing.assert_allclose(lap.tail_share_ratio, tail / b / np.exp(-z * z / 2), rtol=0.1)
    np.testing.assert_allclose(lap.kurtosis, 3.0, rtol=0.15)
    # share_ratio = tail_vs_gaussian · σ√(2/π) / E|d|: the share ratio also grows as the bulk
    # narrows (Laplace: σ√(2/π)/E|d| = 2/√π)
    np.testing.assert_allclose(
        lap.tail_share_ratio / lap.tail_vs_gaussian, 2 / np.sqrt(np.pi), rtol=0.02
    )
    flat = lca.tail_heaviness(np.ones((1, 10)))
    assert np.isnan(flat.tail_vs_gaussian).all()
    with pytest.raises(ValueError, match="must be > 0"):
        lca.tail_heaviness(np.ones((1, 10)), z=0)


def test_weibull_fit_recovers_shapes():
    rng = np.random.default_rng(1)
    n = 60_000
    mags = np.concatenate([rng.weibull(0.6, size=n) * 2.0, rng.weibull(1.3, size=n) * 0.5])
    signs = np.concatenate([-np.ones(n), np.ones(n)])
    x = (mags * signs)[None]
    f = lca.weibull_fit(x)
    # MLE of the shape from n values: sd ≈ 0.78 k / √n (≈ 0.2% here); 3% is > 10 sd
    np.testing.assert_allclose(f.helping_shape, 0.6, rtol=0.03)
    np.testing.assert_allclose(f.helping_scale, 2.0, rtol=0.05)
    np.testing.assert_allclose(f.hurting_shape, 1.3, rtol=0.03)
    np.testing.assert_allclose(f.hurting_scale, 0.5, rtol=0.05)
    assert (f.helping_loglik_gain > 0).all()  # heavy tails: Weibull beats the half-normal
    # Gaussian LCA: the half-normal is the true model of the magnitudes, the Weibull loses
    gauss = lca.weibull_fit(rng.normal(size=(1, n)), max_samples=20_000)
    assert (gauss.helping_loglik_gain < 0).all() and (gauss.hurting_loglik_gain < 0).all()


def test_moments_of_learning_synchronised_vs_shift_baseline():
    rng = np.random.default_rng(0)
    t, k = 200, 4
    curves = rng.normal(scale=0.01, size=(t, k))
    spikes = rng.choice(np.arange(3, t - 3), size=15, replace=False)
    curves[spikes] -= 1.0  # learning peaks on the same iterations in every layer
    m = lca.moments_of_learning(curves, k=15, num_shuffles=400)
    assert m.moments.shape == (t, k) and m.moments.sum(0).tolist() == [15] * k
    assert set(np.flatnonzero(m.moments[:, 0])) == set(spikes)
    assert m.num_synchronized == 60
    # closed form of the shift baseline for perfectly aligned layers: a moment stays
    # synchronised iff another of the 3 layers drew the same of the 4 shifts
    np.testing.assert_allclose(m.baseline.mean(), 60 * (1 - (3 / 4) ** 3), atol=3.0)
    # baseline reaches 60 iff every layer has a partner: all equal (4) or two pairs (36) of 4^4
    np.testing.assert_allclose(m.p_value, 40 / 256, atol=0.05)
    # independent layers: no more synchronization than the baseline
    ind = lca.moments_of_learning(rng.normal(size=(t, k)), k=15, num_shuffles=100)
    assert ind.p_value > 0.02
    with pytest.raises(ValueError, match="no layer"):
        lca.moments_of_learning(curves[:, :0])
    # per-class: [T, C, K]
    pc = lca.moments_of_learning(np.stack([curves, curves[::-1]], 1), k=15, num_shuffles=10)
    assert pc.moments.shape == (2, t, k) and pc.num_synchronized == 120


def test_error_table_and_figures_on_mlp(tmp_path):
    x, y, params, loss_fn = make_problem(n=120, seed=2)
    traj = sgd_trajectory(params, loss_fn, x, y, steps=6, lr=1.0)
    ev = lca.Evaluator(loss_fn, (x, y), labels=y)
    runs = {
        m: lca.allocate_trajectory(
            None, traj, ev, method=m, progress=False, store_per_param=True, directory=tmp_path / m
        )
        for m in ("rk4", "first_order")
    }
    rows, md = lca.error_table({"MLP, SGD": runs})
    assert abs(rows[0].total_error_rk4_pct) < abs(rows[0].total_error_fo_pct)
    # first order overshoots a decreasing loss: ΣLCA < ΔL < 0, error = ΔL − ΣLCA > 0, and the
    # percentage of the (negative) change is negative, as in the authors' Table S1
    assert (runs["first_order"].error > 0).mean() > 0.5 and rows[0].total_error_fo_pct < 0
    assert rows[0].mean_iteration_error_rk4 < 1e-3 < rows[0].mean_iteration_error_fo
    assert "Total error, RK4" in md and "MLP, SGD" in md
    h = runs["rk4"]
    s = h.summary()
    assert s["num_unconverged"] == 0 and abs(s["cumulative_error_pct"]) < 1.0
    assert h.per_class_leaf.shape == (6, 3, 4) and h.per_class.shape == (6, 3, 2)
    assert h.per_param["Dense_0/kernel"].shape == (6, 6, 12)
    # module views: a neuron is its kernel column plus its bias (authors' get_neurons_plus_biases)
    pp = h.per_param
    np.testing.assert_allclose(
        lca.per_neuron(h, "Dense_0"), pp["Dense_0/kernel"].sum(1) + pp["Dense_0/bias"], rtol=1e-6
    )
    f_layer, f_leaf = lca.helping_fraction(h), lca.helping_fraction(h, level="leaf")
    assert f_layer.layer_names == ("Dense_0", "Dense_1") and len(f_leaf.layer_names) == 4
    np.testing.assert_allclose(f_layer.helping, f_leaf.helping)
    n0 = pp["Dense_0/kernel"][0].size + pp["Dense_0/bias"][0].size
    np.testing.assert_allclose(
        f_layer.layer_helping[:, 0],
        ((pp["Dense_0/kernel"] < 0).sum((1, 2)) + (pp["Dense_0/bias"] < 0).sum(1)) / n0,
    )
    cum = lca.cumulative_per_layer(h)
    np.testing.assert_allclose(cum["Dense_1"], np.cumsum(h.per_layer[:, 1]))
    assert set(lca.cumulative_per_layer(h, level="leaf")) == set(h.leaf_names)
    m = lca.moments_of_learning(h, k=2, num_shuffles=5)
    assert m.moments.shape == (3, 6, 2)  # classes × iterations × modules
    figs = [
        oplot.lca_per_layer_figure(h),
        oplot.helping_fraction_figure(h),
        oplot.lca_heatmap_figure(h, "Dense_0/kernel", 2),
        oplot.lca_heatmap_figure(h, "Dense_1/bias", cumulative=True),
        oplot.moments_raster_figure(lca.moments_of_learning(h, k=2, num_shuffles=5)),
        oplot.moments_raster_figure(
            lca.moments_of_learning(h.per_layer, k=2, num_shuffles=5), layer_names=h.layer_names
        ),
    ]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figs)
    for name in (
        "lca_per_layer_figure",
        "helping_fraction_figure",
        "lca_heatmap_figure",
        "moments_raster_figure",
    ):
        assert name in oplot._lca.__all__
    with pytest.raises(ValueError, match="not a parameter leaf"):
        oplot.lca_heatmap_figure(h, "nope")
    # Each figure takes what the matching analysis returns, and draws the same thing.
    bars = lambda fig: [p.get_height() for p in fig.axes[0].patches]
    assert bars(oplot.lca_per_layer_figure(cum)) == bars(figs[0])
    np.testing.assert_allclose(bars(figs[0]), [cum[n][-1] for n in h.layer_names])
    area = lambda fig: [c.get_paths()[0].vertices.sum() for c in fig.axes[0].collections]
    np.testing.assert_allclose(area(oplot.helping_fraction_figure(f_layer)), area(figs[1]))
    # Raster rows are labelled with their layer (and class).
    per_class = [t.get_text() for t in figs[4].axes[0].get_yticklabels()]
    assert per_class == [f"class {c}: layer {j}" for c in range(3) for j in range(2)]
    assert [t.get_text() for t in figs[5].axes[0].get_yticklabels()] == list(h.layer_names)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_oscillations_from_recorded_run(tmp_path):
    x, y, params, loss_fn = make_problem(n=60, seed=3)
    traj = sgd_trajectory(params, loss_fn, x, y, steps=5)
    h = lca.allocate_trajectory(
        loss_fn, traj, (x, y), directory=tmp_path, store_grads=True, progress=True
    )
    assert h.grad_before["Dense_1/kernel"].shape == (5, 12, 3)
    motion = lca.motion_from_trajectory(traj)
    np.testing.assert_allclose(
        motion["Dense_0/bias"][2],
        np.asarray(traj[3]["Dense_0"]["bias"]) - np.asarray(traj[2]["Dense_0"]["bias"]),
    )
    o = lca.oscillations(motion, h.grad_before)
    assert o.motion_changes.keys() == o.grad_changes.keys() == set(h.leaf_names)
    n = sum(v.size for v in motion.values())
    total = sum(int(c.sum()) for c in o.motion_changes.values())
    assert o.iterations_per_motion_change == pytest.approx(n / total)
    # start gradient of step t+1 is the end gradient of step t, evaluated at θ_{t+1}
    import jax
    import jax.numpy as jnp

    g2 = jax.grad(lambda p: jnp.mean(loss_fn(p, (x, y))))(traj[2])
    np.testing.assert_allclose(
        h.grad_before["Dense_0/kernel"][2], g2["Dense_0"]["kernel"], rtol=1e-4, atol=1e-7
    )
