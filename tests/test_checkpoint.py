"""Optimizer states round-trip through Orbax; an interrupted run resumes bit-identically."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _utils import init_mlp, mlp_xent_jax

import optax_layca as ol

SIZES = (8, 16, 16, 4)


def transforms():
    schedule = optax.piecewise_constant_schedule(0.1, {5: 0.2})
    return {
        "layca_adam": ol.layca(schedule, base=optax.scale_by_adam(), alpha=0.3),
        "layca_chain": ol.layca(0.1, base=optax.trace(0.9), fused=False),
        "lars": ol.lars(0.05, base=optax.ema(0.9, debias=False)),
        "injected": optax.inject_hyperparams(ol.layca)(learning_rate=0.1, alpha=-0.2),
        "multisteps": optax.MultiSteps(ol.layca(0.1), every_k_schedule=2),
        "monitored": optax.chain(ol.layca(0.1), ol.track_rotation()),
        "monitor_wrapping_adam": ol.track_rotation(optax.adam(1e-2)),
        "adapt_copy": ol.adapt_copy(
            {f"Dense_{i}/kernel": np.linspace(0.01, 0.05 * (i + 1), 12) for i in range(3)},
            base=optax.ema(0.9, debias=False)),
        "adapt_copy_curve": ol.adapt_copy(
            {f"Dense_{i}/kernel": np.linspace(0.001, 0.2, 12) for i in range(3)},
            target="cosine_distance"),
    }


def batches(n):
    key = jax.random.key(42)
    for i in range(n):
        kx, ky = jax.random.split(jax.random.fold_in(key, i))
        yield jax.random.normal(kx, (32, 8)), jax.random.randint(ky, (32,), 0, 4)


# three representatives (fused Layca + monitor, chained Layca, AdaptCopy); the other transforms
# are marked extended, which the fast subset (-m "not slow and not extended") leaves out
DEFAULT = ("monitored", "layca_chain", "adapt_copy")


@pytest.mark.parametrize(
    "name",
    [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.extended) for n in sorted(transforms())],
)
def test_interrupted_run_resumes_bit_identically(name, tmp_path):
    tx = transforms()[name]

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(mlp_xent_jax)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    data = list(batches(10))
    params = init_mlp(SIZES, seed=0)
    state = tx.init(params)
    reference = (params, state)
    for x, y in data:
        reference = step(*reference, x, y)

    # Run 4 steps, checkpoint, "crash", restore into fresh objects, finish.
    run = (params, state)
    for x, y in data[:4]:
        run = step(*run, x, y)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", {"params": run[0], "opt_state": run[1]})
    checkpointer.wait_until_finished()
    del run

    fresh_params = init_mlp(SIZES, seed=123)  # different values, same structure
    target = {"params": fresh_params, "opt_state": tx.init(fresh_params)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = checkpointer.restore(tmp_path / "ckpt", abstract)
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(target["opt_state"])
    run = (restored["params"], restored["opt_state"])
    for x, y in data[4:]:
        run = step(*run, x, y)

    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(run)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
