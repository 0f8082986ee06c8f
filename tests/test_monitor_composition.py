"""The rotation monitor inside optax.MultiSteps and optax.masked reports the true rotation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_layca as ol

PARAMS = {
    "Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (6, 5)), "bias": jnp.zeros(5)},
    "Dense_1": {"kernel": jax.random.normal(jax.random.key(1), (5, 3)), "bias": jnp.zeros(3)},
}


def grads(i):
    return jax.tree.map(lambda x: jax.random.normal(jax.random.key(100 + i), x.shape), PARAMS)


def np_cos_dist(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_monitor_inside_multisteps_sees_the_applied_steps():
    rho = 0.2
    tx = optax.MultiSteps(ol.track_rotation(ol.layca(rho)), every_k_schedule=3)
    state, params = tx.init(PARAMS), PARAMS
    step = jax.jit(tx.update)
    for i in range(6):
        updates, state = step(grads(i), state, params)
        params = optax.apply_updates(params, updates)
    angles = optax.tree.get(state, "step_angle")
    dist = optax.tree.get(state, "cosine_distance")
    for path in ("Dense_0/kernel", "Dense_1/kernel"):
        np.testing.assert_allclose(float(angles[path]), np.arctan(rho), rtol=1e-4)
        layer = path.split("/")[0]
        np.testing.assert_allclose(
            float(dist[path]), np_cos_dist(params[layer]["kernel"], PARAMS[layer]["kernel"]),
            rtol=1e-4, atol=1e-6)


def test_monitor_under_masked_tracks_only_unmasked_layers():
    mask = {"Dense_0": {"kernel": True, "bias": False}, "Dense_1": {"kernel": False, "bias": False}}
    tx = optax.chain(optax.masked(optax.chain(ol.layca(0.1), ol.track_rotation()), mask),
                     optax.masked(optax.sgd(0.1), jax.tree.map(lambda m: not m, mask)))
    state = tx.init(PARAMS)
    updates, state = jax.jit(tx.update)(grads(0), state, PARAMS)
    angles = optax.tree.get(state, "step_angle")
    assert set(angles) == {"Dense_0/kernel"}
    np.testing.assert_allclose(float(angles["Dense_0/kernel"]), np.arctan(0.1), rtol=1e-4)
