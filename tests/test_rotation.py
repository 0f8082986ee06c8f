"""Layer rotation metrics, the `track_rotation` monitor and `RotationHistory` (issue 4).

References are float64 numpy transcriptions of the definitions (seed 000 §3.1, seed 003 Def.
2.1), written here without the library's helpers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _utils import init_mlp, mlp_class_data, mlp_xent_jax, nnx_mlp

import optax_layca as ol
from optax_layca import RotationHistory, track_rotation
from optax_layca import rotation as rot

# ----------------------------------------------------------------------------- references


def np_angle(a, b) -> float:
    """Angle in float64 via the orthogonal projection (accurate for tiny and near-π angles)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if not a.any() or not b.any():
        return 0.0
    perp = b - (a @ b) / (a @ a) * a
    return float(np.arctan2(np.linalg.norm(perp) * np.linalg.norm(a), a @ b))


def np_cosdist(a, b) -> float:
    return 2.0 * np.sin(np_angle(a, b) / 2) ** 2


def unit_perp(a, rng):
    v = rng.normal(size=a.shape)
    v -= (v.ravel() @ a.ravel()) / (a.ravel() @ a.ravel()) * a
    return v / np.linalg.norm(v)


def rotated(a, theta, rng):
    """float32 vector at angle ``theta`` from ``a`` (same norm), and its float64 value."""
    a = np.asarray(a, np.float64)
    e = unit_perp(a, rng) * np.linalg.norm(a)
    b = np.cos(theta) * a + np.sin(theta) * e
    return b.astype(np.float32)


def mlp(sizes=(6, 8, 8, 3), seed=0):
    return init_mlp(sizes, seed)


def data():
    return mlp_class_data((6, 3))


def train(tx, params, steps, record=None):
    """Jitted training; returns params, state, per-step params list and the trace count."""
    x, y = data()
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        g = jax.grad(mlp_xent_jax)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, g, u

    state = tx.init(params)
    traj = [params]
    for t in range(1, steps + 1):
        params, state, g, u = step(params, state)
        traj.append(params)
        if record is not None:
            record(t, state, params, g, u)
    return params, state, traj, len(traces)


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("theta", [1e-6, 1e-5, 1e-4, 1e-2, 0.5, 1.5, np.pi / 2, 2.5])
def test_angle_matches_numpy_from_tiny_to_large(theta):
    rng = np.random.default_rng(0)
    for shape in [(50,), (7, 9), (3, 4, 5)]:
        a = rng.normal(size=shape).astype(np.float32)
        b = rotated(a, theta, rng)
        ref = np_angle(a, b)  # the float32 inputs, in float64
        got = float(rot.angle(a, b))
        assert abs(got - ref) <= 2e-5 * ref + 1e-12, (shape, theta, got, ref)
        cd = float(rot.cosine_distance(a, b))
        assert abs(cd - np_cosdist(a, b)) <= 5e-5 * np_cosdist(a, b) + 1e-18


def test_tiny_angles_beat_arccos():
    """arccos of a clamped float32 cosine returns 0 at 1e-6 rad; ours is exact to 1e-5."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=1000).astype(np.float32)
    b = rotated(a, 1e-6, rng)
    cos = np.float32(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    assert np.arccos(np.clip(cos, -1, 1)) < 5e-4  # noise: float32 arccos is useless here
    np.testing.assert_allclose(float(rot.angle(a, b)), np_angle(a, b), rtol=1e-5)
    np.testing.assert_allclose(float(rot.cosine_distance(a, b)), np_cosdist(a, b), rtol=1e-4)
    assert 4e-13 < np_cosdist(a, b) < 6e-13  # ≈ θ²/2


@pytest.mark.parametrize("delta", [1e-6, 1e-4, 1e-2])
def test_nearly_antiparallel(delta):
    rng = np.random.default_rng(2)
    a = rng.normal(size=200).astype(np.float32)
    b = rotated(a, np.pi - delta, rng)
    ref = np_angle(a, b)
    got = float(rot.angle(a, b))
    # near π the float32 result is exact to its resolution (ulp(π) = 2.4e-7), where the
    # arccos of a rounded cosine would be off by ~sqrt(eps) = 3e-4
    assert abs(got - ref) <= 5e-7, (got, ref)
    assert 0.0 <= float(rot.cosine_distance(a, b)) <= 2.0


def test_random_pairs_and_scaling_invariance():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.normal(size=(5, 6)).astype(np.float32)
        b = rng.normal(size=(5, 6)).astype(np.float32)
        ref = np_angle(a, b)
        np.testing.assert_allclose(float(rot.angle(a, b)), ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(rot.angle(3.0 * a, 0.5 * b)), ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            float(rot.cosine_distance(a, b)),
            1 - (a.ravel() @ b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b),
            rtol=1e-4,
            atol=1e-6,
        )


def test_zero_vectors_give_zero_not_nan():
    z, x = jnp.zeros((3, 4)), jnp.ones((3, 4))
    for a, b in [(z, x), (x, z), (z, z)]:
        assert float(rot.angle(a, b)) == 0.0
        assert float(rot.cosine_distance(a, b)) == 0.0
    rates = rot.layer_rotation({"w": z}, {"w": x})
    assert float(rates["w"]) == 0.0


def test_angle_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        rot.angle(jnp.ones(3), jnp.ones(4))


def test_layer_rotation_per_layer_per_unit_and_stacked():
    rng = np.random.default_rng(4)
    p0 = {
        "Dense_0": {
            "kernel": rng.normal(size=(4, 3)).astype(np.float32),
            "bias": np.zeros(3, np.float32),
        },
        "scan": {"kernel": rng.normal(size=(2, 3, 3)).astype(np.float32)},
    }
    p1 = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), p0)
    got = rot.layer_rotation(p1, p0)
    assert set(got) == {"Dense_0/kernel", "scan/kernel"}  # biases are not layers
    np.testing.assert_allclose(
        got["Dense_0/kernel"],
        np_cosdist(p0["Dense_0"]["kernel"], p1["Dense_0"]["kernel"]),
        rtol=1e-5,
    )
    # stacked: one value per slice
    st = rot.layer_rotation(p1, p0, layer_axis=0, is_layer=["scan/kernel"])
    want = [np_cosdist(p0["scan"]["kernel"][i], p1["scan"]["kernel"][i]) for i in range(2)]
    np.testing.assert_allclose(st["scan/kernel"], want, rtol=1e-5)
    # per unit: one value per output column
    pu = rot.layer_rotation(p1, p0, per_unit=True)
    k0, k1 = p0["Dense_0"]["kernel"], p1["Dense_0"]["kernel"]
    np.testing.assert_allclose(
        pu["Dense_0/kernel"], [np_cosdist(k0[:, j], k1[:, j]) for j in range(3)], rtol=1e-5
    )
    # rotation rate and angles
    rr = rot.rotation_rate(p0, p1, 10, 15)
    np.testing.assert_allclose(rr["Dense_0/kernel"], np_angle(k0, k1) / 5, rtol=1e-5)
    with pytest.raises(ValueError, match="t2 > t1"):
        rot.rotation_rate(p0, p1, 5, 5)
    with pytest.raises(ValueError, match="same tree structure"):
        rot.layer_rotation({"a": p1["Dense_0"]}, p0)
    with pytest.raises(ValueError, match="No layer found"):
        rot.layer_rotation({"b": jnp.ones(3)}, {"b": jnp.ones(3)})


def test_layer_rotation_is_jittable():
    p0, p1 = mlp(seed=0), mlp(seed=1)
    eager = rot.layer_rotation(p1, p0)
    jitted = jax.jit(rot.layer_rotation)(p1, p0)
    for k in eager:
        np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-6)


# ----------------------------------------------------------------------------- monitor


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_monitor_reports_arctan_rho_with_layca(alpha):
    rho = 0.03
    params = mlp(sizes=(6, 8, 8, 8, 3))
    tx = optax.chain(ol.layca(rho, alpha=alpha), track_rotation())
    steps = 5
    _, state, traj, n_traces = train(tx, params, steps)
    assert n_traces == 1
    figs = {n: optax.tree.get(state, n) for n in rot.FIGURES}
    layers = [f"Dense_{i}/kernel" for i in range(4)]
    assert sorted(figs["step_angle"]) == layers
    mult = np.asarray(ol.layer_multipliers(alpha, 4))
    for l, path in enumerate(layers):
        want = np.arctan(rho * mult[l])
        np.testing.assert_allclose(figs["step_angle"][path], want, rtol=2e-5)
        np.testing.assert_allclose(figs["cumulative_angle"][path], steps * want, rtol=2e-5)
        name, leaf = path.split("/")
        w0, wT, wprev = (traj[i][name][leaf] for i in (0, steps, steps - 1))
        np.testing.assert_allclose(figs["weight_norm"][path], np.linalg.norm(w0), rtol=1e-5)
        np.testing.assert_allclose(figs["cosine_distance"][path], np_cosdist(w0, wT), rtol=1e-4)
        np.testing.assert_allclose(
            figs["update_norm"][path], np.linalg.norm(np.asarray(wT) - np.asarray(wprev)), rtol=1e-4
        )
    assert int(optax.tree.get(state, "rotation_step")) == steps


def test_monitor_wrapping_adam_is_pass_through_and_sees_the_gradient():
    params = mlp()
    seen = []
    wrapped = track_rotation(optax.adam(1e-2))
    _, state, traj, n_traces = train(
        wrapped, params, 3, record=lambda t, s, p, g, u: seen.append((g, u))
    )
    assert n_traces == 1
    # pass-through: identical trajectory to plain adam
    _, _, traj_plain, _ = train(optax.adam(1e-2), params, 3)
    for a, b in zip(jax.tree.leaves(traj[-1]), jax.tree.leaves(traj_plain[-1])):
        np.testing.assert_array_equal(a, b)
    g, u = seen[-1]
    for path in ("Dense_0/kernel", "Dense_2/kernel"):
        name, leaf = path.split("/")
        np.testing.assert_allclose(state.grad_norm[path], np.linalg.norm(g[name][leaf]), rtol=1e-5)
        np.testing.assert_allclose(
            state.update_norm[path], np.linalg.norm(u[name][leaf]), rtol=1e-5
        )
        np.testing.assert_allclose(
            state.step_angle[path], np_angle(traj[-2][name][leaf], traj[-1][name][leaf]), rtol=1e-4
        )
        np.testing.assert_allclose(
            state.cosine_distance[path],
            np_cosdist(traj[0][name][leaf], traj[-1][name][leaf]),
            rtol=1e-4,
        )
        np.testing.assert_allclose(
            state.weight_norm[path], np.linalg.norm(traj[-1][name][leaf]), rtol=1e-5
        )


def test_monitor_state_at_init_and_unique_fields():
    params = mlp()
    state = optax.chain(optax.sgd(0.1), track_rotation()).init(params)
    cd = optax.tree.get(state, "cosine_distance")
    assert set(cd) == {"Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"}
    assert all(float(v) == 0.0 for v in cd.values())
    wn = optax.tree.get(state, "weight_norm")
    np.testing.assert_allclose(
        wn["Dense_1/kernel"], np.linalg.norm(params["Dense_1"]["kernel"]), rtol=1e-6
    )
    # w0 is a copy, not an alias of the params buffers
    ini = optax.tree.get(state, "initial_layers")
    assert ini["Dense_0/kernel"] is not params["Dense_0"]["kernel"]


def test_monitor_zero_layer_figures_are_float32_zero_and_flagged():
    params = {
        "Dense_0": {"kernel": jnp.zeros((3, 2), jnp.bfloat16)},
        "Dense_1": {"kernel": jnp.ones((2, 2), jnp.bfloat16)},
    }
    tx = track_rotation(optax.sgd(0.1))
    state = tx.init(params)
    g = jax.tree.map(lambda w: jnp.full(w.shape, 0.5, w.dtype), params)
    u, state = jax.jit(tx.update)(g, state, params)
    for name in rot.FIGURES:
        for v in getattr(state, name).values():
            assert v.dtype == jnp.float32 and np.isfinite(v).all()
    # the zero-initialised layer: distance 0 by convention (it was 0 at init), and flagged
    assert float(state.cosine_distance["Dense_0/kernel"]) == 0.0
    assert float(state.step_angle["Dense_0/kernel"]) == 0.0
    assert bool(state.zero_initial_layer_norm["Dense_0/kernel"])
    assert not bool(state.zero_initial_layer_norm["Dense_1/kernel"])


def test_monitor_per_unit_and_stacked():
    rng = np.random.default_rng(5)
    params = {"stack": {"kernel": jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)}}
    tx = track_rotation(optax.sgd(0.1), layer_axis=0)
    state = tx.init(params)
    g = {"stack": {"kernel": jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)}}
    u, state = jax.jit(tx.update)(g, state, params)
    new = optax.apply_updates(params, u)
    assert state.step_angle["stack/kernel"].shape == (3,)
    want = [np_angle(params["stack"]["kernel"][i], new["stack"]["kernel"][i]) for i in range(3)]
    np.testing.assert_allclose(state.step_angle["stack/kernel"], want, rtol=1e-4)
    assert track_rotation(per_unit=True).init(params).step_angle["stack/kernel"].shape == (4,)
    tx = track_rotation(optax.sgd(0.1), per_unit=True, layer_axis=0)
    state = tx.init(params)
    u, state = jax.jit(tx.update)(g, state, params)
    new = optax.apply_updates(params, u)
    assert state.step_angle["stack/kernel"].shape == (3, 4)
    k0, k1 = params["stack"]["kernel"], new["stack"]["kernel"]
    want = [[np_angle(k0[i, :, j], k1[i, :, j]) for j in range(4)] for i in range(3)]
    np.testing.assert_allclose(state.step_angle["stack/kernel"], want, rtol=1e-4)


_PLAIN_MONITOR = track_rotation()
_plain_update = jax.jit(_PLAIN_MONITOR.update)  # one compile for every case below


@pytest.mark.parametrize("moved", [0.0, 0.05])
@pytest.mark.parametrize("radial", [0.0, 0.3, -0.5])
@pytest.mark.parametrize("theta", [1e-6, 1e-3, 0.2])
def test_monitor_accuracy_incl_nearly_radial_updates(moved, radial, theta):
    """Tiny steps, and updates dominated by a norm change (the explicit-projection branch)."""
    rng = np.random.default_rng(7)
    w0 = rng.normal(size=(40, 30)).astype(np.float32)
    w = rotated(w0, moved, rng) * np.float32(1.0 + radial) if moved else w0
    target = rotated(w, theta, rng) * np.float32(1.0 + radial)
    u = (target.astype(np.float64) - w).astype(np.float32)
    params = {"Dense_0": {"kernel": jnp.asarray(w0)}}
    state = _PLAIN_MONITOR.init(params)
    upd = {"Dense_0": {"kernel": jnp.asarray(u)}}
    _, state = _plain_update(upd, state, {"Dense_0": {"kernel": jnp.asarray(w)}})
    # reference: the float32 w + u, as stored by apply_updates (its rounding alone moves a
    # 1e-6 rad angle by up to eps/2 = 6e-8 rad: the monitor reports what was stored)
    new = (w + u).astype(np.float64)
    # a 1e-6 rad turn inside a 30% norm change: float32 rounding of the radial part (eps ‖u‖)
    # is ~1e-3 of the tangential part, the precision limit of any float32 computation
    rtol = 2e-3 if radial and theta < 1e-4 else 1e-4
    np.testing.assert_allclose(state.step_angle["Dense_0/kernel"], np_angle(w, new), rtol=rtol)
    # Same limit for the distance to w0: e = w' - w0 has a radial part |radial|‖w0‖ whose
    # float32 projection leaves rounding noise <= (eps/2)|radial|‖w0‖ (eps = 2**-23) against
    # a tangential part ~(1 + radial) θ ‖w0‖; noise adds in quadrature, so 1 - cos (∝ ‖e_⊥‖²)
    # is off by <= q², q = eps |radial| / (2 (1 + radial) θ); doubled, plus 1e-4.
    q = 2.0**-23 * abs(radial) / (2 * (1 + radial) * theta)
    np.testing.assert_allclose(
        state.cosine_distance["Dense_0/kernel"], np_cosdist(w0, new), rtol=1e-4 + 2 * q * q
    )
    np.testing.assert_allclose(state.weight_norm["Dense_0/kernel"], np.linalg.norm(new), rtol=1e-5)


def test_monitor_every_k_and_donation():
    params = mlp()
    tx = track_rotation(optax.sgd(0.1), every=3)
    x, y = data()
    traces = []

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s):
        traces.append(1)
        u, s = tx.update(jax.grad(mlp_xent_jax)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    seen = []
    for _ in range(6):
        prev = np.asarray(p["Dense_1"]["kernel"])
        p, s = step(p, s)  # the state's buffers are distinct, so it can be donated
        seen.append((float(s.step_angle["Dense_1/kernel"]), np_angle(prev, p["Dense_1"]["kernel"])))
    assert len(traces) == 1
    got = np.asarray(seen)
    assert got[0, 0] == got[1, 0] == 0.0  # not measured yet
    np.testing.assert_allclose(got[2, 0], got[2, 1], rtol=1e-4)  # measured at update 3
    assert got[3, 0] == got[4, 0] == got[2, 0]  # held
    np.testing.assert_allclose(got[5, 0], got[5, 1], rtol=1e-4)
    np.testing.assert_allclose(
        s.cumulative_angle["Dense_1/kernel"], 3 * (got[2, 0] + got[5, 0]), rtol=1e-5
    )
    np.testing.assert_allclose(
        s.cosine_distance["Dense_1/kernel"],
        np_cosdist(params["Dense_1"]["kernel"], p["Dense_1"]["kernel"]),
        rtol=1e-4,
    )
    with pytest.raises(ValueError, match="every"):
        track_rotation(every=0)


def test_monitor_with_flax_linen():
    from flax import linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Dense(8)(x))
            return nn.Dense(3)(x)

    x, y = data()
    model = Net()
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    rho = 0.05
    tx = optax.chain(ol.layca(rho), track_rotation())
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": q}, x), y
        ).mean()
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    hist = RotationHistory()
    for t in range(1, 4):
        params, state = step(params, state)
        hist.record(t, state)
    assert len(traces) == 1
    assert hist.layers == ("Dense_0/kernel", "Dense_1/kernel")
    np.testing.assert_allclose(hist.get("step_angle")["Dense_1/kernel"], np.arctan(rho), rtol=2e-5)


def test_monitor_with_flax_nnx():
    from flax import nnx

    x, y = data()
    model = nnx_mlp((6, 8, 3), ("l1", "l2"))
    w0 = np.asarray(model.l1.kernel[...])
    rho = 0.05
    opt = nnx.Optimizer(model, optax.chain(ol.layca(rho), track_rotation()), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, opt):
        traces.append(1)
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
        opt.update(model, nnx.grad(loss)(model))

    hist = RotationHistory()
    for t in range(1, 4):
        step(model, opt)
        hist.record(t, opt.opt_state)
    assert len(traces) == 1
    assert hist.layers == ("l1/kernel", "l2/kernel")
    np.testing.assert_allclose(hist.get("step_angle")["l1/kernel"], np.arctan(rho), rtol=2e-5)
    np.testing.assert_allclose(
        hist.get("cosine_distance")["l1/kernel"][-1],
        np_cosdist(w0, np.asarray(model.l1.kernel[...])),
        rtol=1e-4,
    )


# ----------------------------------------------------------------------------- history


@pytest.fixture(scope="module")
def adam_run():
    """Six Adam steps under the monitor: per-step states and params (trained once)."""
    states, traj = {}, {}

    def keep(t, s, p, g, u):
        states[t], traj[t] = s, p

    params = mlp()
    _, _, full, _ = train(track_rotation(optax.adam(3e-2)), params, 6, keep)
    traj[0] = params
    return states, full


def _record_run(adam_run, every=1, steps=6, epoch_len=3):
    states, traj = adam_run
    hist = RotationHistory(every=every)
    for t in range(1, steps + 1):
        e = t // epoch_len if t % epoch_len == 0 else None
        hist.record(t, states[t], epoch=e, params=traj[t])
    return hist, states, traj


def test_history_schedule_values_and_no_host_arrays(adam_run):
    hist, states, _ = _record_run(adam_run, every=4, steps=6, epoch_len=3)
    # every 4 steps (step 4) plus epoch ends (3, 6)
    assert hist.steps.tolist() == [3, 4, 6]
    np.testing.assert_array_equal(hist.epochs, [1.0, np.nan, 2.0])
    assert not hist.should_record(5) and hist.should_record(8)
    cd = hist.get("cosine_distance")
    for i, t in enumerate([3, 4, 6]):
        for path, v in cd.items():
            np.testing.assert_array_equal(v[i], states[t].cosine_distance[path])
    hist2 = RotationHistory(every=lambda s: s in (2, 5))
    assert hist2.should_record(2) and not hist2.should_record(3)


def test_history_keeps_device_arrays_until_read():
    params = mlp()
    tx = track_rotation(optax.sgd(0.1))
    hist = RotationHistory()
    state = tx.init(params)
    hist.record(0, state)
    assert all(isinstance(x, jax.Array) for x in hist._pending)  # no host conversion yet
    hist.get("weight_norm")
    assert not hist._pending


def test_history_per_epoch_rotation_matches_numpy(adam_run):
    hist, _, traj = _record_run(adam_run, every=1000, steps=6, epoch_len=2)
    epochs, per_epoch = hist.per_epoch_rotation()
    assert epochs.tolist() == [1, 2, 3]
    for path in hist.layers:
        name, leaf = path.split("/")
        want = [
            np_cosdist(traj[2 * (e - 1)][name][leaf], traj[2 * e][name][leaf]) for e in (1, 2, 3)
        ]
        np.testing.assert_allclose(per_epoch[path], want, rtol=1e-4)


def test_history_step_angles_from_sparse_records(adam_run):
    dense, states, _ = _record_run(adam_run, every=1, steps=6, epoch_len=100)
    sparse = RotationHistory(every=3)
    for t, s in states.items():
        sparse.record(t, s)
    exact = dense.step_angles()
    approx = sparse.step_angles()
    for path in dense.layers:
        np.testing.assert_allclose(exact[path], dense.get("step_angle")[path], rtol=1e-5)
        a = dense.get("step_angle")[path]
        np.testing.assert_allclose(
            approx[path], np.repeat([a[:3].mean(), a[3:].mean()], 3), rtol=1e-4
        )


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_history_save_load_roundtrip(adam_run, tmp_path, suffix):
    hist, _, _ = _record_run(adam_run, every=1, steps=4, epoch_len=2)
    path = hist.save(tmp_path / f"h{suffix}")
    back = RotationHistory.load(path)
    a, b = hist.as_dict(), back.as_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)
    assert back.layers == hist.layers
    # a loaded history accepts further records
    back.record(5, adam_run[0][5])
    assert back.steps.tolist()[-1] == 5


def test_history_errors(adam_run, tmp_path):
    empty = RotationHistory()
    for call in (
        lambda: empty.steps,
        lambda: empty.get("cosine_distance"),
        lambda: empty.as_dict(),
        lambda: empty.save(tmp_path / "x.npz"),
        lambda: empty.per_epoch_rotation(),
    ):
        with pytest.raises(ValueError, match="empty"):
            call()
    hist, _, _ = _record_run(adam_run, every=1, steps=2, epoch_len=100)
    with pytest.raises(ValueError, match="Unknown layer"):
        hist.get("cosine_distance", layers=["Dense_7/kernel"])
    with pytest.raises(ValueError, match="Unknown figure"):
        hist.get("loss")
    with pytest.raises(ValueError, match="per-epoch rotation"):
        hist.per_epoch_rotation()
    with pytest.raises(ValueError, match="every"):
        RotationHistory(every=0)
    with pytest.raises(ValueError, match="track_rotation"):
        RotationHistory().record(1, optax.sgd(0.1).init(mlp()))
    with pytest.raises(TypeError, match="int"):
        RotationHistory().record(1.5, {})
    with pytest.raises(FileNotFoundError):
        RotationHistory.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="changed"):
        hist.record(3, {"cosine_distance": {"other/kernel": jnp.zeros(())}})


# ----------------------------------------------------------------------------- convergence rate


def test_layer_convergence_rate_matches_formula():
    rng = np.random.default_rng(6)
    traj = {
        t: {
            "Dense_0": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
            "Dense_1": {"kernel": rng.normal(size=(4, 2))},
        }
        for t in range(0, 12, 2)
    }
    final = traj[10]
    c = rot.layer_convergence_rate(traj, final, t0=0, t1=2, t2=6)
    assert set(c) == {"Dense_0/kernel", "Dense_1/kernel"}
    for path in c:
        name, leaf = path.split("/")
        d = [np.linalg.norm(traj[t][name][leaf] - final[name][leaf]) for t in (0, 2, 6)]
        np.testing.assert_allclose(c[path], (d[1] - d[2]) / (4 * d[0]), rtol=1e-12)
    # a layer that never moved: rate 0, not NaN
    still = [{"w": np.ones((2, 2))}] * 3
    assert float(rot.layer_convergence_rate(still, still[0], 0, 1, 2)["w"]) == 0.0
    with pytest.raises(ValueError, match="t1 < t2"):
        rot.layer_convergence_rate(traj, final, 0, 6, 2)
    with pytest.raises(ValueError, match="step t1=3"):
        rot.layer_convergence_rate(traj, final, 0, 3, 6)
    with pytest.raises(TypeError, match="t0"):
        rot.layer_convergence_rate(traj, final, 0.5, 2, 6)


# ----------------------------------------------------------------------------- Adam ν


def test_second_moment_percentiles_vs_numpy():
    params = mlp()
    tx = optax.chain(optax.clip(10.0), optax.adam(1e-2), track_rotation())
    _, state, _, _ = train(tx, params, 3)
    nu = optax.tree.get(state, "nu")
    got = rot.second_moment_percentiles(state)
    for path, v in got.items():
        name, leaf = path.split("/")
        np.testing.assert_allclose(
            v, np.percentile(np.asarray(nu[name][leaf]), [10, 50, 90]), rtol=1e-5
        )
    with pytest.raises(ValueError, match="no `nu` field"):
        rot.second_moment_percentiles(optax.sgd(0.1).init(params))
    two = (optax.adam(1e-3).init(params), optax.adam(1e-3).init(params))
    with pytest.raises(ValueError, match="several `nu`"):
        rot.second_moment_percentiles(two)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        rot.second_moment_percentiles(state, q=(10, 150))


def test_warmup_schedule_one_liner():
    """Seed 002 §5.3: linear from lr/10 to lr, documented as an optax one-liner."""
    lr, n = 0.3, 10
    warm = optax.join_schedules(
        [optax.linear_schedule(lr / 10, lr, n), optax.constant_schedule(lr)], [n]
    )
    np.testing.assert_allclose(
        [float(warm(t)) for t in range(0, 15, 5)], [0.03, 0.165, 0.3], rtol=1e-6
    )
