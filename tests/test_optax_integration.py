"""Layca inside the optax/flax ecosystem: injected rates change the rotation without a
retrace, schedules, chains, linen TrainState, nnx.Optimizer.

The generic optax contract (single trace, MultiSteps, apply_if_finite, masked, partition,
extra arguments, dtypes) is checked for every transform in ``test_contract.py``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _utils import (
    angle,
    assert_trees_close,
    eq1_multiplier,
    flat,
    init_mlp,
    mlp_data,
    mlp_loss_jax,
    nnx_mlp,
)
from flax import nnx
from flax.training import train_state

import optax_layca as ol

SIZES = [5, 6, 6, 3]
KERNELS = [f"Dense_{i}/kernel" for i in range(3)]
P0 = init_mlp(SIZES, seed=2)
X, Y = mlp_data(SIZES, n=32, seed=3)
grad = jax.jit(jax.grad(mlp_loss_jax))


def kernels(tree):
    return {k: v for k, v in flat(tree).items() if k.endswith("kernel")}


def test_inject_hyperparams_lr_and_alpha_change_without_retrace():
    is_layer = lambda path, leaf: path.endswith("kernel")  # a callable: must be static
    tx = optax.inject_hyperparams(ol.layca, static_args=("is_layer",))(
        learning_rate=0.1, alpha=0.0, is_layer=is_layer
    )
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        u, s = tx.update(jax.grad(mlp_loss_jax)(p, X, Y), s, p)
        return optax.apply_updates(p, u), s

    p, s = P0, tx.init(P0)
    rng = np.random.default_rng(0)
    for t in range(100):
        lr, alpha = float(rng.uniform(0.01, 0.1)), float(rng.choice([-1.0, -0.5, 0.0, 0.3, 1.0]))
        s.hyperparams["learning_rate"] = jnp.float32(lr)
        s.hyperparams["alpha"] = jnp.float32(alpha)
        new, s = step(p, s)
        if t % 10 == 0:  # the rates really changed: rotation = arctan(m_l(α) lr)
            a, b = kernels(p), kernels(new)
            for l, k in enumerate(KERNELS):
                expected = np.arctan(eq1_multiplier(alpha, l, 3) * lr)
                np.testing.assert_allclose(
                    angle(a[k], b[k]) if expected else np.linalg.norm(a[k] - b[k]),
                    expected,
                    rtol=1e-4,
                    atol=1e-6,
                    err_msg=f"step {t} {k}",
                )
        p = new
    assert len(traces) == 1


def _rotation_schedule_check(tx, sched, steps, rtol=1e-4):
    step = jax.jit(lambda p, s: tx.update(grad(p, X, Y), s, p))
    p, s = P0, tx.init(P0)
    for t in range(steps):
        u, s = step(p, s)
        new = optax.apply_updates(p, u)
        for k in KERNELS:
            np.testing.assert_allclose(
                angle(kernels(p)[k], kernels(new)[k]),
                np.arctan(float(sched(t))),
                rtol=rtol,
                atol=1e-6,
                err_msg=f"step {t} {k}",
            )
        p = new


def test_epoch_wise_step_decay_schedule():
    """The papers' ×0.2 at epochs 80/90/97 of 100, one line of optax (here 1 step/epoch)."""
    steps_per_epoch, lr = 1, 3.0**-3
    sched = optax.piecewise_constant_schedule(lr, {e * steps_per_epoch: 0.2 for e in (80, 90, 97)})
    assert np.isclose(float(sched(99)), lr * 0.2**3)
    # Near a minimum on the sphere the gradient gets almost parallel to w (here ‖g‖/‖g⊥‖
    # reaches ~40 around step 30): the rotation must still be exact.
    _rotation_schedule_check(ol.layca(sched), sched, 100)


def test_linear_warmup_from_lr_over_10():
    lr, warm = 0.1, 5
    sched = optax.join_schedules(
        [optax.linear_schedule(lr / 10, lr, warm), optax.constant_schedule(lr)], [warm]
    )
    assert np.isclose(float(sched(0)), lr / 10) and np.isclose(float(sched(warm)), lr)
    _rotation_schedule_check(ol.layca(sched, fused=False), sched, 8)


def test_inside_chain():
    """Clipping the global norm upstream changes no layer (only the direction matters)."""
    g = grad(P0, X, Y)
    tx = optax.chain(optax.clip_by_global_norm(1e-3), ol.layca(0.05, non_layer="freeze"))
    u, _ = tx.update(g, tx.init(P0), P0)
    ref = ol.layca(0.05, non_layer="freeze")
    ur, _ = ref.update(g, ref.init(P0), P0)
    assert_trees_close(u, ur, rtol=1e-5, atol=1e-8)
    # And composes downstream with plain optax transforms.
    tx = optax.chain(ol.layca(0.05), optax.scale(0.5))
    u2, _ = tx.update(g, tx.init(P0), P0)
    assert_trees_close(
        u2,
        jax.tree.map(lambda x: 0.5 * x, ol.layca(0.05).update(g, ol.layca(0.05).init(P0), P0)[0]),
        rtol=1e-6,
    )


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, n in enumerate(SIZES[1:]):
            x = nn.Dense(n)(x)
            if i < len(SIZES) - 2:
                x = jnp.tanh(x)
        return x


def test_flax_linen_train_state():
    model = LinenMLP()
    params = jax.tree.map(jnp.asarray, P0)  # same names and layout as the linen model
    order = ol.forward_order(lambda p, x: model.apply({"params": p}, x), params, X)
    assert order == tuple(KERNELS)
    tx = ol.layca(0.05, base=optax.scale_by_adam(), alpha=0.5, layer_order=order)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    @jax.jit
    def train_step(state):
        loss = lambda p: 0.5 * jnp.mean(jnp.sum((state.apply_fn({"params": p}, X) - Y) ** 2, 1))
        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    p, s = P0, tx.init(P0)
    for _ in range(5):
        state = train_step(state)
        u, s = tx.update(grad(p, X, Y), s, p)
        p = optax.apply_updates(p, u)
    assert_trees_close(state.params, p, rtol=1e-5, atol=1e-6)
    for k in KERNELS:
        np.testing.assert_allclose(
            np.linalg.norm(kernels(state.params)[k]), np.linalg.norm(kernels(P0)[k]), rtol=1e-6
        )


def test_nnx_optimizer_with_forward_order():
    # Attribute names sort against the forward order: z -> m -> a.
    model = nnx_mlp(SIZES, ("z_in", "m_mid", "a_out"))
    graphdef, state = nnx.split(model, nnx.Param)
    order = ol.forward_order(lambda s, x: nnx.merge(graphdef, s)(x), state, X)
    assert order == ("z_in/kernel", "m_mid/kernel", "a_out/kernel")
    n0 = {
        p: np.linalg.norm(np.asarray(nnx.to_pure_dict(state)[p.split("/")[0]]["kernel"]))
        for p in order
    }
    alpha, lr = 0.5, 0.05
    # The same layer_order list serves init (paths end in .value) and update (pure arrays).
    opt = nnx.Optimizer(model, ol.layca(lr, alpha=alpha, layer_order=order), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt):
        loss = lambda m: 0.5 * jnp.mean(jnp.sum((m(X) - Y) ** 2, 1))
        opt.update(model, nnx.grad(loss)(model))

    for _ in range(3):
        before = {p: np.asarray(getattr(model, p.split("/")[0]).kernel[...]) for p in order}
        train_step(model, opt)
        for l, p in enumerate(order):
            after = np.asarray(getattr(model, p.split("/")[0]).kernel[...])
            np.testing.assert_allclose(
                angle(before[p], after),
                np.arctan(eq1_multiplier(alpha, l, 3) * lr),
                rtol=1e-4,
                atol=1e-6,
                err_msg=p,
            )
            np.testing.assert_allclose(np.linalg.norm(after), n0[p], rtol=1e-6)
