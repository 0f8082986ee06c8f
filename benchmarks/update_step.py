"""Jitted optimizer update time: fused/chained Layca and the papers' LARS vs optax.

    python benchmarks/update_step.py            # full: WRN-28-10-shaped params (36.5M floats)
    python benchmarks/update_step.py --quick    # CI smoke: WRN-4-1, fused Layca vs references

One step is ``tx.update`` + ``optax.apply_updates`` under ``jax.jit``, from a fixed gradient
tree, with the params and optimizer state donated (updated in place) and, separately, not. All candidates are
timed side by side in one process, round-robin (``time_interleaved``), and reported as medians
and ratios to ``optax.sgd`` and ``optax.lars``. Targets (DESIGN §9): fused Layca ≤ 3× ``optax.sgd``
and ≤ 0.5× ``optax.lars`` on CPU; ≤ 1.7× ``optax.sgd`` on GPU.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import time_samples, write_results

import optax_layca as ol


def wrn_shapes(depth: int = 28, width: int = 10, num_classes: int = 10) -> dict[str, tuple]:
    """Param shapes of a Wide ResNet (Zagoruyko & Komodakis), pre-activation blocks, Flax
    layout, in forward order: conv kernels 3x3 (widths 16·k, 32·k, 64·k), 1x1 shortcut convs
    where the width changes, BatchNorm scales/biases, a final Dense. WRN-28-10: 36.5M floats."""
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    shapes = {"stem/conv/kernel": (3, 3, 3, widths[0])}
    cin = widths[0]
    for g in range(3):
        cout = widths[g + 1]
        for b in range(n):
            pre = f"group{g}_block{b}"
            shapes[f"{pre}/bn1/scale"] = (cin,)
            shapes[f"{pre}/bn1/bias"] = (cin,)
            shapes[f"{pre}/conv1/kernel"] = (3, 3, cin, cout)
            shapes[f"{pre}/bn2/scale"] = (cout,)
            shapes[f"{pre}/bn2/bias"] = (cout,)
            shapes[f"{pre}/conv2/kernel"] = (3, 3, cout, cout)
            if cin != cout:
                shapes[f"{pre}/shortcut/kernel"] = (1, 1, cin, cout)
            cin = cout
    shapes["final_bn/scale"] = (cin,)
    shapes["final_bn/bias"] = (cin,)
    shapes["head/kernel"] = (cin, num_classes)
    shapes["head/bias"] = (num_classes,)
    return shapes


def mlp_shapes(sizes=(784, 256, 256, 10)) -> dict[str, tuple]:
    shapes = {}
    for i, (m, n) in enumerate(itertools.pairwise(sizes)):
        shapes[f"Dense_{i}/kernel"] = (m, n)
        shapes[f"Dense_{i}/bias"] = (n,)
    return shapes


def nest(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for path, x in flat.items():
        *head, last = path.split("/")
        d = out
        for k in head:
            d = d.setdefault(k, {})
        d[last] = x
    return out


def make_tree(shapes: dict[str, tuple], seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in shapes.items():
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        flat[path] = jnp.asarray(
            rng.standard_normal(shape, dtype=np.float32) * scale / np.sqrt(fan_in)
        )
    return nest(flat)


def prototype(lr: float) -> optax.GradientTransformation:
    """The 12-line fused Layca of the design notes: three ``jnp.sum`` per layer, the scalar
    algebra, one elementwise pass; no near-parallel pass, no scale or NaN handling, no
    schedules. A floor for what the package's fused form costs (not a package API)."""
    layers = lambda tree: [x.ndim >= 2 for x in jax.tree.leaves(tree)]

    def init(params):
        return [jnp.sqrt(jnp.sum(w * w)) for w in jax.tree.leaves(params)]

    def update(g, n0s, params):
        out = []
        for is_layer, s, w, n0 in zip(layers(params), jax.tree.leaves(g),
                                      jax.tree.leaves(params), n0s):
            if not is_layer:
                out.append(-lr * s)
                continue
            a, b, c = jnp.sum(w * w), jnp.sum(s * w), jnp.sum(s * s)
            inv = jnp.sqrt(a / (c - b * (b / a)))
            k = n0 / jnp.sqrt(a * (1 + lr * lr))
            out.append((k - 1 + k * lr * inv * (b / a)) * w - k * lr * inv * s)
        return jax.tree.unflatten(jax.tree.structure(g), out), n0s

    return optax.GradientTransformation(init, update)


def candidates(order: list[str], quick: bool = False) -> dict[str, optax.GradientTransformation]:
    lr = 0.1
    out = {
        "optax.sgd": optax.sgd(lr),
        "optax.adam": optax.adam(1e-3),
        "optax.lars": optax.lars(lr),
        "layca (fused)": ol.layca(lr, layer_order=order),
        "layca (chained)": ol.layca(lr, layer_order=order, fused=False),
        "lars (paper)": ol.lars(lr, layer_order=order),
        "prototype (12 lines)": prototype(lr),
    }
    return {k: v for k, v in out.items() if k in QUICK} if quick else out


# Quick mode (a smoke run: compilation dominates it on 2 CPU cores) times only what its targets
# read: fused Layca and the references it is compared to.
QUICK = ("optax.sgd", "optax.lars", "layca (fused)", "prototype (12 lines)")
QUICK_NOT_DONATED = ("optax.sgd", "optax.lars", "layca (fused)")


NEAR_PARALLEL = "layca (fused), near-parallel steps"


def hlo_facts(compiled) -> dict:
    """What the compiled executable does, read from its HLO text: donated outputs aliased to
    inputs, copies, conditionals, reductions and fusions, and its temporary memory."""
    text = compiled.as_text()
    head = text.split("\n", 1)[0].split("entry_computation_layout", 1)[0]
    entry = text.split("ENTRY", 1)[1]
    return {
        "aliased_outputs": head.count("-alias)"),
        "copies": entry.count(" copy("),
        "conditionals": text.count(" conditional("),
        "entry_fusions": entry.count(" fusion("),
        "variadic_reduces": entry.count("reduce_fusion"),
        "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
    }


def bench_model(name: str, shapes: dict[str, tuple], repeats: int, quick: bool = False
                ) -> list[dict]:
    """Times every candidate twice: params/state donated (updated in place, the usual training
    loop) and not donated (fresh output buffers); ratios are within each regime.

    The gradient alternates between ``g`` and ``-g``: with a fixed gradient every Layca layer
    turns towards ``-g`` by ``arctan(0.1)`` per step and, from the 14th step on, is within
    14.5° of it, where the fused form takes its near-parallel second pass: the timing would mix
    two code paths. That path is timed apart, with a gradient nearly parallel to the weights.
    """
    order = [p for p in shapes if p.endswith("kernel")]  # shapes are listed in forward order
    params0 = make_tree(shapes, seed=0)
    g = make_tree(shapes, seed=1, scale=1e-2)
    grads = [g, jax.tree.map(jnp.negative, g)]
    # ‖g‖/‖g⊥‖ ≈ 100 in every layer: the second pass runs on every step
    parallel = jax.tree.map(lambda w, x: 3.0 * w + x, params0, g)
    num_floats = sum(int(np.prod(s)) for s in shapes.values())
    fns, holders, facts = {}, {}, {}
    runs = [(label, tx, donate, grads) for donate in (True, False)
            for label, tx in candidates(order, quick).items()
            if donate or not quick or label in QUICK_NOT_DONATED]
    runs.append((NEAR_PARALLEL, ol.layca(0.1, layer_order=order), True, [parallel, parallel]))
    for label, tx, donate, gs in runs:

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        # Each candidate owns its params and state; gradients are shared.
        p = jax.tree.map(jnp.copy, params0)
        holders[label, donate] = [p, jax.jit(tx.init)(p), 0]
        jstep = jax.jit(step, donate_argnums=(0, 1) if donate else ())
        jstep = jstep.lower(p, holders[label, donate][1], g).compile()
        facts[label, donate] = hlo_facts(jstep)

        def call(jstep=jstep, h=holders[label, donate], gs=gs):
            h[2] += 1  # h = [params, state, step count]: the gradient alternates
            h[0], h[1] = jstep(h[0], h[1], gs[h[2] % 2])
            return h[0]

        fns[label, donate] = call
    samples = time_samples(fns, repeats=repeats, warmup=2)
    times = {k: statistics.median(v) for k, v in samples.items()}
    # Sanity: every candidate produced finite params.
    for key, (p, _, _) in holders.items():
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p)), key
    rows = []
    for (label, donate), t in times.items():
        sgd, olars = times["optax.sgd", donate], times["optax.lars", donate]
        rows.append(
            {
                "model": name,
                "optimizer": label,
                "donated": donate,
                "num_floats": num_floats,
                "median_ms": 1e3 * t,
                "min_ms": 1e3 * min(samples[label, donate]),
                "ratio_to_optax_sgd": t / sgd,
                "ratio_to_optax_lars": t / olars,
                "hlo": facts[label, donate],
            }
        )
    return rows


def notes_text(targets: dict, h: dict, repeats: int, quick: bool) -> str:
    """The Markdown notes: protocol, the donation analysis (HLO facts ``h`` of fused Layca)."""
    return (
        "Jitted `tx.update` + `optax.apply_updates`, median of "
        f"{repeats} interleaved repeats{' (quick mode)' if quick else ''}; every candidate "
        "runs with params/state donated (in place, as in a training loop) and without; ratios "
        "are within each regime. The gradient alternates between g and -g (see below). "
        "`layca` uses the raw gradient as its direction (like `optax.sgd`), `optax.lars` its "
        "defaults (momentum 0.9, weight decay, trust ratio); `prototype (12 lines)` is the bare "
        "fused formula (three `jnp.sum`, scalar algebra, one elementwise pass, no safeguards); "
        f"`{NEAR_PARALLEL}` feeds a gradient with ‖g‖/‖g⊥‖ ≈ 100 so that every layer takes the "
        "second pass. HLO column: outputs aliased to donated inputs / `copy` ops / "
        "`conditional` ops in the compiled module; temp: its temporary buffers.\n\n"
        "**Why donation seemed not to help Layca, and the gap to the prototype.** Not the "
        "HLO. Donated, the module of the package as it was (main at 67a6310) aliased all 322 "
        "param/state outputs to their inputs, had 0 copies, and each leaf's final elementwise "
        "fusion wrote its parameter buffer in place; its 29 `lax.cond`s (one per layer, for "
        "near-parallel steps) cost nothing when not taken, apart from a 14.1 MiB temporary "
        "(the largest leaf's materialised s⊥, touched only in that branch). The benchmark was "
        "wrong: it fed the same gradient g at every step, so every Layca layer turned towards "
        "-g by arctan(0.1) per step and from the 14th step on was within 14.5° of it "
        "(‖g‖/‖g⊥‖ > 4), where the fused form rightly takes its second pass; the timings mixed "
        "the two paths by an amount that depended on the number of repeats. Measured side by "
        "side (30 repeats, loaded machine): that package ran 5.37× optax.sgd with the fixed g "
        "against 3.44× with g alternating in sign, the prototype 3.52× and 3.23×. With the "
        "alternating gradient, donation saves Layca what it saves SGD (one fresh output "
        "buffer per leaf to allocate and fault in). Since then the package makes its three "
        "per-layer sums in one variadic pass (`layer_dots`: w and s read once, not four "
        "reads), which puts it below the prototype's three `jnp.sum`s; the near-parallel "
        "second pass is one more such pass. Now, donated: "
        f"{h['aliased_outputs']} aliased outputs, {h['copies']} copies, {h['conditionals']} "
        "conditionals (range check and near-parallel pass per layer), "
        f"{h['temp_mib']:.1f} MiB of temporaries (the row partials of the variadic pass).\n\n"
        "The machine is a shared 2-core CPU (other jobs running): ratios move by about "
        "±0.3 between runs. "
        f"Targets on WRN (donated): fused ≤ 3× optax.sgd → {targets['fused_vs_sgd']:.2f}×; "
        f"≤ 0.5× optax.lars → {targets['fused_vs_optax_lars']:.2f}×; "
        f"{targets['fused_vs_prototype']:.2f}× the prototype; near-parallel steps "
        f"{targets['near_parallel_vs_fused']:.2f}× the usual ones. Not donated: "
        f"{targets['not_donated_fused_vs_sgd']:.2f}× optax.sgd, "
        f"{targets['not_donated_fused_vs_optax_lars']:.2f}× optax.lars."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: WRN-4-1, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    if args.quick:  # WRN-4-1: stem conv, final BN, head; every kind of leaf of WRN-28-10
        models = {"WRN-4-1 (no blocks)": wrn_shapes(4, 1)}
        repeats = args.repeats or 2
    else:
        models = {"WRN-28-10": wrn_shapes(28, 10), "MLP 784-256-256-10": mlp_shapes()}
        repeats = args.repeats or 25
    rows = []
    for name, shapes in models.items():
        new = bench_model(name, shapes, repeats, args.quick)
        rows += new
        for r in new:
            print(
                f"{r['model']:>20} {r['optimizer']:>34} donated={r['donated']!s:5} "
                f"{r['median_ms']:9.2f} ms "
                f"x{r['ratio_to_optax_sgd']:.2f} sgd x{r['ratio_to_optax_lars']:.2f} lars",
                flush=True,
            )
    wrn = {r["optimizer"]: r for r in rows if r["model"].startswith("WRN") and r["donated"]}
    wrn_nd = {r["optimizer"]: r for r in rows if r["model"].startswith("WRN") and not r["donated"]}
    fused = wrn["layca (fused)"]
    targets = {
        "fused_vs_sgd": fused["ratio_to_optax_sgd"],
        "fused_vs_optax_lars": fused["ratio_to_optax_lars"],
        "fused_le_3x_sgd": fused["ratio_to_optax_sgd"] <= 3.0,
        "fused_le_half_optax_lars": fused["ratio_to_optax_lars"] <= 0.5,
        "not_donated_fused_vs_sgd": wrn_nd["layca (fused)"]["ratio_to_optax_sgd"],
        "not_donated_fused_vs_optax_lars": wrn_nd["layca (fused)"]["ratio_to_optax_lars"],
    }
    if "layca (chained)" in wrn:  # not in quick mode
        targets["fused_faster_than_chained"] = (
            fused["median_ms"] < wrn["layca (chained)"]["median_ms"])
    targets["near_parallel_vs_fused"] = (
        wrn[NEAR_PARALLEL]["median_ms"] / fused["median_ms"])
    targets["fused_vs_prototype"] = fused["median_ms"] / wrn["prototype (12 lines)"]["median_ms"]
    table = [
        [
            r["model"],
            f"{r['num_floats'] / 1e6:.2f}M",
            r["optimizer"],
            "yes" if r["donated"] else "no",
            f"{r['median_ms']:.2f}",
            f"{r['ratio_to_optax_sgd']:.2f}",
            f"{r['ratio_to_optax_lars']:.2f}",
            f"{r['hlo']['aliased_outputs']}/{r['hlo']['copies']}/{r['hlo']['conditionals']}",
            f"{r['hlo']['temp_mib']:.1f}",
        ]
        for r in rows
    ]
    notes = notes_text(targets, fused["hlo"], repeats, args.quick)
    write_results(
        "update_step",
        {"quick": args.quick, "repeats": repeats, "rows": rows, "targets": targets},
        table,
        ["model", "floats", "optimizer", "donated", "median ms", "× optax.sgd", "× optax.lars",
         "HLO alias/copy/cond", "temp MiB"],
        "Optimizer update step",
        notes,
    )
    print(targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
