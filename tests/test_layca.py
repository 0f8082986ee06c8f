"""Layca, its four operations and the papers' LARS variant against the maths of the paper.

Carbonnelle & De Vleeschouwer (2019), Algorithm 1, Eq. 1, App. A.2. Argument errors are in
``test_reliability.py``; the generic optax contract (dtypes, strict promotion, wrappers, tree
errors) in ``test_contract.py``.

The reference is a float64 numpy transcription of Algorithm 1 / App. A.2 (``tests/_utils.py``)
with hand-written backprop; the library runs in float32 under ``jax.jit``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _utils import (
    Reference,
    angle,
    assert_tree_dtypes,
    assert_tree_finite,
    assert_trees_close,
    assert_trees_close_rel,
    eq1_multiplier,
    flat,
    init_mlp,
    lars_step_np,
    layca_step_np,
    mlp_data,
    mlp_grad_np,
    mlp_loss_jax,
)

import optax_layca as ol

SIZES = [6, 8, 8, 8, 3]  # 4 layers, so the Eq. 1 multipliers differ per layer
KERNELS = [f"Dense_{i}/kernel" for i in range(len(SIZES) - 1)]
P0 = init_mlp(SIZES)
X, Y = mlp_data(SIZES, n=64)


def ref_grad(p):
    return mlp_grad_np(p, X, Y)


@functools.cache
def _step(tx):
    @jax.jit
    def step(p, s):
        g = jax.grad(mlp_loss_jax)(p, X, Y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, u, g

    return step


def trajectory(tx, steps, params=P0, state=None):
    """[(params, update, grad)] of ``steps`` jitted steps; entry t is the step from params_t."""
    step = _step(tx)
    p, s = params, tx.init(params) if state is None else state
    out = []
    for _ in range(steps):
        new, s, u, g = step(p, s)
        out.append((p, u, g))
        p = new
    out.append((p, None, None))
    return out


def make(name, lr, alpha, fused=True, **kw):
    base = optax.scale_by_adam() if name == "adam" else None
    return ol.layca(lr, base=base, alpha=alpha, fused=fused, **kw)


LR = {"sgd": 0.05, "adam": 0.02}


@functools.cache
def injected(direction, variant="layca-fused"):
    """One Layca/LARS transform per (direction, variant) whose α lives in its state
    (``optax.inject_hyperparams``): one compilation serves every α."""
    base = optax.scale_by_adam() if direction == "adam" else None
    if variant == "lars":
        return optax.inject_hyperparams(ol.lars)(LR[direction], base=base, alpha=0.0)
    return optax.inject_hyperparams(ol.layca)(
        LR[direction], base=base, alpha=0.0, fused=variant == "layca-fused"
    )


def with_alpha(tx, alpha, params=P0):
    state = tx.init(params)
    return state._replace(hyperparams={**state.hyperparams, "alpha": jnp.float32(alpha)})


@functools.cache
def run(direction, alpha, variant="layca-fused", steps=60):
    tx = injected(direction, variant)
    return trajectory(tx, steps, state=with_alpha(tx, alpha))


# ----------------------------------------------------------------------------- vs numpy


def check_against_reference(traj, ref_factory, steps):
    """Every step of the library (float32, jit) equals one float64 numpy step of the paper's
    algorithm taken from the library's current params (3e-6 per leaf, relative); and the
    free-running trajectories agree over the first steps."""
    assert len(traj) > steps
    ref = ref_factory()
    for t in range(steps):
        p64 = flat_mlp(traj[t][0])
        expected = ref.step(p64, ref_grad(p64))
        assert_trees_close_rel(traj[t + 1][0], expected, tol=3e-6, err=f"step {t}:")
    free = ref_factory()
    p = flat_mlp(P0)
    for t in range(10):
        p = free.step(p, ref_grad(p))
        assert_trees_close_rel(traj[t + 1][0], p, tol=1e-5, err=f"free-running step {t}:")
    return traj


def flat_mlp(params):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), params)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chained"])
@pytest.mark.parametrize("alpha", [-0.5, 0.0, 0.5])
@pytest.mark.parametrize("direction", ["sgd", "adam"])
def test_layca_matches_numpy_algorithm_1(direction, alpha, fused):
    lr = LR[direction]
    traj = check_against_reference(
        run(direction, alpha, "layca-fused" if fused else "layca-chained"),
        lambda: Reference(P0, lr, alpha, direction),
        steps=60,
    )
    # The run trained: the loss went down.
    assert mlp_loss_jax(traj[-1][0], X, Y) < 0.8 * mlp_loss_jax(P0, X, Y)


@pytest.mark.parametrize("alpha", [-0.5, 0.5])
@pytest.mark.parametrize("direction", ["sgd", "adam"])
def test_lars_matches_numpy_appendix_a2(direction, alpha):
    lr = LR[direction]
    check_against_reference(
        run(direction, alpha, "lars", steps=50),
        lambda: Reference(P0, lr, alpha, direction, variant="lars"),
        steps=50,
    )


# ----------------------------------------------------------------------------- invariants


INVARIANT_CASES = [
    (d, a, v)
    for d in ("sgd", "adam")
    for a in (-0.5, 0.5)
    for v in ("layca-fused", "layca-chained")
]


@pytest.mark.parametrize("direction, alpha, variant", INVARIANT_CASES)
def test_rotation_per_step_is_arctan_rho(direction, alpha, variant):
    traj = run(direction, alpha, variant)
    L = len(KERNELS)
    for t in range(len(traj) - 1):
        a, b = flat(traj[t][0]), flat(traj[t + 1][0])
        for l, k in enumerate(KERNELS):
            rho = eq1_multiplier(alpha, l, L) * LR[direction]
            np.testing.assert_allclose(
                angle(a[k], b[k]),
                np.arctan(rho),
                rtol=1e-4,
                atol=2e-6,
                err_msg=f"step {t} layer {k}",
            )


@pytest.mark.parametrize("direction, alpha, variant", INVARIANT_CASES)
def test_norm_equals_initial_norm_after_every_step(direction, alpha, variant):
    traj = run(direction, alpha, variant)
    n0 = {k: np.linalg.norm(v) for k, v in flat(P0).items() if k in KERNELS}
    for t, (p, _, _) in enumerate(traj):
        for k in KERNELS:
            np.testing.assert_allclose(
                np.linalg.norm(flat(p)[k]), n0[k], rtol=2e-6, err_msg=f"step {t} layer {k}"
            )


def test_every_step_descends_per_layer():
    """SGD direction: ⟨u_l, g_l⟩ < 0 for every layer at every step."""
    for alpha, variant in [
        (a, v) for a in (-0.5, 0.0, 0.5) for v in ("layca-fused", "layca-chained")
    ]:
        traj = run("sgd", alpha, variant)
        for t, (_, u, g) in enumerate(traj[:-1]):
            fu, fg = flat(u), flat(g)
            for k in KERNELS:
                assert np.vdot(fu[k], fg[k]) < 0, f"step {t} layer {k} ascends"


@pytest.mark.parametrize("direction", ["sgd", "adam"])
def test_fused_equals_chained_each_step(direction):
    """From the same params and states, fused and chained give the same new params (1e-6)."""
    alpha = -0.5
    traj = run(direction, alpha, "layca-fused")
    chained = injected(direction, "layca-chained")
    sc = with_alpha(chained, alpha)
    step_c = _step(chained)
    for t, (p, _u, _) in enumerate(traj[:-1]):
        new_c, sc, _, _ = step_c(p, sc)
        assert_trees_close_rel(new_c, traj[t + 1][0], tol=1e-6, err=f"step {t}:")


@pytest.mark.parametrize("variant", ["layca-fused", "layca-chained"])
def test_base_direction_scale_has_no_effect(variant):
    """Only the direction of ``base`` matters: scaling it by 1e3 or 1e-3 changes no layer."""
    for direction, scaled in (
        ("adam", optax.chain(optax.scale_by_adam(), optax.scale(1e3))),
        ("sgd", optax.scale(1e-3)),
    ):
        tx = ol.layca(LR[direction], base=scaled, alpha=0.5, fused=variant == "layca-fused")
        ref = run(direction, 0.5, variant)
        step, state = _step(tx), tx.init(P0)
        for t in range(20):  # from the reference run's params (biases move differently)
            new, state, _, _ = step(ref[t][0], state)
            a, e = flat(new), flat(ref[t + 1][0])
            for k in KERNELS:
                assert np.linalg.norm(a[k] - e[k]) <= 1e-6 * np.linalg.norm(e[k]), (t, k)


# ----------------------------------------------------------------------------- non-layer policy


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chained"])
def test_non_layer_policy(fused):
    g = jax.grad(mlp_loss_jax)(P0, X, Y)
    # "base": biases get exactly optax.adam's update (the base direction times -lr).
    tx = ol.layca(0.01, base=optax.scale_by_adam(), fused=fused, non_layer="base")
    u, _ = tx.update(g, tx.init(P0), P0)
    ua, _ = optax.adam(0.01).update(g, optax.adam(0.01).init(P0), P0)
    for i in range(len(SIZES) - 1):
        np.testing.assert_allclose(u[f"Dense_{i}"]["bias"], ua[f"Dense_{i}"]["bias"], rtol=1e-6)
    # "freeze": biases do not move; kernels are identical to the "base" run.
    tx = ol.layca(0.01, base=optax.scale_by_adam(), fused=fused, non_layer="freeze")
    uf, _ = tx.update(g, tx.init(P0), P0)
    for i in range(len(SIZES) - 1):
        assert not np.any(np.asarray(uf[f"Dense_{i}"]["bias"]))
        np.testing.assert_array_equal(uf[f"Dense_{i}"]["kernel"], u[f"Dense_{i}"]["kernel"])


def test_non_layer_policy_lars():
    g = jax.grad(mlp_loss_jax)(P0, X, Y)
    tx = ol.lars(0.1, non_layer="base")
    u, _ = tx.update(g, tx.init(P0), P0)
    np.testing.assert_allclose(u["Dense_0"]["bias"], -0.1 * g["Dense_0"]["bias"], rtol=1e-6)
    tx = ol.lars(0.1, non_layer="freeze")
    u, _ = tx.update(g, tx.init(P0), P0)
    assert not np.any(np.asarray(u["Dense_0"]["bias"]))


# ----------------------------------------------------------------------------- LARS cap


def _lars_case(growth, w_norm=1.0):
    """A 2-D layer with ‖w0‖ = 1, current ‖w‖ = w_norm, and a step whose uncapped norm growth
    is ``growth`` (absolute)."""
    rho = 0.1
    # ‖w − ρ s‖ with ‖s‖ = ‖w‖ = r and angle θ between s and -w ... solve for cos θ.
    r = w_norm
    target = r + growth
    # ‖w − ρ s‖² = r²(1 + ρ²) − 2ρ r² cos φ, φ the angle between s and w.
    cos_phi = (r * r * (1 + rho * rho) - target * target) / (2 * rho * r * r)
    phi = np.arccos(cos_phi)
    w = np.array([[r, 0.0]])
    s = np.array([[np.cos(phi), np.sin(phi)]]) * 3.0  # any scale: op 2 normalises it
    return rho, w, s


@pytest.mark.parametrize("w_norm", [1.0, 2.0])
@pytest.mark.parametrize("growth_factor", [0.5, 0.9, 1.1, 3.0, -5.0])
def test_lars_cap_engages_exactly_past_threshold(growth_factor, w_norm):
    delta = 1e-4
    rho, w, s = _lars_case(growth_factor * delta, w_norm)
    w0 = {"kernel": jnp.asarray([[1.0, 0.0]], jnp.float32)}  # ‖w0‖ = 1: the cap is δ·‖w0‖
    tx = ol.lars(rho, max_norm_increase=delta)
    state = tx.init(w0)
    params = {"kernel": jnp.asarray(w, jnp.float32)}
    u, _ = tx.update({"kernel": jnp.asarray(s, jnp.float32)}, state, params)
    new = np.asarray(params["kernel"] + u["kernel"], np.float64)
    uncapped = w - rho * s / np.linalg.norm(s) * np.linalg.norm(w)
    if growth_factor > 1:
        np.testing.assert_allclose(np.linalg.norm(new), w_norm + delta, rtol=1e-7)
        # Same direction as the uncapped step: only the norm is cut.
        assert angle(new, uncapped) < 1e-6
    else:
        np.testing.assert_allclose(new, uncapped, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new, lars_step_np(w, s, 1.0, rho, delta), rtol=1e-6, atol=1e-7)


def test_cap_norm_increase_transform_alone():
    w0 = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    tx = ol.cap_norm_increase(0.01)
    state = tx.init(w0)
    u = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}  # doubles the norm
    out, _ = tx.update(u, state, w0)
    np.testing.assert_allclose(np.linalg.norm(w0["w"] + out["w"]), np.sqrt(12) * 1.01, rtol=1e-6)
    np.testing.assert_array_equal(out["b"], u["b"])  # non-layer: untouched
    shrink = {"w": -0.5 * jnp.ones((3, 4)), "b": jnp.ones(4)}
    out, _ = tx.update(shrink, state, w0)
    np.testing.assert_array_equal(out["w"], shrink["w"])  # decreases are never capped


# ----------------------------------------------------------------------------- single ops


def test_single_operations_against_numpy():
    rng = np.random.default_rng(3)
    w = {
        "a": {"kernel": rng.standard_normal((5, 4)).astype(np.float32)},
        "b": {"kernel": rng.standard_normal((3, 3, 2)).astype(np.float32)},
        "c": {"bias": rng.standard_normal(4).astype(np.float32)},
    }
    s = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), w)
    fw, fs = flat(w), flat(s)
    u, _ = ol.project_orthogonal().update(s, optax.EmptyState(), w)
    u2, _ = ol.scale_to_weight_norm().update(u, optax.EmptyState(), w)
    for k in ("a/kernel", "b/kernel"):
        perp = fs[k] - np.vdot(fs[k], fw[k]) / np.vdot(fw[k], fw[k]) * fw[k]
        np.testing.assert_allclose(flat(u)[k], perp, rtol=1e-5, atol=1e-6)
        assert abs(np.vdot(flat(u)[k], fw[k])) < 1e-5 * np.linalg.norm(fw[k]) ** 2
        np.testing.assert_allclose(
            flat(u2)[k], perp * np.linalg.norm(fw[k]) / np.linalg.norm(perp), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_array_equal(u["c"]["bias"], s["c"]["bias"])
    np.testing.assert_array_equal(u2["c"]["bias"], s["c"]["bias"])
    # Op 4 from a different starting point: lands on ‖w⁰‖ along w + u.
    tx = ol.project_to_initial_norm()
    state = tx.init(w)
    w1 = jax.tree.map(lambda x: 2.5 * x, w)
    out, _ = tx.update(s, state, w1)
    for k in ("a/kernel", "b/kernel"):
        target = 2.5 * fw[k] + fs[k]
        target = target * np.linalg.norm(fw[k]) / np.linalg.norm(target)
        np.testing.assert_allclose(2.5 * fw[k] + flat(out)[k], target, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["c"]["bias"], s["c"]["bias"])


@pytest.mark.parametrize("ratio", [3.0, 30.0, 300.0])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chained"])
def test_nearly_parallel_step_still_rotates_by_arctan_rho(fused, ratio):
    """‖s‖/‖s⊥‖ = ratio (an L2 term or a minimum on the sphere): the one-pass c − b²/a would
    lose ~eps·ratio² of ‖s⊥‖²; the rotation must stay arctan(ρ) all the same."""
    rng = np.random.default_rng(int(ratio))
    w = rng.standard_normal((64, 32))
    d = rng.standard_normal((64, 32))
    d -= np.vdot(d, w) / np.vdot(w, w) * w
    s = w / np.linalg.norm(w) * np.sqrt(ratio**2 - 1) + d / np.linalg.norm(d)
    params = {"kernel": jnp.asarray(w, jnp.float32)}
    tx = ol.layca(0.05, fused=fused)
    u, _ = tx.update({"kernel": jnp.asarray(s, jnp.float32)}, tx.init(params), params)
    new = np.asarray(params["kernel"] + u["kernel"], np.float64)
    # Error analysis (eps = 2**-23, ρ = 0.05, R = ratio). s is stored to eps‖s‖ = eps R ‖s⊥‖,
    # so the tangent direction, hence the radial part of the step ρŝ, is known to eps R: the
    # norm after the step is off by <= ρ R eps/2. The fused pass coef_w w + coef_s s adds two
    # terms of size ~ρR‖w‖ that cancel down to ρ‖w‖: its rounding adds <= (eps/2)(ρR + 1), and
    # ‖w‖ (hence k) and w + u add ~eps. Norm: <= eps (ρR + 2) (measured max over 40 seeds:
    # eps (0.6 ρR + 2)); 1.5× for margin. The angle error relative to arctan ρ is that
    # tangential rounding over ρ, eps (R + 1/ρ)/2, plus the one-pass ‖s⊥‖² (used below
    # R = 4) off by eps R² relative: eps (2 min(R, 4)² + R + 1/ρ).
    eps, rho = 2.0**-23, 0.05
    np.testing.assert_allclose(angle(w, new), np.arctan(rho),
                               rtol=eps * (2 * min(ratio, 4) ** 2 + ratio + 1 / rho))
    np.testing.assert_allclose(np.linalg.norm(new), np.linalg.norm(w),
                               rtol=1.5 * eps * (rho * ratio + 2))
    # And it turns towards -s⊥ (the projected step), as in the float64 reference (fed the
    # unrounded s). Per entry: rounding s_i (eps/2 |s_i|, |s_i| ~ R‖s⊥‖|w_i|/‖w‖) moves ρŝ_i by
    # (eps/2) ρR |w_i|; the fused pass rounds (eps/2)(ρR + 1)|w_i|; k's error adds ~eps |w_i|:
    # <= eps (ρR + 2) max|w|, doubled for margin.
    expected = layca_step_np(np.asarray(params["kernel"]), s, np.linalg.norm(w), rho)
    np.testing.assert_allclose(new, expected, rtol=0,
                               atol=2 * eps * (rho * ratio + 2) * np.abs(w).max())


def test_parallel_step_projects_to_zero():
    w = {"kernel": jnp.asarray([[1.0, 2.0], [3.0, 4.0]])}
    for tx in (ol.layca(0.1), ol.layca(0.1, fused=False)):
        u, _ = tx.update(jax.tree.map(lambda x: -7 * x, w), tx.init(w), w)
        np.testing.assert_allclose(u["kernel"], 0.0, atol=1e-6)


# ----------------------------------------------------------------------------- per unit


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chained"])
def test_per_unit_each_output_unit_keeps_norm_and_rotates(fused):
    lr = 0.03
    tx = ol.layca(lr, fused=fused, per_unit=True)
    traj = trajectory(tx, 10)
    n0 = {k: np.linalg.norm(flat(P0)[k], axis=0) for k in KERNELS}
    for t in range(10):
        a, b = flat(traj[t][0]), flat(traj[t + 1][0])
        for k in KERNELS:
            np.testing.assert_allclose(np.linalg.norm(b[k], axis=0), n0[k], rtol=2e-6)
            for j in range(a[k].shape[1]):
                np.testing.assert_allclose(
                    angle(a[k][:, j], b[k][:, j]), np.arctan(lr), rtol=1e-4, err_msg=f"{k} unit {j}"
                )


# ----------------------------------------------------------------------------- stacked layers


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chained"])
def test_stacked_layers_equal_separate_layers(fused):
    rng = np.random.default_rng(5)
    stack = rng.standard_normal((3, 4, 4)).astype(np.float32)
    gstack = rng.standard_normal((3, 4, 4)).astype(np.float32)
    first = rng.standard_normal((2, 4)).astype(np.float32)
    gfirst = rng.standard_normal((2, 4)).astype(np.float32)
    stacked = {"a_in": {"kernel": first}, "b_scan": {"kernel": stack}}
    gst = {"a_in": {"kernel": gfirst}, "b_scan": {"kernel": gstack}}
    order = ["a_in/kernel", "b_scan/kernel"]
    tx = ol.layca(0.1, alpha=0.5, layer_order=order, layer_axis={"b_scan/kernel": 0}, fused=fused)
    u, _ = tx.update(gst, tx.init(stacked), stacked)
    sep = {"L0": first, **{f"L{i + 1}": stack[i] for i in range(3)}}
    gsep = {"L0": gfirst, **{f"L{i + 1}": gstack[i] for i in range(3)}}
    tx2 = ol.layca(0.1, alpha=0.5, layer_order=["L0", "L1", "L2", "L3"], fused=fused)
    u2, _ = tx2.update(gsep, tx2.init(sep), sep)
    np.testing.assert_allclose(u["a_in"]["kernel"], u2["L0"], rtol=1e-5, atol=1e-7)
    for i in range(3):
        np.testing.assert_allclose(u["b_scan"]["kernel"][i], u2[f"L{i + 1}"], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: ol.layca(0.1),
        lambda: ol.layca(0.1, fused=False),
        lambda: ol.layca(0.1, base=optax.scale_by_adam()),
        lambda: ol.lars(0.1),
        lambda: ol.lars(0.1, base=optax.scale_by_adam()),
    ],
    ids=["fused", "chained", "fused-adam", "lars", "lars-adam"],
)
def test_zero_gradient_gives_zero_update(make_tx):
    tx = make_tx()
    zeros = jax.tree.map(jnp.zeros_like, jax.tree.map(jnp.asarray, P0))
    u, _ = jax.jit(tx.update)(zeros, tx.init(P0), P0)
    for k, v in flat(u).items():
        assert np.all(v == 0), k


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "chained"])
def test_zero_initial_norm(fused):
    params = {"Dense_0": {"kernel": jnp.ones((3, 2))}, "Dense_1": {"kernel": jnp.zeros((2, 2))}}
    tx = ol.layca(0.1, fused=fused)
    with pytest.raises(ValueError, match=r"'Dense_1/kernel' has zero initial norm"):
        tx.init(params)
    with pytest.raises(ValueError, match=r"'Dense_1/kernel' has zero initial norm"):
        ol.lars(0.1).init(params)
    # Under tracing the check is impossible: the documented fallback is NaN-free and keeps
    # the zero layer at 0 while the others train.
    state = jax.jit(tx.init)(params)
    grads = {
        "Dense_0": {"kernel": jnp.arange(6.0).reshape(3, 2)},
        "Dense_1": {"kernel": jnp.ones((2, 2))},
    }
    u, _ = jax.jit(tx.update)(grads, state, params)
    assert_tree_finite(u)
    assert not np.any(np.asarray(u["Dense_1"]["kernel"]))
    assert np.any(np.asarray(u["Dense_0"]["kernel"]))


@pytest.mark.parametrize(
    "make_tx",
    [lambda: ol.layca(0.05), lambda: ol.layca(0.05, base=optax.scale_by_adam(), fused=False)],
    ids=["fused", "chained-adam"],
)
def test_bf16_params_keep_their_norm(make_tx):
    tx = make_tx()
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), P0)
    s = tx.init(p)
    n0 = np.linalg.norm(np.asarray(p["Dense_1"]["kernel"], np.float32))
    step = jax.jit(
        lambda p, s: tx.update(
            jax.grad(mlp_loss_jax)(p, X.astype(jnp.bfloat16), Y.astype(jnp.bfloat16)), s, p
        )
    )
    for _ in range(5):
        u, s = step(p, s)
        assert_tree_dtypes(u, jnp.bfloat16)
        p = optax.apply_updates(p, u)
        assert_tree_dtypes(p, jnp.bfloat16)
        assert_tree_finite(p)
    # Reductions run in float32: the norm stays within bf16 resolution of ‖w0‖.
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(p["Dense_1"]["kernel"], np.float32)), n0, rtol=2e-2
    )


def test_sgd_amom_matches_formula():
    m, lr = 0.8, 0.5
    tx = ol.sgd_amom(lr, momentum=m)
    p = jnp.zeros(3)
    s = tx.init(p)
    v = np.zeros(3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        g = rng.standard_normal(3).astype(np.float32)
        u, s = tx.update(jnp.asarray(g), s, p)
        v = m * v + (1 - m) * g
        np.testing.assert_allclose(u, -lr * v, rtol=1e-5)


def test_initial_weights_are_float32_tolerance_of_numpy_reference():
    """Sanity of the harness: numpy gradients equal jax gradients."""
    g = jax.grad(mlp_loss_jax)(P0, X, Y)
    p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), P0)
    assert_trees_close(g, mlp_grad_np(p64, X, Y), rtol=1e-4, atol=1e-6)


def test_vmap_over_an_ensemble_equals_one_by_one():
    """The near-parallel refinement (a lax.cond) also works batched, e.g. an ensemble."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 8, 4)).astype(np.float32)
    # Member 0: a random step; member 1: nearly parallel to w (takes the precise branch).
    s = rng.standard_normal((3, 8, 4)).astype(np.float32)
    s[1] = 50 * w[1] + s[1] / np.linalg.norm(s[1])
    tx = ol.layca(0.1)

    def one(w, s):
        p = {"kernel": w}
        return tx.update({"kernel": s}, tx.init(p), p)[0]["kernel"]

    batched = jax.vmap(one)(jnp.asarray(w), jnp.asarray(s))
    for i in range(3):
        # Float32 cancellation in the update is ~eps·‖s‖/‖s⊥‖·‖w‖ for the parallel member.
        np.testing.assert_allclose(
            batched[i], one(jnp.asarray(w[i]), jnp.asarray(s[i])), rtol=0, atol=2e-5
        )
