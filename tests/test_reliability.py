"""Non-finite gradients and the error message of every public control function."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_layca as ol

PARAMS = {
    "Dense_0": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "bias": jnp.zeros(2)},
    "Dense_1": {"kernel": jnp.array([[1.0, -1.0], [0.5, 2.0]]), "bias": jnp.zeros(2)},
}


def grads_with(value):
    g = jax.tree.map(jnp.ones_like, PARAMS)
    g["Dense_1"]["kernel"] = g["Dense_1"]["kernel"].at[0, 0].set(value)
    return g


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_gradient_propagates_without_guard(bad):
    """Documented: like optax's own transforms, a NaN/Inf step is not hidden."""
    tx = ol.layca(0.1)
    updates, _ = tx.update(grads_with(bad), tx.init(PARAMS), PARAMS)
    assert not bool(jnp.all(jnp.isfinite(updates["Dense_1"]["kernel"])))
    # other layers are computed independently and stay finite
    assert bool(jnp.all(jnp.isfinite(updates["Dense_0"]["kernel"])))


@pytest.mark.parametrize("make", [lambda: ol.layca(0.1, base=optax.scale_by_adam()),
                                  lambda: ol.lars(0.1)])
def test_apply_if_finite_skips_non_finite_steps(make):
    tx = optax.apply_if_finite(make(), max_consecutive_errors=3)
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    updates, state = step(grads_with(jnp.nan), state, PARAMS)
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(u), 0.0)
    assert int(state.notfinite_count) == 1
    updates, state = step(grads_with(1.0), state, PARAMS)
    assert int(state.notfinite_count) == 0
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert float(jnp.abs(updates["Dense_1"]["kernel"]).sum()) > 0


BAD_CALLS = [
    (lambda: ol.layca(0.1, alpha=1.5), ValueError, r"layca\(alpha=\.\.\.\)` must lie in \[-1, 1\]"),
    (lambda: ol.lars(0.1, alpha=-2.0), ValueError, r"lars\(alpha=\.\.\.\)"),
    (lambda: ol.scale_by_layer_multipliers(alpha=float("nan")), ValueError, "alpha"),
    (lambda: ol.layer_multipliers(0.5, 0), ValueError, "num_layers"),
    (lambda: ol.layer_multipliers(0.5, 2.5), TypeError, "num_layers"),
    (lambda: ol.layca(0.1, non_layer="sgd"), ValueError, "non_layer"),
    (lambda: ol.layca(0.1, base=optax.adam), TypeError, "base"),
    (lambda: ol.layca(0.1, is_layer="kernel"), TypeError, "is_layer"),
    (lambda: ol.layca(0.1, per_unit="yes"), TypeError, "per_unit"),
    (lambda: ol.cap_norm_increase(-1.0), ValueError, "max_increase"),
    (lambda: ol.sgd_amom(0.1, momentum=1.0), ValueError, "momentum"),
    (lambda: ol.layca(0.1, base=optax.adam(1e-3)).init(PARAMS), ValueError, "full optimizer"),
    (lambda: ol.layca(0.1, layer_order=["Dense_0/kernel"]).init(PARAMS), ValueError,
     r"missing these layers.*Dense_1/kernel"),
    (lambda: ol.layca(0.1, layer_order=["Dense_0/kernel", "Dense_9/kernel", "Dense_1/kernel"])
     .init(PARAMS), ValueError, r"not layers of params.*Dense_9/kernel"),
    (lambda: ol.layca(0.1, layer_order="Dense_0/kernel").init(PARAMS), TypeError, "layer_order"),
    (lambda: ol.layca(0.1).init({"b": jnp.zeros(3)}), ValueError, "No layer found"),
    (lambda: ol.layca(0.1).init({"Dense_0": {"kernel": jnp.zeros((2, 2))}}), ValueError,
     r"'Dense_0/kernel' has zero initial norm"),
    (lambda: ol.layca(0.1, layer_axis=5).init(PARAMS), ValueError, r"layer_axis=5.*Dense_0/kernel"),
    (lambda: ol.forward_order(lambda p, x: x, {"b": jnp.zeros(2)}, jnp.ones(2)), ValueError,
     "no layer found"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS)
def test_error_messages_name_the_argument_or_leaf(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("make", [ol.project_orthogonal, ol.scale_to_weight_norm,
                                  ol.project_to_initial_norm, ol.cap_norm_increase,
                                  lambda: ol.layca(0.1)])
def test_update_needs_params_and_matching_tree(make):
    tx = make()
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match="params"):
        tx.update(PARAMS, state)
    bad = {"Dense_0": PARAMS["Dense_0"]}
    with pytest.raises(ValueError, match="Dense_1"):
        tx.update(bad, state, PARAMS)
