"""Overhead of the layer-rotation monitor on a jitted MLP train step (DESIGN §9: ≤ 1.10×).

Times, interleaved in one process (medians of round-robin repeats), one jitted train step
(forward + backward + optimizer update + ``apply_updates``) of a ReLU MLP:

* fused Layca without / with ``track_rotation()`` at the end of the chain (the standalone
  monitor: one pass over (w, u, w⁰) per layer, the update materialised);
* fused Layca without / wrapped in ``track_rotation(layca(...))`` (the fused path: Layca adds
  w⁰ and g to its own reduction pass and derives the figures);
* Adam without / with the monitor wrapping it (``track_rotation(optax.adam(...))``, which
  also records the raw gradient norm).

Usage: ``python benchmarks/monitor_overhead.py [--quick]``; writes
``benchmarks/results/monitor_overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import dense_params, time_interleaved, write_results

import optax_layca as ol

TARGET = 1.10
EVERY = 10
ROUNDS = 3




def loss_fn(p, x, y):
    n = len(p)
    for i in range(n):
        x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def make_step(tx):
    @functools.partial(jax.jit, donate_argnums=(0, 1))  # as in a real loop: no copies
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        sizes, batch, repeats, rounds = (16, 32, 10), 8, 2, 1
    else:
        sizes, batch, repeats, rounds = (784, 512, 512, 512, 10), 128, 30, ROUNDS
    params = dense_params(sizes, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, sizes[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, sizes[-1], batch))
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))

    pairs = {
        "layca (wrapped)": (
            ol.layca(0.01),
            ol.track_rotation(ol.layca(0.01)),
            ol.track_rotation(ol.layca(0.01), every=EVERY),
        ),
        "layca (chain)": (
            ol.layca(0.01),
            optax.chain(ol.layca(0.01), ol.track_rotation()),
            optax.chain(ol.layca(0.01), ol.track_rotation(every=EVERY)),
        ),
        "adam": (
            optax.adam(1e-3),
            ol.track_rotation(optax.adam(1e-3)),
            ol.track_rotation(optax.adam(1e-3), every=EVERY),
        ),
    }
    if args.quick:  # smoke run: the chain form only (train_step --quick runs the wrapped ones)
        pairs = {"layca (chain)": pairs["layca (chain)"]}
    labels = ("plain", "monitored", f"every{EVERY}")
    fns, checks = {}, {}
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    for name, txs in pairs.items():
        for label, tx in zip(labels, txs):
            step, init = make_step(tx), jax.jit(tx.init)  # init: one program, not op by op
            checks[f"{name}/{label}"] = step(copy(params), init(copy(params)), x, y)[0]
            carry = [step(copy(params), init(copy(params)), x, y)]

            def run(step=step, carry=carry):
                carry[0] = step(*carry[0], x, y)
                return carry[0]

            fns[f"{name}/{label}"] = run
    # the monitor is a pass-through: same parameters after one step
    for name in pairs:
        for label in labels[1:]:
            for a, b in zip(
                jax.tree.leaves(checks[f"{name}/plain"]), jax.tree.leaves(checks[f"{name}/{label}"])
            ):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # the machine is shared: several rounds of interleaved medians, keep each candidate's best
    medians = [time_interleaved(fns, repeats=repeats) for _ in range(rounds)]
    times = {k: min(r[k] for r in medians) for k in fns}
    rows, results = [], {}
    for name in pairs:
        t0, t1, tk = (times[f"{name}/{label}"] for label in labels)
        results[name] = {
            "plain_s": t0,
            "monitored_s": t1,
            f"every{EVERY}_s": tk,
            "ratio": t1 / t0,
            f"ratio_every{EVERY}": tk / t0,
            "meets_target": t1 / t0 <= TARGET,
        }
        rows.append(
            [
                name,
                f"{1e3 * t0:.3f}",
                f"{1e3 * t1:.3f}",
                f"{t1 / t0:.3f}",
                f"{1e3 * tk:.3f}",
                f"{tk / t0:.3f}",
            ]
        )
        print(
            f"{name:16s} plain {1e3 * t0:8.3f} ms  monitored {1e3 * t1:8.3f} ms "
            f"({t1 / t0:.3f}x)  every={EVERY} {1e3 * tk:8.3f} ms ({tk / t0:.3f}x)"
        )
    write_results(
        "monitor_overhead",
        {
            "quick": args.quick,
            "sizes": list(sizes),
            "batch": batch,
            "num_params": n_params,
            "repeats": repeats,
            "rounds": rounds,
            "target_ratio": TARGET,
            "results": results,
        },
        rows,
        [
            "optimizer",
            "step (ms)",
            "+ monitor (ms)",
            "ratio",
            f"+ monitor every={EVERY} (ms)",
            "ratio",
        ],
        "Rotation monitor overhead (jitted MLP train step)",
        notes=(
            f"MLP {'-'.join(map(str, sizes))} ({n_params:,} params), batch {batch}; "
            f"best of {rounds} rounds of medians of {repeats} interleaved repeats. "
            "`layca (wrapped)`: `track_rotation(layca(0.01))`, the fused path (Layca's own "
            "reduction pass also reads w0 and g; no pass of the monitor's own, the update never "
            "materialised); `layca (chain)`: `chain(layca(0.01), track_rotation())`, the "
            "standalone monitor; `adam`: `track_rotation(adam(1e-3))`. Command: "
            f"`python benchmarks/monitor_overhead.py{' --quick' if args.quick else ''}`. "
            f"Target: monitored step <= {TARGET}x the plain step. The standalone monitor makes "
            "one variadic reduction pass over (w, u, w0, g) per layer and materialises the update "
            f"(a `lax.cond` operand). `every={EVERY}` computes the figures on one update in "
            f"{EVERY} (`lax.cond`). This machine is shared and noisy: ratios vary by ~0.1 "
            "between runs."
            + (
                " Quick mode: a tiny model, the chain form only, dispatch-dominated; smoke "
                "test only."
                if args.quick
                else ""
            )
        ),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
