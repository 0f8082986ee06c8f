"""Sharded params over 8 host CPU devices give the same Layca/LARS updates as unsharded.

Runs in its own process: ``--xla_force_host_platform_device_count`` must be set before jax
starts and must not leak into the main pytest process.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import optax_layca as ol

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    shapes = {"conv_0": (3, 3, 4, 16), "conv_1": (3, 3, 16, 32), "dense_2": (32, 8)}
    params = {k: {"kernel": jnp.asarray(rng.standard_normal(s) / np.sqrt(np.prod(s[:-1])),
                                        jnp.float32),
                  "bias": jnp.asarray(0.1 * rng.standard_normal(s[-1]), jnp.float32)}
              for k, s in shapes.items()}
    specs = {"conv_0": {"kernel": P(None, None, None, "model"), "bias": P("model")},
             "conv_1": {"kernel": P(None, None, "data", "model"), "bias": P()},
             "dense_2": {"kernel": P("data", None), "bias": P()}}
    sharding = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                            is_leaf=lambda x: isinstance(x, P))
    sharded = jax.device_put(params, sharding)
    single = jax.device_put(params, jax.devices()[0])
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
             for _ in range(5)]

    def run(tx, p):
        s = tx.init(p)
        step = jax.jit(lambda p, s, g: tx.update(g, s, p))
        for g in grads:
            g = jax.device_put(g, jax.tree.map(lambda x: x.sharding, p))
            u, s = step(p, s, g)
            p = optax.apply_updates(p, u)
        return p

    order = ["conv_0/kernel", "conv_1/kernel", "dense_2/kernel"]
    txs = {
        "fused": ol.layca(0.1, base=optax.scale_by_adam(), alpha=0.5, layer_order=order),
        "lars": ol.lars(0.1, alpha=0.5, layer_order=order),
        "per_unit": ol.layca(0.1, per_unit=True),
    }
    out = {}
    for name, tx in txs.items():
        a, b = run(tx, sharded), run(tx, single)
        kept = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in
                   zip(jax.tree.leaves(a), jax.tree.leaves(sharding)))
        err = max(float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(y)))
                  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        norm_err = max(abs(float(jnp.linalg.norm(a[k]["kernel"]) / jnp.linalg.norm(params[k]["kernel"])) - 1)
                       for k in shapes)
        out[name] = {"rel_err": err, "sharding_kept": bool(kept), "norm_err": norm_err}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_sharded_equals_unsharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    assert set(result) == {"fused", "lars", "per_unit"}
    for name, r in result.items():
        assert r["rel_err"] < 1e-6, (name, r)
        assert r["sharding_kept"], (name, r)
        if name != "lars":  # LARS lets the norm grow (capped); Layca keeps it
            assert r["norm_err"] < 2e-6, (name, r)
