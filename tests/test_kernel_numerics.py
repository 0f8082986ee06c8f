"""Numerics of the per-layer kernels at any float32 scale, and NaN/Inf propagation.

Layca's maths is invariant to the scale of the step direction (op 2 normalises it away) and
equivariant to the scale of the weights; float32 must not break that between 1e-30 and 1e30
(e.g. Adam's direction right after a zero gradient is ~1e-19, whose squares underflow). And a
NaN or Inf that comes in must come out, never as a plausible 0 update that freezes a layer.

Error analysis used below (u = 2**-24, float32 unit roundoff; EPS = 2u). A per-layer sum of n
products (``layer_dots``: rows of 16 summed in sequence, then a blocked sum of the rows) is off
by at most ``S(n) = (16 + log2 n) u`` relative to ``Σ|x_i y_i|`` (the products' own rounding
included); for ``a, c`` that is relative to the sum itself, for ``b`` to ``√(ac)``. The
inputs are built with ``‖s‖/‖s⊥‖ = R <= 3`` (``direction``), the fused form's one-pass path:
``‖s⊥‖² = c - b²/a`` is then off by ``<= 4 S(n) c = 4 R² S(n) ‖s⊥‖²``, so the step ``ρŝ`` by
``2 R² S(n)`` relative: that is the angle's error (plus the last pass's rounding of its
tangential part, ``(ρR + 1) u / ρ``). The norm: ``k`` inherits ``S(n)/2`` from ``a``, the error
of ``b`` leaves a radial part ``R S(n)`` in ``ŝ`` (norm error ``ρ R S(n)``), and the last pass
and ``w + u`` round by ``(ρR + 2) u``. Comparing an evaluation at scaled inputs with one at
unit scale doubles these (the power-of-ten scaling itself rounds each entry by u).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _utils import angle
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_layca as ol

EPS = 2.0**-23
LR = 0.1


def sum_err(n: int) -> float:
    """``S(n)``: relative error bound of one per-layer float32 sum of ``n`` products."""
    return (16 + np.log2(n)) * 2.0**-24


def angle_tol(n: int, ratio: float, rho: float = LR) -> float:
    # above R = 4 the precise second pass replaces the one-pass ‖s⊥‖² (error R S(n) then)
    return (2 * min(ratio, 4.0) ** 2 + ratio) * sum_err(n) + (rho * ratio + 1) * 2.0**-24 / rho


def norm_tol(n: int, ratio: float, rho: float = LR) -> float:
    # ‖w⁰‖ (at init) and ‖w‖ (in the update) are two float32 sums, reduced in different
    # orders (one sum vs the fused multi-output reduction): sum_err(n) / 2 each under the root
    return sum_err(n) + rho * ratio * sum_err(n) + (rho * ratio + 2) * 2.0**-24

FORMS = {
    "fused": lambda: ol.layca(LR),
    "chained": lambda: ol.layca(LR, fused=False),
    "class": lambda: ol.scale_by_layca(LR),
    "per_unit": lambda: ol.layca(LR, per_unit=True),
    "stacked": lambda: ol.layca(LR, layer_axis=0),
}
# Every layer op and alias; "degree" says how the output scales with (s, w): u(σ s, τ w) =
# σ^ds τ^dw u(s, w).
OPS = {
    "layca_fused": (lambda: ol.layca(LR), (0, 1)),
    "layca_chained": (lambda: ol.layca(LR, fused=False), (0, 1)),
    "scale_by_layca": (lambda: ol.scale_by_layca(LR), (0, 1)),
    "lars": (lambda: ol.lars(LR), (0, 1)),
    "project_orthogonal": (lambda: ol.project_orthogonal(), (1, 0)),
    "scale_to_weight_norm": (lambda: ol.scale_to_weight_norm(), (0, 1)),
    "adapt_copy": (lambda: ol.adapt_copy({"k/kernel": np.full(4, 0.05)}), (0, 1)),
}
SHAPES = [(16, 32), (3, 3, 4, 16), (5, 7), (2, 8, 6)]


def direction(w: np.ndarray, seed: int, t: float) -> np.ndarray:
    """A step with radial part ``t ‖s⊥‖ w/‖w‖``: ‖s‖/‖s⊥‖ = √(1 + t²) <= 3 for |t| <= 2.8."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal(w.shape)
    axes = tuple(range(w.ndim))
    d -= np.sum(d * w, axes) / np.sum(w * w, axes) * w
    return d + t * np.linalg.norm(d) / np.linalg.norm(w) * w


def tree(x):
    return {"k": {"kernel": jnp.asarray(x, jnp.float32)}}


@functools.cache
def jitted(table: str, name: str):
    """One transform per name, its init and update jitted once (hypothesis reuses them)."""
    make = {"forms": FORMS, "ops": {k: v[0] for k, v in OPS.items()}}[table][name]
    tx = make()
    return jax.jit(tx.init), jax.jit(tx.update)


def one_update(fns, s, w):
    init, update = fns
    u, _ = update(tree(s), init(tree(w)), tree(w))
    return np.asarray(u["k"]["kernel"], np.float64)


scales = st.sampled_from([1e-30, 1e-19, 1e-10, 1e-3, 1.0, 1e3, 1e10, 1e19, 1e30])


@settings(max_examples=12, deadline=None)
@given(form=st.sampled_from(sorted(FORMS)), shape=st.sampled_from(SHAPES), s_scale=scales,
       w_scale=scales, seed=st.integers(0, 2**16), t=st.floats(-2.8, 2.8))
def test_layca_rotates_by_arctan_rho_and_keeps_norm_at_any_scale(form, shape, s_scale, w_scale,
                                                                  seed, t):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * w_scale
    s = direction(w, seed + 1, t) * s_scale
    u = one_update(jitted("forms", form), s, w)
    w32 = np.asarray(tree(w)["k"]["kernel"], np.float64)
    new = np.asarray((tree(w)["k"]["kernel"] + jnp.asarray(u, jnp.float32)), np.float64)
    assert np.all(np.isfinite(new))
    # the layers of each form: the whole leaf, each unit (last axis), each stacked slice (0)
    if form == "per_unit":
        groups = [(w32[..., j], new[..., j], s[..., j]) for j in range(shape[-1])]
    elif form == "stacked":
        groups = [(w32[i], new[i], s[i]) for i in range(shape[0])]
    else:
        groups = [(w32, new, s)]
    for a, b, sl in groups:
        if np.linalg.norm(b - a) == 0:  # per unit/slice, a step can be parallel by chance
            continue
        ratio = np.linalg.norm(sl) / np.linalg.norm(sl - np.sum(sl * a) / np.sum(a * a) * a)
        np.testing.assert_allclose(angle(a, b), np.arctan(LR), rtol=angle_tol(a.size, ratio))
        np.testing.assert_allclose(np.linalg.norm(b), np.linalg.norm(a),
                                   rtol=norm_tol(a.size, ratio))


@settings(max_examples=12, deadline=None)
@given(op=st.sampled_from(sorted(OPS)), s_scale=scales, w_scale=scales,
       seed=st.integers(0, 2**16), t=st.floats(-2.8, 2.8))
def test_every_op_is_homogeneous_in_the_scales_of_step_and_weights(op, s_scale, w_scale, seed, t):
    """u(σ s, τ w) = σ^ds τ^dw u(s, w) to float32 rounding, σ, τ from 1e-30 to 1e30."""
    ds, dw = OPS[op][1]
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 8, 16))
    s = direction(w, seed + 1, t)
    ref = one_update(jitted("ops", op), s, w)
    got = one_update(jitted("ops", op), s * s_scale, w * w_scale) / (s_scale**ds * w_scale**dw)
    ratio = np.sqrt(1 + t * t)
    rho = np.tan(0.05) if op == "adapt_copy" else LR  # the angle adapt_copy replays
    # u = w' - w with ‖u‖ ≈ ρ‖w‖: an error of ε‖w‖ in w' (norm, or angle × ‖w‖) is ε/ρ of
    # ‖u‖; both sides' errors count
    tol = 2 * (angle_tol(w.size, ratio, rho) + norm_tol(w.size, ratio, rho) / rho)
    assert np.linalg.norm(got - ref) <= tol * np.linalg.norm(ref), op


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_initial_norm_and_norm_ops_at_extreme_weight_scales(scale):
    """‖w⁰‖ is right (not 0 or inf) for tiny and huge weights, so op 4 and the cap work."""
    w = np.random.default_rng(0).standard_normal((8, 16)) * scale
    tx = ol.project_to_initial_norm()
    state = tx.init(tree(w))
    n = w.size  # a norm carries half its sum's error; op 4 and the cap add two roundings
    np.testing.assert_allclose(np.asarray(state.initial_norm["k"]["kernel"]).item(),
                               np.linalg.norm(w), rtol=sum_err(n) / 2 + EPS)
    u, _ = tx.update(tree(0.5 * w + direction(w, 1, 0.0) * scale), state, tree(1.5 * w))
    new = 1.5 * w + np.asarray(u["k"]["kernel"], np.float64)  # back on the sphere of ‖w⁰‖
    np.testing.assert_allclose(np.linalg.norm(new), np.linalg.norm(w), rtol=sum_err(n) + 2 * EPS)
    cap = ol.cap_norm_increase(1e-2)
    u, _ = cap.update(tree(w), cap.init(tree(w)), tree(w))  # doubling: capped at +1% of ‖w⁰‖
    new = w + np.asarray(u["k"]["kernel"], np.float64)
    np.testing.assert_allclose(np.linalg.norm(new), 1.01 * np.linalg.norm(w),
                               rtol=sum_err(n) + 2 * EPS)


# ----------------------------------------------------------------------------- NaN / Inf

ALL = {
    **{name: make for name, (make, _) in OPS.items()},
    "layca_adam": lambda: ol.layca(LR, base=optax.scale_by_adam()),
    "layca_freeze": lambda: ol.layca(LR, non_layer="freeze"),
    "layca_chained_freeze": lambda: ol.layca(LR, non_layer="freeze", fused=False),
    "lars_freeze": lambda: ol.lars(LR, non_layer="freeze"),
    "per_unit": lambda: ol.layca(LR, per_unit=True),
    "project_to_initial_norm": lambda: ol.project_to_initial_norm(),
    "cap_norm_increase": lambda: ol.cap_norm_increase(),
}


def two_layer_tree(rng):
    return {
        "k": {"kernel": rng.standard_normal((4, 16)).astype(np.float32),
              "bias": rng.standard_normal(16).astype(np.float32)},
        "m": {"kernel": rng.standard_normal((16, 16)).astype(np.float32)},
    }


@pytest.mark.parametrize("name", sorted(ALL))
def test_nonfinite_in_gives_nan_out_never_a_plausible_zero(name):
    if name == "adapt_copy":
        tx = ol.adapt_copy({"k/kernel": np.full(4, 0.05), "m/kernel": np.full(4, 0.05)})
    else:
        tx = ALL[name]()
    update = jax.jit(tx.update)
    for where in ("gradient", "params"):
        for bad in (np.nan, np.inf, -np.inf):
            rng = np.random.default_rng(0)
            params, grads = two_layer_tree(rng), two_layer_tree(rng)
            state = tx.init(params)  # from finite params: the bad value arrives at update time
            target = grads if where == "gradient" else params
            target["k"]["kernel"][1, 2] = bad
            if where == "gradient":
                target["k"]["bias"][3] = bad
            u, _ = update(grads, state, params)
            err = f"{name}: a {bad} in the {where} gave a finite update"
            layer = np.asarray(u["k"]["kernel"])
            # per_unit: each output unit (column) is its own layer; only unit 2 is hit
            hit = layer[:, 2] if name == "per_unit" else layer
            assert not np.isfinite(hit).any(), err
            if where == "gradient":  # biases pass the gradient on (or 0 × it when frozen)
                assert not np.isfinite(np.asarray(u["k"]["bias"])[3]), err
            assert np.isfinite(np.asarray(u["m"]["kernel"])).all(), "the other layer must not care"


def test_zero_gradient_still_gives_exactly_zero():
    """The NaN guards must not turn 0 into NaN: zero direction, zero update, every op."""
    rng = np.random.default_rng(1)
    params = two_layer_tree(rng)
    grads = jax.tree.map(np.zeros_like, params)
    for name, make in ALL.items():
        if name in ("project_to_initial_norm", "cap_norm_increase", "adapt_copy"):
            continue
        tx = make()
        u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        for leaf in jax.tree.leaves(u):
            assert np.all(np.asarray(leaf) == 0), name


# ----------------------------------------------------------------------------- monitor


@functools.cache
def monitor_update(wrapped: bool):
    tx = ol.track_rotation(optax.sgd(1.0) if wrapped else None)
    return tx, jax.jit(tx.update)


def monitor_figures(params, updates, init_params=None, wrapped=False):
    tx, update = monitor_update(wrapped)
    state = tx.init(params if init_params is None else init_params)
    _, state = update(updates, state, params)
    return {n: {k: np.asarray(v, np.float64) for k, v in getattr(state, n).items()}
            for n in ("step_angle", "cosine_distance", "weight_norm", "update_norm", "grad_norm")}


@pytest.mark.parametrize("where", ["params", "update"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_monitor_propagates_nan_never_reports_zero(where, bad):
    rng = np.random.default_rng(2)
    params = {"k": {"kernel": rng.standard_normal((8, 16)).astype(np.float32)},
              "m": {"kernel": rng.standard_normal((16, 16)).astype(np.float32)}}
    updates = jax.tree.map(lambda x: 1e-2 * rng.standard_normal(x.shape).astype(np.float32), params)
    init = jax.tree.map(np.copy, params)
    (params if where == "params" else updates)["k"]["kernel"][3, 4] = bad
    figs = monitor_figures(params, updates, init)
    for name in ("step_angle", "cosine_distance", "weight_norm"):
        assert np.isnan(figs[name]["k/kernel"]) or np.isinf(figs[name]["k/kernel"]), name
        assert np.isfinite(figs[name]["m/kernel"]), name
    assert np.isnan(figs["step_angle"]["k/kernel"]) and np.isnan(figs["cosine_distance"]["k/kernel"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_monitor_measures_the_params_as_stored_in_low_precision(dtype):
    """bf16/f16: the figures are those of (w + u).astype(dtype), what apply_updates stores."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((16, 32)), dtype)
    tiny = (1e-5 * w).astype(dtype)  # each entry below half an ulp of its weight
    step = 0.05 * jnp.asarray(rng.standard_normal((16, 32)), dtype)
    stored = optax.apply_updates({"k": w}, {"k": step})["k"]
    assert bool(jnp.all(optax.apply_updates({"k": w}, {"k": tiny})["k"] == w))
    figs = monitor_figures({"k": {"kernel": w}}, {"k": {"kernel": tiny}})
    assert figs["step_angle"]["k/kernel"] == 0 and figs["update_norm"]["k/kernel"] == 0
    figs = monitor_figures({"k": {"kernel": w}}, {"k": {"kernel": step}})
    w64, s64 = np.asarray(w, np.float64), np.asarray(stored, np.float64)
    # The stored values are exact in float32 and so are their differences (Sterbenz; bf16/f16
    # differences fit float32): only the float32 sums round. The angle's one-pass ‖d⊥‖² is off
    # by 4 S(n) ‖d‖² (R = ‖d‖/‖d⊥‖ <= 2 for this random step: 16 S(n) relative, halved).
    n = w.size
    np.testing.assert_allclose(figs["step_angle"]["k/kernel"], angle(w64, s64),
                               rtol=8 * sum_err(n))
    np.testing.assert_allclose(figs["update_norm"]["k/kernel"], np.linalg.norm(s64 - w64),
                               rtol=sum_err(n))
    np.testing.assert_allclose(figs["weight_norm"]["k/kernel"], np.linalg.norm(s64),
                               rtol=sum_err(n))


@pytest.mark.parametrize("w_scale", [1e-30, 1e-19, 1e19, 1e30])
def test_monitor_is_right_for_tiny_and_huge_layers(w_scale):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 16))
    g = direction(w, 5, 0.3)
    u = -0.1 * g / np.linalg.norm(g) * np.linalg.norm(w)
    ref = monitor_figures(tree(w), tree(u), wrapped=True)
    got = monitor_figures(tree(w * w_scale), tree(u * w_scale), wrapped=True)
    k = "k/kernel"
    # two float32 evaluations (one on power-of-two-rescaled copies) of inputs that differ by
    # the rounding of the power-of-ten scaling (u per entry): each side's sums are off by
    # S(n), which the one-pass ‖d⊥‖² and the law of cosines amplify by ‖d‖²/‖d⊥‖² =
    # ‖e‖²/‖e⊥‖² = 1.09 here (w⁰ = w, radial part 0.3): 8 S(n) covers both sides
    for name in ("step_angle", "cosine_distance"):
        np.testing.assert_allclose(got[name][k], ref[name][k], rtol=8 * sum_err(w.size))
    for name in ("weight_norm", "update_norm", "grad_norm"):
        np.testing.assert_allclose(got[name][k] / w_scale, ref[name][k], rtol=2 * sum_err(w.size))


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("direction", ["sgd", "adam"])
def test_monitor_wrapping_fused_layca_equals_the_standalone_monitor(direction, every):
    """track_rotation(layca(...)) takes its figures from Layca's own reduction pass (no pass of
    its own); they must equal what the monitor measures by itself (here forced by an identity
    after Layca, which hides Layca's state from it), and the params those of plain Layca.

    Error analysis (eps = 2**-23): the fused figures are the analytic ones of the float32
    ``w·w, s·w, s·s`` (one-pass ‖s⊥‖² off by <= eps R² relative, R = ‖s‖/‖s⊥‖ < 4 on this path)
    while the standalone monitor measures the stored fl(w + u) (directions moved by <= eps/2
    rad) with its own float32 sums: angles and norms agree to 32 eps relative + eps absolute;
    the distance goes through the law of cosines on each side, off by <= 4 eps_unit / CANCEL =
    2.4e-5 relative (see _layers.CANCEL), so 5e-5.
    """
    rng = np.random.default_rng(0)
    params = {f"Dense_{i}": {"kernel": jnp.asarray(rng.standard_normal((16, 32)), jnp.float32),
                             "bias": jnp.zeros(32)} for i in range(3)}
    base = optax.scale_by_adam() if direction == "adam" else None
    fused = ol.track_rotation(ol.layca(0.05, base=base), every=every)
    alone = ol.track_rotation(optax.chain(ol.layca(0.05, base=base), optax.identity()),
                              every=every)
    plain = ol.layca(0.05, base=base)
    txs = [fused, alone, plain]
    states = [tx.init(params) for tx in txs]
    steps = [jax.jit(tx.update) for tx in txs]
    ps = [params] * 3
    for t in range(2 * every + 1):
        g = jax.tree.map(lambda x, t=t: jnp.asarray(
            np.random.default_rng(t).standard_normal(x.shape), jnp.float32), params)
        for i in range(3):
            u, states[i] = steps[i](g, states[i], ps[i])
            ps[i] = optax.apply_updates(ps[i], u)
    for a, b in zip(jax.tree.leaves(ps[0]), jax.tree.leaves(ps[2])):  # a pass-through
        np.testing.assert_allclose(a, b, rtol=0, atol=2 * EPS * float(jnp.max(jnp.abs(b))))
    for name in ("step_angle", "cumulative_angle", "weight_norm", "update_norm", "grad_norm"):
        for k, v in getattr(states[1], name).items():
            np.testing.assert_allclose(getattr(states[0], name)[k], v, rtol=32 * EPS, atol=EPS,
                                       err_msg=f"{name} {k}")
    for k, v in states[1].cosine_distance.items():
        np.testing.assert_allclose(states[0].cosine_distance[k], v, rtol=5e-5, err_msg=k)


def test_monitor_wrapping_fused_layca_materialises_no_update():
    """The point of the fused path: in the compiled step the only layer-sized arrays computed
    at top level are the new params (the update stays fused into apply_updates; the rare
    fallbacks live in branches), while the standalone monitor materialises the update."""
    rng = np.random.default_rng(1)
    params = {f"Dense_{i}": {"kernel": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)}
              for i in range(2)}

    def layer_sized_top_level_arrays(tx):
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
        entry = lowered.compile().as_text().split("ENTRY", 1)[1]
        return sum(" f32[64,64]{1,0} fusion(" in line or " f32[64,64]{1,0} copy(" in line
                   for line in entry.splitlines())

    assert layer_sized_top_level_arrays(ol.track_rotation(ol.layca(0.1))) == 2
    alone = ol.track_rotation(optax.chain(ol.layca(0.1), optax.identity()))
    assert layer_sized_top_level_arrays(alone) > 2
