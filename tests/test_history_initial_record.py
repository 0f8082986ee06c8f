"""A RotationHistory that also recorded the initial state (step 0), as the app's training loop
does, feeds ``step_angles`` and ``adapt_copy`` exactly as one without that record."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_layca import RotationHistory, adapt_copy, track_rotation


def _histories(steps=6, every=2):
    """Two histories of one SGD run: with and without a record at step 0."""
    params = {"Dense_0": {"kernel": jnp.eye(3) + 0.1}, "Dense_1": {"kernel": jnp.ones((3, 2))}}
    tx = track_rotation(optax.sgd(0.1))
    state = tx.init(params)
    with_init, without = RotationHistory(every=every), RotationHistory(every=every)
    with_init.record(0, state)
    for t in range(1, steps + 1):
        grads = jax.tree.map(lambda w, t=t: jnp.cos(t * jnp.arange(w.size).reshape(w.shape)), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for h in (with_init, without):
            h.record(t, state)
    return params, with_init, without


def test_step_angles_skip_the_initial_record():
    _, with_init, without = _histories()
    assert with_init.steps.tolist() == [0, 2, 4, 6] and without.steps.tolist() == [2, 4, 6]
    a, b = with_init.step_angles(), without.step_angles()
    assert a.keys() == b.keys()
    for p in a:
        assert a[p].shape == (6,)
        np.testing.assert_array_equal(a[p], b[p])


@pytest.mark.parametrize("target", ["step_angle", "cosine_distance"])
def test_adapt_copy_reads_a_history_with_the_initial_record(target):
    params, with_init, without = _histories()
    g = jax.tree.map(jnp.ones_like, params)
    out = []
    for hist in (with_init, without):
        tx = adapt_copy(hist, target=target)
        u, _ = tx.update(g, tx.init(params), params)
        out.append(u)
    for x, y in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_lone_initial_record_is_still_refused():
    hist = RotationHistory()
    params = {"w": jnp.eye(2)}
    hist.record(0, track_rotation(optax.sgd(0.1)).init(params))
    with pytest.raises(ValueError, match="steps > 0"):
        hist.step_angles()
