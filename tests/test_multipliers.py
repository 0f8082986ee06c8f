"""The α layer multipliers of Eq. 1 (Carbonnelle & De Vleeschouwer, 2019) against the formula
written out in numpy. Argument errors: ``test_reliability.py``; tree, dtype and injection
checks: ``test_contract.py``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _utils import eq1_multiplier, init_mlp, natural

import optax_layca as ol

ALPHAS = [-1.0, -0.5, 0.0, 0.5, 1.0]


@pytest.mark.parametrize("num_layers", [1, 2, 5, 25])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_eq1_table(alpha, num_layers):
    expected = [eq1_multiplier(alpha, l, num_layers) for l in range(num_layers)]
    got = ol.layer_multipliers(alpha, num_layers)
    assert got.shape == (num_layers,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_single_layer_gets_one(alpha):
    assert ol.layer_multipliers(alpha, 1).tolist() == [1.0]


def test_shape_of_the_schedule():
    L = 7
    np.testing.assert_array_equal(ol.layer_multipliers(0.0, L), np.ones(L))
    # α = ±1 trains exactly one layer (0**0 == 1): the last one, or the first one.
    np.testing.assert_array_equal(ol.layer_multipliers(1.0, L), [0.0] * (L - 1) + [1.0])
    np.testing.assert_array_equal(ol.layer_multipliers(-1.0, L), [1.0] + [0.0] * (L - 1))
    # α > 0 prioritises the last layers (increasing), α < 0 the first ones (decreasing),
    # and the extreme layer always keeps multiplier 1 (the base rate).
    for a in (0.2, 0.5, 0.9):
        up, down = np.asarray(ol.layer_multipliers(a, L)), np.asarray(ol.layer_multipliers(-a, L))
        assert np.all(np.diff(up) > 0) and up[-1] == 1.0
        assert np.all(np.diff(down) < 0) and down[0] == 1.0
        # The smallest multiplier is (1 - |α|)^5 at the far end.
        np.testing.assert_allclose(up[0], (1 - a) ** 5, rtol=1e-5)
        np.testing.assert_allclose(down[-1], (1 - a) ** 5, rtol=1e-5)


def _params(n=12):
    return init_mlp([2] * (n + 1))  # n layers of 2x2 kernels


def test_scale_by_layer_multipliers_uses_natural_order():
    params = _params(12)
    tx = ol.scale_by_layer_multipliers(0.5)
    u, _ = tx.update(params, tx.init(params), params)
    order = natural(f"Dense_{i}" for i in range(12))
    for l, name in enumerate(order):
        m = eq1_multiplier(0.5, l, 12)
        np.testing.assert_allclose(u[name]["kernel"], m * params[name]["kernel"], rtol=1e-6)
        np.testing.assert_array_equal(u[name]["bias"], params[name]["bias"])  # non-layer
    # jax.tree's string order would make Dense_10 the 3rd layer; it is the 11th.
    assert ol.layer_paths(params)[2] == "Dense_10/kernel"
    assert order[10] == "Dense_10"


def test_explicit_order_changes_depths():
    params = _params(3)
    order = ["Dense_2/kernel", "Dense_0/kernel", "Dense_1/kernel"]
    tx = ol.scale_by_layer_multipliers(-0.5, order)
    u, _ = tx.update(params, tx.init(params), params)
    for l, path in enumerate(order):
        name = path.split("/")[0]
        np.testing.assert_allclose(
            u[name]["kernel"], eq1_multiplier(-0.5, l, 3) * params[name]["kernel"], rtol=1e-6
        )


def test_stacked_layers_take_consecutive_depths():
    stack = jnp.ones((3, 2, 2))
    params = {
        "in": {"kernel": jnp.ones((2, 2))},
        "scan": {"kernel": stack},
        "out": {"kernel": jnp.ones((2, 2))},
    }
    order = ["in/kernel", "scan/kernel", "out/kernel"]
    tx = ol.scale_by_layer_multipliers(0.5, order, layer_axis={"scan/kernel": 0})
    u, _ = tx.update(params, tx.init(params), params)
    m = [eq1_multiplier(0.5, l, 5) for l in range(5)]
    np.testing.assert_allclose(u["in"]["kernel"], m[0], rtol=1e-6)
    for i in range(3):
        np.testing.assert_allclose(u["scan"]["kernel"][i], m[1 + i], rtol=1e-6)
    np.testing.assert_allclose(u["out"]["kernel"], m[4], rtol=1e-6)


def test_alpha_schedule_is_evaluated_per_step():
    params = _params(4)
    sched = optax.linear_schedule(-1.0, 1.0, transition_steps=4)
    tx = ol.scale_by_layer_multipliers(sched)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(6):
        u, state = step(params, state, params)
        a = float(sched(t))
        for l in range(4):
            np.testing.assert_allclose(
                u[f"Dense_{l}"]["kernel"],
                eq1_multiplier(a, l, 4) * params[f"Dense_{l}"]["kernel"],
                rtol=1e-6,
                atol=1e-30,
                err_msg=f"step {t} layer {l}",
            )
    assert int(state.count) == 6


def test_alpha_injected_changes_without_retrace():
    params = _params(5)
    tx = optax.inject_hyperparams(ol.scale_by_layer_multipliers)(alpha=0.0)
    traces = []

    @jax.jit
    def step(state):
        traces.append(1)
        return tx.update(params, state, params)

    state = tx.init(params)
    for a in (0.0, 0.5, -0.5, 1.0, -1.0):
        state.hyperparams["alpha"] = jnp.float32(a)
        u, state = step(state)
        np.testing.assert_allclose(
            [
                float(u[f"Dense_{l}"]["kernel"][0, 0] / params[f"Dense_{l}"]["kernel"][0, 0])
                for l in range(5)
            ],
            [eq1_multiplier(a, l, 5) for l in range(5)],
            rtol=1e-5,
            atol=1e-30,
        )
    assert len(traces) == 1
