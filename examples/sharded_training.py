"""Data-parallel and fully sharded Layca training with JAX's own sharding.

Run on 8 simulated CPU devices::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_training.py

Nothing here is specific to Layca: the optimizer is an ordinary optax transform inside a jitted
step whose inputs carry ``NamedSharding``s. Layca's per-layer reductions (``w·w``, ``s·w``,
``s·s``) are ``jnp.sum`` calls over the whole kernel, so when a kernel is split across devices
XLA inserts the all-reduce and the norms are *global*, never per shard: the sharded run gives
the same numbers as one device (up to float summation order).

Modes:

* ``replicated``: one device, the reference.
* ``data``: data parallel: batch split over the ``data`` mesh axis, params replicated; the
  gradient mean over the batch becomes an all-reduce.
* ``fsdp``: fully sharded: batch over ``data`` *and* every kernel's largest divisible axis over
  ``model`` (params, gradients and optimizer state all sharded, as in ZeRO-3/FSDP).

Multi-host: call ``jax.distributed.initialize()`` first on every host (it reads the cluster
from the environment on TPU pods, SLURM and GKE), build the mesh from ``jax.devices()`` (all
hosts' devices), and feed each host its slice of the batch with
``jax.make_array_from_process_local_data(sharding, local_batch)``. Checkpoint with Orbax, which
writes each host's shards. Nothing else in this script changes.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_layca as ol

SIZES = (32, 64, 64, 16)


def init_params(key):
    keys = jax.random.split(key, len(SIZES))
    return {
        f"Dense_{i}": {
            "kernel": jax.random.normal(keys[i], (a, b)) / np.sqrt(a),
            "bias": jnp.zeros(b),
        }
        for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:]))
    }


def loss_fn(params, x, y):
    h = x
    for i in range(len(SIZES) - 1):
        h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < len(SIZES) - 2:
            h = jax.nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def param_spec(leaf, model_size: int) -> P:
    """Shards a kernel's largest axis that divides by the model-axis size; replicates the rest."""
    if leaf.ndim < 2:
        return P()
    axis = int(np.argmax(leaf.shape))
    if leaf.shape[axis] % model_size:
        return P()
    spec = [None] * leaf.ndim
    spec[axis] = "model"
    return P(*spec)


def train(mode: str = "data", steps: int = 20, batch: int = 64, seed: int = 0):
    """Trains the MLP with Layca+Adam direction for ``steps`` steps; returns params (numpy)."""
    tx = ol.layca(0.05, base=optax.scale_by_adam(), alpha=0.2)
    params = init_params(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((steps, batch, SIZES[0])).astype(np.float32)
    ys = rng.integers(0, SIZES[-1], (steps, batch))

    devices = np.array(jax.devices())
    if mode == "replicated":
        mesh = Mesh(devices[:1].reshape(1, 1), ("data", "model"))
    elif mode == "data":
        mesh = Mesh(devices.reshape(-1, 1), ("data", "model"))
    elif mode == "fsdp":
        n = len(devices)
        model = 2 if n % 2 == 0 and n > 1 else 1
        mesh = Mesh(devices.reshape(n // model, model), ("data", "model"))
    else:
        raise ValueError(f"`mode` must be 'replicated', 'data' or 'fsdp'; got {mode!r}.")

    model_size = mesh.shape["model"]
    p_shard = jax.tree.map(lambda w: NamedSharding(mesh, param_spec(w, model_size)), params)
    params = jax.device_put(params, p_shard)
    state = tx.init(params)
    # Per-leaf state (‖w⁰‖, Adam moments) follows its param's sharding; scalars such as the
    # step count are created on one device, so replicate them over the mesh.
    s_shard = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else NamedSharding(mesh, P()),
        state,
    )
    state = jax.device_put(state, s_shard)
    batch_shard = NamedSharding(mesh, P("data"))

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        # Keep the layouts stable across steps (no resharding, no retrace).
        params = jax.lax.with_sharding_constraint(params, p_shard)
        state = jax.lax.with_sharding_constraint(state, s_shard)
        return params, state

    for x, y in zip(xs, ys):
        x, y = jax.device_put((x, y), batch_shard)
        params, state = step(params, state, x, y)
    return jax.tree.map(np.asarray, params), p_shard


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    ref, _ = train("replicated", args.steps)
    for mode in ("data", "fsdp"):
        out, shard = train(mode, args.steps)
        err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)))
        specs = sorted({str(s.spec) for s in jax.tree.leaves(shard)})
        print(f"{mode:5s} on {jax.device_count()} devices: max |Δparam| vs 1 device = {err:.2e}; specs {specs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
