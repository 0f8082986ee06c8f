"""Shared timing helpers for the benchmarks: interleaved repeats, medians, JSON + Markdown out.

This machine is noisy, so every benchmark times its candidates *side by side in one process*,
interleaving them round by round, and reports ratios of medians.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax

# Quick (CI smoke) runs write elsewhere so they never overwrite the committed full results.
RESULTS = Path(os.environ.get("OPTAX_LAYCA_BENCH_RESULTS", Path(__file__).resolve().parent / "results"))


def block(x):
    return jax.block_until_ready(x)


def time_samples(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 2
                 ) -> dict[str, list[float]]:
    """Wall times (s) of each zero-argument callable, ``repeats`` each, timed round-robin.

    Each callable must return its device result (it is blocked on). Warm-up calls compile.
    Interleaving puts every candidate under the same background load, so ratios of their
    medians are meaningful on a shared machine where absolute times are not; the order is
    shuffled every round (seeded) so that no candidate always follows the same neighbour.
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 2):
    """Median wall time (s) of each zero-argument callable, timed round-robin (see
    :func:`time_samples`)."""
    return {name: statistics.median(ts) for name, ts in time_samples(fns, repeats, warmup).items()}


def dense_params(sizes, key) -> dict:
    """He-initialised ``{"Dense_i": {"kernel", "bias"}}`` MLP params (shared benchmark fixture)."""
    import itertools

    import jax.numpy as jnp
    import numpy as np

    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, k = jax.random.split(key)
        params[f"Dense_{i}"] = {
            "kernel": jax.random.normal(k, (a, b)) * np.sqrt(2 / a),
            "bias": jnp.zeros(b),
        }
    return params


def environment() -> dict:
    dev = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "num_devices": jax.device_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def write_results(name: str, payload: dict, table_rows: list[list[str]], header: list[str],
                  title: str, notes: str = "") -> Path:
    """Writes ``results/<name>.json`` and ``results/<name>.md``; returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    lines = [f"# {title}", "", f"Environment: `{json.dumps(payload['environment'])}`", ""]
    if notes:
        lines += [notes, ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table_rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return path
