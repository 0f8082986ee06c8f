"""Fused Layca update time versus parameter count: it should grow linearly.

Times one jitted ``layca`` update (+ ``apply_updates``) next to ``optax.sgd`` on trees of
square kernels with 0.25M … 16M floats, interleaved in one process, and fits the slope of
log(time) against log(size) (1.0 = linear).

    python benchmarks/scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _timing import time_interleaved, write_results  # noqa: E402

import optax_layca as ol  # noqa: E402


def tree_of_size(total: int, layers: int = 4):
    side = int(np.sqrt(total / layers))
    key = jax.random.key(0)
    return {f"Dense_{i}": {"kernel": jax.random.normal(jax.random.fold_in(key, i), (side, side))}
            for i in range(layers)}


def step_fn(tx, params):
    state = jax.jit(tx.init)(params)  # one program, not op by op
    grads = jax.tree.map(lambda x: x * 0.01 + 1.0, params)

    @jax.jit
    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return lambda: step(params, state, grads)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    # quick (smoke run): the two points a slope needs, each one more pair of compilations
    sizes = [2**12, 2**14] if args.quick else [2**18, 2**20, 2**22, 2**24]
    repeats = 2 if args.quick else 15
    rows, out = [], {}
    for n in sizes:
        params = tree_of_size(n)
        t = time_interleaved({"layca": step_fn(ol.layca(0.1), params),
                              "sgd": step_fn(optax.sgd(0.1), params)}, repeats=repeats)
        count = sum(x.size for x in jax.tree.leaves(params))
        out[count] = t
        rows.append([f"{count:,}", f"{t['layca'] * 1e3:.2f}", f"{t['sgd'] * 1e3:.2f}",
                     f"{t['layca'] / t['sgd']:.2f}", f"{t['layca'] / count * 1e9:.2f}"])
    counts = np.array(list(out))
    slope = float(np.polyfit(np.log(counts), np.log([out[c]["layca"] for c in counts]), 1)[0])
    write_results(
        "scaling",
        {"quick": args.quick, "times_s": {str(k): v for k, v in out.items()}, "loglog_slope": slope},
        rows, ["params", "layca ms", "sgd ms", "layca/sgd", "layca ns/param"],
        "Fused Layca update time vs parameter count",
        notes=f"Slope of log(time) vs log(params): **{slope:.2f}** (1.0 = linear).",
    )
    print(f"log-log slope {slope:.2f}")
    return out


if __name__ == "__main__":
    main()
