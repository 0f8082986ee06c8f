"""AdaptCopy: record Adam's layer rotation on an MLP, replay it with Layca on SGD_AMom (issue 4)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _utils import init_mlp, mlp_xent_jax

import optax_layca as ol
from optax_layca import RotationHistory, adapt_copy, track_rotation
from optax_layca.rotation import angle

SIZES = (10, 16, 16, 4)
BATCH, STEPS_PER_EPOCH, EPOCHS = 16, 8, 5


def init_params(seed=0):
    return init_mlp(SIZES, seed, bias_scale=0.0)


def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS_PER_EPOCH, SIZES[0])).astype(np.float32)
    y = np.argmax(np.tanh(x @ rng.normal(size=(SIZES[0], SIZES[-1]))), axis=1)
    return x, y


loss = functools.partial(mlp_xent_jax, activation=jax.nn.relu)


def run(tx, every=1):
    """Trains with ``track_rotation(tx)``; returns the history (epoch ends always recorded)."""
    x, y = make_data()
    tx = track_rotation(tx)
    traces = []

    @jax.jit
    def step(p, s, xb, yb):
        traces.append(1)
        u, s = tx.update(jax.grad(loss)(p, xb, yb), s, p)
        return optax.apply_updates(p, u), s

    params = init_params()
    state = tx.init(params)
    hist = RotationHistory(every=every)
    t = 0
    for e in range(1, EPOCHS + 1):
        perm = np.random.default_rng(e).permutation(len(x))
        for i in range(STEPS_PER_EPOCH):
            idx = perm[i * BATCH : (i + 1) * BATCH]
            params, state = step(params, state, x[idx], y[idx])
            t += 1
            hist.record(t, state, epoch=e if i == STEPS_PER_EPOCH - 1 else None, params=params)
    assert len(traces) == 1
    return hist


def epoch_curves(hist):
    at_epoch = ~np.isnan(hist.epochs)
    return {k: v[at_epoch] for k, v in hist.get("cosine_distance").items()}


@pytest.fixture(scope="module")
def adam_history():
    return run(optax.adam(3e-3))


SGD_AMOM = {"base": optax.ema(0.9, debias=False)}


def assert_curves_match(replayed, recorded, rtol):
    a, b = epoch_curves(recorded), epoch_curves(replayed)
    assert a.keys() == b.keys()
    for k in a:
        assert np.all(a[k] > 1e-4), k  # the layers did rotate
        np.testing.assert_allclose(b[k], a[k], rtol=rtol, err_msg=k)


def test_step_angle_mode_reproduces_every_step_angle(adam_history):
    replay = run(adapt_copy(adam_history, **SGD_AMOM))
    rec, rep = adam_history.get("step_angle"), replay.get("step_angle")
    for k in rec:
        np.testing.assert_allclose(rep[k], rec[k], rtol=1e-4, atol=1e-7, err_msg=k)
    # Layca keeps the norms at their initial values
    wn = replay.get("weight_norm")
    for v in wn.values():
        np.testing.assert_allclose(v, v[0], rtol=1e-5)


@pytest.mark.parametrize("via", ["live", ".npz", ".json"])
def test_cosine_distance_mode_matches_recorded_curves_within_2pct(adam_history, tmp_path, via):
    hist = adam_history
    if via != "live":
        hist = RotationHistory.load(adam_history.save(tmp_path / f"adam{via}"))
    replay = run(adapt_copy(hist, target="cosine_distance", **SGD_AMOM))
    assert_curves_match(replay, adam_history, rtol=0.02)


def test_cosine_distance_mode_from_epoch_records_only():
    sparse = run(optax.adam(3e-3), every=10**9)  # records at epoch ends only
    assert len(sparse) == EPOCHS
    replay = run(adapt_copy(sparse, target="cosine_distance", **SGD_AMOM))
    assert_curves_match(replay, sparse, rtol=0.02)


def test_per_epoch_table_and_past_end():
    params = {"Dense_0": {"kernel": jnp.eye(3)}}
    g = {
        "Dense_0": {
            "kernel": jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)), jnp.float32)
        }
    }

    def angles(tx, n):
        state, p, out = tx.init(params), params, []
        step = jax.jit(tx.update)
        for _ in range(n):
            u, state = step(g, state, p)
            new = optax.apply_updates(p, u)
            out.append(float(angle(p["Dense_0"]["kernel"], new["Dense_0"]["kernel"])))
            p = new
        return np.asarray(out)

    table = {"Dense_0/kernel": [0.1, 0.05]}
    np.testing.assert_allclose(
        angles(adapt_copy(table, steps_per_epoch=2), 5), [0.1, 0.1, 0.05, 0.05, 0.05], rtol=1e-5
    )
    np.testing.assert_allclose(
        angles(adapt_copy(table, past_end="stop"), 4), [0.1, 0.05, 0.0, 0.0], atol=1e-6
    )


def test_matches_layca_at_constant_rate():
    """A constant table tan⁻¹(ρ) is Layca at rate ρ (the shared fused helper)."""
    params = init_params()
    x, y = make_data()
    g = jax.grad(loss)(params, x[:BATCH], y[:BATCH])
    rho = 0.02
    table = {f"Dense_{i}/kernel": [np.arctan(rho)] for i in range(3)}
    copy = adapt_copy(table, non_layer_learning_rate=rho)
    a, _ = jax.jit(copy.update)(g, copy.init(params), params)
    tx = ol.layca(rho, non_layer="base")  # biases at rate ρ, as non_layer_learning_rate
    b, _ = jax.jit(tx.update)(g, tx.init(params), params)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-8)


def test_non_layer_leaves_frozen_by_default():
    params = init_params()
    table = {f"Dense_{i}/kernel": [0.01] for i in range(3)}
    tx = adapt_copy(table)
    g = jax.tree.map(jnp.ones_like, params)
    u, _ = tx.update(g, tx.init(params), params)
    assert float(jnp.abs(u["Dense_0"]["bias"]).max()) == 0.0
    assert float(jnp.abs(u["Dense_0"]["kernel"]).max()) > 0.0


def test_errors(adam_history):
    params = init_params()
    with pytest.raises(ValueError, match="Recorded but not in params: \\['Dense_9/kernel'\\]"):
        adapt_copy({"Dense_9/kernel": [0.1]}).init(params)
    with pytest.raises(ValueError, match="in params but not recorded"):
        adapt_copy({"Dense_0/kernel": [0.1]}).init(params)
    with pytest.raises(ValueError, match="Dense_0/kernel.*\\[0, π/2\\)"):
        adapt_copy({"Dense_0/kernel": [2.0]})
    with pytest.raises(ValueError, match="same number of rows"):
        adapt_copy({"a": [0.1], "b": [0.1, 0.2]})
    with pytest.raises(ValueError, match="steps_per_epoch"):
        adapt_copy(adam_history, steps_per_epoch=3)
    with pytest.raises(ValueError, match="empty"):
        adapt_copy(RotationHistory())
    with pytest.raises(TypeError, match="RotationHistory or a non-empty dict"):
        adapt_copy([0.1, 0.2])
    with pytest.raises(ValueError, match="cosine distances of layer 'a'"):
        adapt_copy({"a": [3.0]}, target="cosine_distance")
    with pytest.raises(ValueError, match="one rate per step of shape"):
        adapt_copy({f"Dense_{i}/kernel": [[0.1, 0.1]] for i in range(3)}).init(params)
