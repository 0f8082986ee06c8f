"""Bad input gets a clear error, early; what cannot be checked early is visible at run time.

One table of bad calls for every public constructor of the control and rotation wings (the
message names the argument or the leaf), NaN/negative rates and α under ``jit`` (NaN out, never
a silent rate), non-finite gradients (propagated, as in optax), and zero-initialised layers
(flagged in the states, reported by the monitor and ``RotationHistory``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _utils import assert_tree_finite, init_mlp

import optax_layca as ol

PARAMS = {
    "Dense_0": {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "bias": jnp.zeros(2)},
    "Dense_1": {"kernel": jnp.array([[1.0, -1.0], [0.5, 2.0]]), "bias": jnp.zeros(2)},
}
KERNELS = ["Dense_0/kernel", "Dense_1/kernel"]
TABLE = {"Dense_0/kernel": [0.1], "Dense_1/kernel": [0.1]}
INT_PARAMS = {"Dense_0": {"kernel": jnp.ones((2, 2), jnp.int32), "bias": jnp.zeros(2)}}


def grads_with(value):
    g = jax.tree.map(jnp.ones_like, PARAMS)
    g["Dense_1"]["kernel"] = g["Dense_1"]["kernel"].at[0, 0].set(value)
    return g


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_gradient_propagates_without_guard(bad):
    """Documented: like optax's own transforms, a NaN/Inf step is not hidden (use
    ``optax.apply_if_finite``, checked for every transform in test_contract.py)."""
    tx = ol.layca(0.1)
    updates, _ = tx.update(grads_with(bad), tx.init(PARAMS), PARAMS)
    assert not bool(jnp.all(jnp.isfinite(updates["Dense_1"]["kernel"])))
    # other layers are computed independently and stay finite
    assert bool(jnp.all(jnp.isfinite(updates["Dense_0"]["kernel"])))


# ----------------------------------------------------------------------------- bad calls

nan = float("nan")
BAD_CALLS = [
    # learning rates: negative (would ascend), NaN, None, not a number, a bad schedule
    (lambda: ol.layca(-0.1), ValueError, r"layca\(learning_rate=\.\.\.\)` must be >= 0; got -0.1"),
    (lambda: ol.layca(nan), ValueError, r"layca\(learning_rate=\.\.\.\)` must be >= 0; got nan"),
    (lambda: ol.layca(None), TypeError, r"layca\(learning_rate=\.\.\.\)` must be a number"),
    (lambda: ol.layca("0.1"), TypeError, r"layca\(learning_rate=\.\.\.\)` must be a real"),
    (lambda: ol.layca(lambda t: -0.1 + 0 * t), ValueError, r"learning_rate=\.\.\.\) \(schedule at step 0\)"),
    (lambda: ol.lars(-1.0), ValueError, r"lars\(learning_rate=\.\.\.\)"),
    (lambda: ol.scale_by_layca(-1.0), ValueError, r"scale_by_layca\(learning_rate=\.\.\.\)"),
    (lambda: ol.sgd_amom(-0.1), ValueError, r"sgd_amom\(learning_rate=\.\.\.\)"),
    (lambda: ol.adapt_copy(TABLE, non_layer_learning_rate=-1.0), ValueError,
     r"adapt_copy\(non_layer_learning_rate=\.\.\.\)"),
    # α
    (lambda: ol.layca(0.1, alpha=1.5), ValueError, r"layca\(alpha=\.\.\.\)` must lie in \[-1, 1\]; got 1.5"),
    (lambda: ol.lars(0.1, alpha=-2.0), ValueError, r"lars\(alpha=\.\.\.\)` must lie in \[-1, 1\]"),
    (lambda: ol.layca(0.1, alpha=nan), ValueError, r"must lie in \[-1, 1\]; got nan"),
    (lambda: ol.layca(0.1, alpha=lambda t: -2.0), ValueError, r"schedule at step 0\)` must lie in \[-1, 1\]; got -2"),
    (lambda: ol.layca(0.1, alpha="0.5"), TypeError, r"layca\(alpha=\.\.\.\)` must be a real number"),
    (lambda: ol.layca(0.1, alpha=None), TypeError, r"layca\(alpha=\.\.\.\)"),
    (lambda: ol.scale_by_layca(0.1, alpha=-1.01), ValueError, r"scale_by_layca\(alpha=\.\.\.\)"),
    (lambda: ol.scale_by_layer_multipliers(nan), ValueError, r"scale_by_layer_multipliers\(alpha"),
    (lambda: ol.layer_multipliers(1.5, 3), ValueError, r"layer_multipliers\(alpha=\.\.\.\)` must lie in"),
    (lambda: ol.layer_multipliers(jnp.array([0.1, 0.2]), 3), ValueError, r"must be a scalar; got shape \(2,\)"),
    # integers
    (lambda: ol.layer_multipliers(0.5, 0), ValueError, r"num_layers=\.\.\.\)` must be an int >= 1; got 0"),
    (lambda: ol.layer_multipliers(0.5, 2.5), TypeError, r"num_layers=\.\.\.\)` must be an int"),
    (lambda: ol.layer_multipliers(0.5, True), TypeError, "num_layers"),
    (lambda: ol.track_rotation(every=0), ValueError, r"track_rotation\(every=\.\.\.\)` must be an int >= 1"),
    (lambda: ol.track_rotation(every=2.0), TypeError, r"track_rotation\(every=\.\.\.\)` must be an int"),
    (lambda: ol.RotationHistory(every=0), ValueError, r"RotationHistory\(every=\.\.\.\)"),
    (lambda: ol.adapt_copy(TABLE, steps_per_epoch=0), ValueError, r"steps_per_epoch=\.\.\.\)` must be an int >= 1"),
    (lambda: ol.adapt_copy(TABLE, steps_per_epoch=1.5), TypeError, "steps_per_epoch"),
    # other numbers
    (lambda: ol.sgd_amom(0.1, momentum=1.0), ValueError, r"sgd_amom\(momentum=\.\.\.\)` must lie in \[0, 1\)"),
    (lambda: ol.sgd_amom(0.1, momentum="high"), TypeError, r"sgd_amom\(momentum=\.\.\.\)"),
    (lambda: ol.cap_norm_increase(-1.0), ValueError, r"cap_norm_increase\(max_increase=\.\.\.\)` must be >= 0"),
    (lambda: ol.cap_norm_increase(nan), ValueError, "max_increase"),
    (lambda: ol.lars(0.1, max_norm_increase=-1e-4), ValueError, r"lars\(max_norm_increase=\.\.\.\)"),
    (lambda: ol.layca(0.1, parallel_tol=1.0), ValueError, r"layca\(parallel_tol=\.\.\.\)` must lie in \[0, 1\)"),
    (lambda: ol.project_orthogonal(parallel_tol=-0.1), ValueError, r"project_orthogonal\(parallel_tol"),
    (lambda: ol.scale_by_layca(0.1, parallel_tol=nan), ValueError, r"scale_by_layca\(parallel_tol"),
    (lambda: ol.adapt_copy(TABLE, max_angle=2.0), ValueError, r"adapt_copy\(max_angle=\.\.\.\)` must lie in \(0, 1.5708\)"),
    (lambda: ol.adapt_copy(TABLE, parallel_tol=2.0), ValueError, r"adapt_copy\(parallel_tol"),
    # choices, flags and types
    (lambda: ol.layca(0.1, non_layer="sgd"), ValueError, r"layca\(non_layer=\.\.\.\)` must be one of"),
    (lambda: ol.lars(0.1, non_layer="zero"), ValueError, r"lars\(non_layer=\.\.\.\)` must be one of"),
    (lambda: ol.adapt_copy(TABLE, target="loss"), ValueError, r"adapt_copy\(target=\.\.\.\)"),
    (lambda: ol.adapt_copy(TABLE, past_end="error"), ValueError, r"adapt_copy\(past_end=\.\.\.\)"),
    (lambda: ol.layca(0.1, fused="yes"), TypeError, r"layca\(fused=\.\.\.\)` must be a bool"),
    (lambda: ol.layca(0.1, check_base=1), TypeError, "`check_base` must be a bool"),
    (lambda: ol.layca(0.1, per_unit="yes"), TypeError, "`per_unit` must be a bool"),
    (lambda: ol.layca(0.1, base=optax.adam), TypeError, "`base` must be an optax.GradientTransformation"),
    (lambda: ol.layca(0.1, base=lambda g: g), TypeError, "`base` must be an optax.GradientTransformation"),
    (lambda: ol.track_rotation(lambda g: g), TypeError, r"track_rotation\(tx=\.\.\.\)"),
    (lambda: ol.layca(0.1, is_layer="kernel"), TypeError, "`is_layer` must be callable"),
    (lambda: ol.layca(0.1, layer_axis="0"), TypeError, "`layer_axis` must be None, an int"),
    (lambda: ol.layca(0.1, layer_axis=1.0), TypeError, "`layer_axis` must be None, an int"),
    (lambda: ol.layca(0.1, layer_axis=True), TypeError, "`layer_axis` must be None, an int"),
    (lambda: ol.track_rotation(layer_axis={"scan/kernel": "0"}), TypeError, r"`layer_axis` as a mapping"),
    (lambda: ol.layca(0.1, layer_order="Dense_0/kernel"), TypeError, r"layca\(layer_order=\.\.\.\)` must be a sequence"),
    (lambda: ol.lars(0.1, layer_order=[0, 1]), TypeError, r"lars\(layer_order=\.\.\.\)` must hold path strings"),
    # checked at init, where params are known
    (lambda: ol.layca(0.1, base=optax.adam(1e-3)).init(PARAMS), ValueError, r"pointing \*against\* the gradient.*scale_by_adam"),
    (lambda: ol.lars(0.1, base=optax.sgd(0.1, momentum=0.9)).init(PARAMS), ValueError, "full optimizer"),
    (lambda: ol.layca(0.1, layer_order=["Dense_0/kernel"]).init(PARAMS), ValueError,
     r"missing these layers of params: \['Dense_1/kernel'\]"),
    (lambda: ol.layca(0.1, layer_order=[*KERNELS, "Dense_9/kernel"]).init(PARAMS), ValueError,
     r"not layers of params: \['Dense_9/kernel'\]"),
    (lambda: ol.layca(0.1, layer_order=[*KERNELS, "Dense_0/bias"], fused=False).init(PARAMS), ValueError,
     r"not layers of params: \['Dense_0/bias'\]"),
    (lambda: ol.lars(0.1, layer_order=[*KERNELS, "Dense_1/kernel"]).init(PARAMS), ValueError,
     r"more than once: \['Dense_1/kernel'\]"),
    (lambda: ol.layca(0.1).init({"b": jnp.zeros(3)}), ValueError, r"No layer found in params \(`scale_by_layca`\)"),
    (lambda: ol.track_rotation().init({"b": jnp.zeros(3)}), ValueError, r"No layer found in params \(`track_rotation`\)"),
    (lambda: ol.layca(0.1).init(INT_PARAMS), ValueError, r"not floating point.*Dense_0/kernel \(int32\)"),
    (lambda: ol.track_rotation().init(INT_PARAMS), ValueError, r"Dense_0/kernel \(int32\)"),
    (lambda: ol.layca(0.1, is_layer=["Dense_0/kernel"]).init(INT_PARAMS), TypeError,
     r"`is_layer` chose leaf 'Dense_0/kernel' of dtype int32"),
    (lambda: ol.forward_order(lambda p, x: x, {"b": jnp.zeros(2)}, jnp.ones(2)), ValueError,
     r"No layer found in params \(`forward_order`\)"),
    (lambda: ol.layca(0.1).init({"Dense_0": {"kernel": jnp.zeros((2, 2))}}), ValueError,
     r"'Dense_0/kernel' has zero initial norm"),
    (lambda: ol.layca(0.1, layer_axis=5).init(PARAMS), ValueError, r"layer_axis=5.*Dense_0/kernel"),
    (lambda: ol.adapt_copy({"Dense_9/kernel": [0.1]}).init(PARAMS), ValueError,
     r"Recorded but not in params: \['Dense_9/kernel'\]"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS)
def test_error_messages_name_the_argument_or_leaf(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3)], ids=["int", "int64", "int32"])
def test_numpy_integers_are_accepted_where_an_int_is_asked(value):
    assert ol.layer_multipliers(0.5, value).shape == (3,)
    ol.track_rotation(every=value)
    ol.RotationHistory(every=value)
    ol.adapt_copy(TABLE, steps_per_epoch=value)
    ol.layca(0.1, layer_axis=value - 3)  # axis 0
    ol.layca(np.float32(0.1), alpha=np.float64(0.5), parallel_tol=np.float32(1e-3))


# ----------------------------------------------------------------------------- under jit


def _injected_update(factory, **hyper):
    """First update of ``inject_hyperparams(factory)`` under jit with ``hyper`` set in its
    state: the values are traced, so only the run-time behaviour can catch them."""
    tx = optax.inject_hyperparams(factory)(learning_rate=0.1, alpha=0.0)
    state = tx.init(PARAMS)
    state.hyperparams.update({k: jnp.float32(v) for k, v in hyper.items()})
    return jax.jit(tx.update)(grads_with(1.0), state, PARAMS)[0]


LAYCA_FORMS = [ol.layca, functools.partial(ol.layca, fused=False), ol.lars]


@pytest.mark.parametrize("factory", LAYCA_FORMS, ids=["fused", "chained", "lars"])
@pytest.mark.parametrize("hyper", [{"learning_rate": -0.1}, {"learning_rate": nan},
                                   {"alpha": nan}], ids=["negative_lr", "nan_lr", "nan_alpha"])
def test_traced_bad_rate_or_alpha_gives_nan_not_a_silent_rate(factory, hyper):
    """A negative learning rate would ascend and a NaN α used to give layer 0 multiplier 1:
    under jit they cannot raise, so every layer's update is NaN (documented)."""
    u = _injected_update(factory, **hyper)
    for path in ("Dense_0", "Dense_1"):
        assert np.all(np.isnan(np.asarray(u[path]["kernel"]))), path


def test_schedule_going_negative_later_gives_nan():
    sched = optax.linear_schedule(0.1, -0.1, transition_steps=2)  # fine at step 0
    for tx in (ol.layca(sched), ol.layca(sched, fused=False), ol.sgd_amom(sched)):
        state, step = tx.init(PARAMS), jax.jit(tx.update)
        for t in range(3):
            u, state = step(grads_with(1.0), state, PARAMS)
            assert np.all(np.isnan(np.asarray(u["Dense_0"]["kernel"]))) == (t == 2), t


def test_traced_alpha_out_of_range_is_clipped_as_documented():
    f = jax.jit(lambda a: ol.layer_multipliers(a, 4))
    np.testing.assert_array_equal(f(2.0), ol.layer_multipliers(1.0, 4))
    np.testing.assert_array_equal(f(-3.0), ol.layer_multipliers(-1.0, 4))
    assert np.all(np.isnan(np.asarray(f(jnp.nan))))


# ----------------------------------------------------------------------------- zero-norm layers


def _with_zero_head():
    params = init_mlp((3, 4, 2))
    params["Dense_1"]["kernel"] = np.zeros_like(params["Dense_1"]["kernel"])
    return params


@pytest.mark.parametrize("make", [
    lambda: ol.scale_by_layca(0.1),
    lambda: ol.project_to_initial_norm(),
    lambda: ol.cap_norm_increase(),
    lambda: ol.scale_by_adapt_copy({"Dense_0/kernel": [0.1], "Dense_1/kernel": [0.1]}),
], ids=["scale_by_layca", "project_to_initial_norm", "cap_norm_increase", "adapt_copy"])
def test_zero_initial_norm_is_flagged_under_a_jitted_init(make):
    """An eager init raises; a jitted one cannot, so the state says which layers never train."""
    params = _with_zero_head()
    tx = make()
    with pytest.raises(ValueError, match="'Dense_1/kernel' has zero initial norm"):
        tx.init(params)
    flags = optax.tree.get(jax.jit(tx.init)(params), "zero_initial_norm")
    assert bool(np.all(flags["Dense_1"]["kernel"])) and not bool(np.any(flags["Dense_0"]["kernel"]))
    assert not bool(np.any(flags["Dense_0"]["bias"]))


def test_zero_initial_norm_is_reported_by_the_monitor_and_the_history():
    params = _with_zero_head()
    tx = optax.chain(ol.layca(0.1), ol.track_rotation())
    state = jax.jit(tx.init)(params)
    # the monitor's flags (keyed by layer path; Layca's own are "zero_initial_norm")
    flags = optax.tree.get(state, "zero_initial_layer_norm")
    assert {k: bool(v) for k, v in flags.items()} == {"Dense_0/kernel": False,
                                                      "Dense_1/kernel": True}
    g = jax.tree.map(jnp.ones_like, params)
    u, state = jax.jit(tx.update)(g, state, params)
    assert_tree_finite(u)
    assert not np.any(np.asarray(u["Dense_1"]["kernel"]))  # pinned at 0: never trains
    hist = ol.RotationHistory()
    with pytest.warns(RuntimeWarning, match=r"\['Dense_1/kernel'\] had zero norm at init"):
        hist.record(1, state)
    assert hist.frozen_layers == ("Dense_1/kernel",)
    hist.record(2, state)  # warned once
    assert ol.RotationHistory().frozen_layers == ()
