"""Loss Change Allocation cost (Lan et al., NeurIPS 2019, §S8).

Measured side by side in one process (medians of interleaved repeats):

1. MNIST-FC shape (784-100-50-10 ReLU, 84,060 params, synthetic MNIST-sized data): one
   full-dataset ``value_and_grad`` (the unit of cost) vs one RK4 LCA iteration in steady state
   (endpoint gradient of step t reused as the start of t+1; target ≤ 2.3×), the ``jvp`` engine,
   per-class strategies, and the float32 noise floor / Table S1 / helping fraction / tails on a
   short SGD trajectory.
2. ``lca.allocate`` called in a loop with the same loss and new same-shaped data (a 64-64 MLP
   on 1,400 examples): the first call compiles, every later call must cost ≤ 4× one
   full-dataset ``value_and_grad`` and trace nothing.
3. SmallCNN per-class passes: compile vs run time of one full-dataset point for each
   quantity, the one-batch-per-call step used now against the ``lax.scan`` over batches of
   v0.1 (XLA:CPU runs a convolution's backward pass much slower inside a while loop).
4. Scaling in dataset size and the compiled step's temporary memory.

Usage: ``python benchmarks/lca.py [--quick]``; writes ``benchmarks/results/lca.{json,md}``
(with ``--quick``, run it through ``run_all.py --quick``, which writes to a temporary directory).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


import jax
import jax.numpy as jnp
import numpy as np
import optax
from _timing import block, dense_params, time_interleaved, write_results

from optax_layca import lca
from optax_layca.lca._engines import Quantities
from optax_layca.lca._integrate import Stepper

SIZES = (784, 100, 50, 10)


def mlp_loss(p, batch):
    x, y = batch
    for i in range(len(p)):
        x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
        if i < len(p) - 1:
            x = jax.nn.relu(x)
    return optax.softmax_cross_entropy_with_integer_labels(x, y)


def make_data(n, d=784, seed=0):
    rng = np.random.default_rng(seed)
    # MNIST-like: ~19% of the pixels lit, values in [0, 1]
    x = (rng.random((n, d), dtype=np.float32) * (rng.random((n, d)) < 0.19)).astype(np.float32)
    teacher = rng.normal(size=(d, 10)).astype(np.float32)
    y = np.argmax(x @ teacher + rng.gumbel(size=(n, 10)), axis=1).astype(np.int32)
    return x, y


def trajectory(params, x, y, steps, lr=0.05, bs=128):
    opt = optax.sgd(lr, momentum=0.9)
    state = opt.init(params)

    @jax.jit
    def step(p, s, xb, yb):
        g = jax.grad(lambda q: jnp.mean(mlp_loss(q, (xb, yb))))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    out = [params]
    for t in range(steps):
        i = (t * bs) % (len(x) - bs)
        params, state = step(params, state, x[i : i + bs], y[i : i + bs])
        out.append(params)
    return out


class Cycle:
    """One LCA iteration per call along a pre-computed trajectory (steady state: reuse on)."""

    def __init__(self, ev, traj, **opts):
        o = lca.LCAOptions(**opts)
        self.stepper = Stepper([ev], o, len(jax.tree.leaves(traj[0])))
        self.traj, self.t, self.splits = traj, 0, []

    def __call__(self):
        if self.t + 1 >= len(self.traj):
            self.t = 0
            self.stepper.reset()
        r = self.stepper.step(self.traj[self.t], self.traj[self.t + 1])
        self.t += 1
        self.splits.append(int(r.num_splits))
        return jnp.zeros(())


def paired_ratios(fns, base, repeats, warmup=2):
    """Median seconds of each callable and the median over rounds of ``time / time[base]``
    (each round times every callable back to back, which cancels slow drifts of a shared
    machine better than a ratio of medians)."""
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            block(fn())
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratios = {
        k: float(np.median(np.asarray(v) / np.asarray(times[base]))) for k, v in times.items()
    }
    return med, ratios


def point(ev, p, q):
    """One full-dataset evaluation of ``q`` at ``p`` (a zero-argument callable)."""
    delta = jax.tree.map(lambda a: 1e-3 * jnp.ones_like(a), p)
    return lambda: ev.run(p, delta, 0.0, q).carry or jnp.zeros(())


def iteration_cost(x, y, traj, bs, repeats, quick=False):
    """One RK4 iteration per engine and one point per quantity vs one ``value_and_grad``.
    Quick mode (a smoke run) times the grad engine and the grad point only, the latter on the
    evaluator without labels (already compiled): every other engine, quantity or evaluator is
    one more compilation of the same benchmark code."""
    ev = lca.Evaluator(mlp_loss, (x, y), labels=y, batch_size=bs)
    ev_nl = lca.Evaluator(mlp_loss, (x, y), batch_size=bs)
    rk4 = Cycle(ev_nl, traj)
    fns = {"value_and_grad": point(ev_nl, traj[1], Quantities(grad=True)), "rk4_grad_iter": rk4}
    qs = {"grad": Quantities(grad=True)}
    if not quick:
        fns["rk4_jvp_iter"] = Cycle(ev_nl, traj, engines="jvp")
        fns["rk4_grad_plus_classes_iter"] = Cycle(ev, traj)
        qs = {
            "loss_only": Quantities(),
            "grad": Quantities(grad=True),
            "jvp_layers": Quantities(jvp_layers=True),
            "class_jvp": Quantities(jvp_layers=True, jvp_classes=True),
            "class_reverse": Quantities(grad=True, class_grads=True),
        }
    times, rel = paired_ratios(fns, "value_and_grad", repeats=2 * repeats)
    pev = ev_nl if quick else ev
    pt = time_interleaved({k: point(pev, traj[1], q) for k, q in qs.items()}, repeats, warmup=1)
    return {
        "batch_size": ev.batch_size,
        "value_and_grad_s": times["value_and_grad"],
        "ratios_to_value_and_grad_median_of_rounds": rel,
        "iteration_s": times,
        "num_splits_seen": sorted(set(rk4.splits)),
        "per_point_s": pt,
        "class_strategy_auto": lca.choose_class_strategy(len(jax.tree.leaves(traj[0])), 10),
    }


def accuracy(x, y, traj, bs):
    """Table S1 (first order vs RK4), noise floor, helping fraction and tails along a run."""
    ev = lca.Evaluator(mlp_loss, (x, y), batch_size=bs)
    hist = {
        m: lca.allocate_trajectory(
            None, traj, ev, method=m, progress=False, store_per_param=(m == "rk4")
        )
        for m in ("rk4", "first_order")
    }
    _, table = lca.error_table({"MNIST-FC (synthetic), SGD": hist})
    h = hist["rk4"]
    helping = lca.helping_fraction(h)
    tails = lca.tail_heaviness(h)
    weib = lca.weibull_fit(h, iterations=[0, len(h) - 1], max_samples=20_000)
    return {
        "table_s1": table,
        "rk4_summary": h.summary(),
        "noise_floor_median": float(np.median(h.noise_floor)),
        "abs_error_median": float(np.median(np.abs(h.error))),
        "mean_helping_fraction": float(helping.helping.mean()),
        "mean_hurting_fraction": float(helping.hurting.mean()),
        "mean_zero_fraction": float(helping.zero.mean()),
        "tail_vs_gaussian_median": float(np.median(tails.tail_vs_gaussian)),
        "tail_share_ratio_median": float(np.median(tails.tail_share_ratio)),
        "weibull_shape_helping": weib.helping_shape.tolist(),
        "weibull_shape_hurting": weib.hurting_shape.tolist(),
    }


def allocate_loop(repeats, quick):
    """Item: `lca.allocate` in a loop compiles once; later calls ≤ 4× one value_and_grad."""
    x, y = make_data(1400, d=64, seed=1)
    params = dense_params((64, 64, 64, 10), jax.random.PRNGKey(1))
    traces = []

    def loss_fn(p, b):
        traces.append(1)
        return mlp_loss(p, b)

    p1 = jax.tree.map(lambda a: a - 1e-3 * jnp.sign(a), params)
    t0 = time.perf_counter()
    lca.allocate(loss_fn, params, p1, (x, y))
    first = time.perf_counter() - t0
    n_traces = len(traces)
    vg = jax.jit(jax.value_and_grad(lambda p, xb, yb: jnp.mean(mlp_loss(p, (xb, yb)))))
    rng = np.random.default_rng(0)
    datasets = [(x + 0.01 * rng.normal(size=x.shape).astype(np.float32), y) for _ in range(4)]
    it = iter(range(10**9))
    calls = {
        "value_and_grad": lambda: vg(params, x, y),
        "allocate": lambda: lca.allocate(loss_fn, params, p1, datasets[next(it) % 4]).total,
    }
    times, rel = paired_ratios(calls, "value_and_grad", repeats=4 * repeats, warmup=1)
    return {
        "examples": 1400,
        "first_call_s": first,
        "later_call_s": times["allocate"],
        "value_and_grad_s": times["value_and_grad"],
        "later_call_over_value_and_grad": rel["allocate"],
        "new_traces_after_first_call": len(traces) - n_traces,
    }


def _programs(ev, q, p, delta):
    """``{path: (compiled program, its arguments)}`` of one full-dataset point: the
    one-batch step used now, and v0.1's ``lax.scan`` over the stacked batches (same body)."""
    k, lay = ev.kernels, ev.layout
    params, zeros = k.start(p, delta, np.float32(0.3), q=q)

    def scanned(params, delta, xs, mask):
        def body(carry, inp):
            return k.step_batch(carry, params, delta, inp[0], inp[1], q=q)

        carry, ys = jax.lax.scan(body, k.zeros(params, q=q), (xs, mask))
        return carry, ys, k.finish(carry, delta, q=q)

    return {
        "step": (k.step, (zeros, params, delta, lay.xs, lay.mask, np.int32(0)), {"q": q}),
        "scan": (jax.jit(scanned), (params, delta, lay.xs, lay.mask), {}),
    }


def _compile_and_run(ev, kind, fn, args, kw, p, delta, q, repeats):
    t0 = time.perf_counter()
    fn.lower(*args, **kw).compile()
    compile_s = time.perf_counter() - t0
    if kind == "step":  # a whole point: start, one step per batch, finish
        run = lambda: ev.run(p, delta, 0.3, q).post
    else:
        run = lambda: fn(*args)
    block(run())
    return {"compile_s": compile_s, "run_s": time_interleaved({kind: run}, repeats, warmup=0)[kind]}


def cnn_compile(quick, repeats):
    """Compile vs run of one full-dataset point of SmallCNN, per quantity, per evaluator."""
    from optax_layca.models import apply_fn, get_model

    model = get_model("cnn", num_classes=10)
    apply = apply_fn(model)
    n = 64 if quick else 2000
    rng = np.random.default_rng(0)
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    # `models.init_params` under jit: one program, not one eager compilation per op
    p = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    delta = jax.tree.map(lambda a: 1e-3 * jnp.ones_like(a), p)
    # one-time costs of the first convolution programs in a process, kept out of the rows
    block(jax.jit(jax.value_and_grad(lambda q: jnp.sum(apply(q, x[:8]))))(p))
    qs = {"grad": Quantities(grad=True)}  # quick mode (smoke run): one quantity
    if not quick:
        qs["class_jvp"] = Quantities(jvp_layers=True, jvp_classes=True)
        qs["class_reverse"] = Quantities(grad=True, class_grads=True)
    out = {"examples": n, "params": int(sum(v.size for v in jax.tree.leaves(p)))}
    for i, (name, q) in enumerate(qs.items()):
        order = ("step", "scan") if i % 2 == 0 else ("scan", "step")  # alternate who goes first
        for kind in order:

            def loss_fn(q_, b):  # a fresh function each time: nothing compiled before
                return optax.softmax_cross_entropy_with_integer_labels(apply(q_, b[0]), b[1])

            ev = lca.Evaluator(loss_fn, (x, y), labels=y, batch_size=n // 4)
            ev.prepare(p)
            fn, args, kw = _programs(ev, q, p, delta)[kind]
            out[f"{name}/{kind}"] = _compile_and_run(ev, kind, fn, args, kw, p, delta, q, repeats)
    out.update(_cnn_allocate(apply, p, x, y))
    return out


def _cnn_allocate(apply, p, x, y):
    """First (compiling) and later ``allocate`` with per-class LCA on SmallCNN."""

    def loss_fn(q, b):
        return optax.softmax_cross_entropy_with_integer_labels(apply(q, b[0]), b[1])

    p1 = jax.tree.map(lambda a: a * 0.99, p)
    out = {}
    for key in ("first_allocate_s", "later_allocate_s"):
        t0 = time.perf_counter()
        lca.allocate(loss_fn, p, p1, (x, y), labels=y, batch_size=len(y) // 4)
        out[key] = time.perf_counter() - t0
    return out


def scaling(x, y, p, bs, repeats, quick=False):
    n = len(x)
    sizes = [int(n * f) for f in ((0.5, 1.0) if quick else (0.25, 0.5, 1.0))]
    evs = {m: lca.Evaluator(mlp_loss, (x[:m], y[:m]), batch_size=min(bs, n // 8)) for m in sizes}
    ts = time_interleaved(
        {m: point(e, p, Quantities(grad=True)) for m, e in evs.items()}, 2 * repeats, warmup=1
    )
    rows = []
    for m in sizes:
        ev = evs[m]
        params, carry = ev.kernels.start(p, p, np.float32(0), q=Quantities(grad=True))
        lay = ev.layout
        step = ev.kernels.step.lower(
            carry, params, p, lay.xs, lay.mask, np.int32(0), q=Quantities(grad=True)
        )
        mem = step.compile().memory_analysis()
        rows.append(
            {
                "examples": m,
                "seconds": ts[m],
                "us_per_example": 1e6 * ts[m] / m,
                "time_ratio_vs_smallest": ts[m] / ts[sizes[0]],
                "step_temp_bytes": int(mem.temp_size_in_bytes),
            }
        )
    return rows


def table(payload):
    c, a = payload["cost"], payload["allocate_loop"]
    rel = c["ratios_to_value_and_grad_median_of_rounds"]
    rows = [["full-dataset value_and_grad", f"{c['value_and_grad_s']:.3f}", "1.00"]]
    for k, label in (
        ("rk4_grad_iter", "RK4 LCA iteration, grad engine (endpoint reuse)"),
        ("rk4_jvp_iter", "RK4 LCA iteration, jvp engine (per-leaf only)"),
        (
            "rk4_grad_plus_classes_iter",
            f"RK4 LCA iteration, grad + per-class ({c['class_strategy_auto']})",
        ),
    ):
        if k in rel:  # quick mode times the grad engine only
            rows.append([label, f"{c['iteration_s'][k]:.3f}", f"{rel[k]:.2f}"])
    for k, v in c["per_point_s"].items():
        rows.append([f"one point: {k}", f"{v:.3f}", f"{v / c['per_point_s']['grad']:.2f}"])
    rows.append(
        [
            "`allocate` in a loop, 64-64 MLP, 1,400 examples: first call (compiles)",
            f"{a['first_call_s']:.3f}",
            f"{a['first_call_s'] / a['value_and_grad_s']:.0f}",
        ]
    )
    rows.append(
        [
            "`allocate` in a loop: each later call (new data, same shapes)",
            f"{a['later_call_s']:.4f}",
            f"{a['later_call_over_value_and_grad']:.2f}",
        ]
    )
    for k, v in payload["cnn"].items():
        if isinstance(v, dict):
            rows.append(
                [
                    f"SmallCNN point {k}: compile / run",
                    f"{v['compile_s']:.2f} / {v['run_s']:.3f}",
                    "",
                ]
            )
    cnn = payload["cnn"]
    rows.append(
        [
            "SmallCNN `allocate` with labels: first / later call",
            f"{cnn['first_allocate_s']:.2f} / {cnn['later_allocate_s']:.3f}",
            "",
        ]
    )
    for s in payload["scaling"]:
        rows.append(
            [
                f"value_and_grad on {s['examples']} examples (step temp {s['step_temp_bytes'] / 2**20:.2f} MiB)",
                f"{s['seconds']:.3f}",
                f"{s['time_ratio_vs_smallest']:.2f}× smallest",
            ]
        )
    return rows


def notes(payload):
    c, acc, a = payload["cost"], payload["accuracy"], payload["allocate_loop"]
    s = acc["rk4_summary"]
    return (
        f"MNIST-FC 784-100-50-10, {payload['examples']} synthetic examples, batch {c['batch_size']}. "
        f"RK4 iteration / value_and_grad: {c['ratios_to_value_and_grad_median_of_rounds']['rk4_grad_iter']:.2f} "
        f"(target ≤ 2.3); sub-intervals seen: {c['num_splits_seen']}. `lca.allocate` in a loop: "
        f"{a['later_call_over_value_and_grad']:.2f}× one value_and_grad per call after the first "
        f"(target ≤ 4; RK4 is 3 points), {a['new_traces_after_first_call']} new traces. SmallCNN "
        "rows: seconds of compile and of one full-dataset point, per quantity, for the one-batch "
        "step (now) and v0.1's lax.scan over batches.\n\n"
        f"Accuracy over the SGD trajectory (Table S1 format, error = ΔL − ΣLCA):\n\n{acc['table_s1']}"
        f"\n\nRK4: {s['num_unconverged']} unconverged, cumulative error {s['cumulative_error_pct']:.3g}% "
        f"of the loss change; median |error| {acc['abs_error_median']:.2e}, median noise floor "
        f"{acc['noise_floor_median']:.2e}. Helping {100 * acc['mean_helping_fraction']:.1f}% (paper "
        f"Table 1: 50-58%). Tail contribution vs a Gaussian of the same spread (3σ): "
        f"{acc['tail_vs_gaussian_median']:.2f} (paper: ≈ 3; share ratio {acc['tail_share_ratio_median']:.1f}); "
        f"Weibull shape of |LCA|, helping: {np.round(acc['weibull_shape_helping'], 2).tolist()}."
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small dataset, few repeats (CI smoke)")
    ap.add_argument("--batch-size", type=int, default=2000)
    args = ap.parse_args(argv)
    # quick (smoke run): 1,024 examples in two batches, one repeat
    n = 1024 if args.quick else 60000
    repeats = 1 if args.quick else 5
    bs = min(args.batch_size, n // 2 if args.quick else n)
    x, y = make_data(n)
    params = dense_params(SIZES, jax.random.PRNGKey(0))
    traj = trajectory(params, x, y, steps=2 * (repeats + 2) + 2)
    t_start = time.perf_counter()
    payload = {
        "quick": args.quick,
        "examples": n,
        "params": int(sum(v.size for v in jax.tree.leaves(params))),
        "cost": iteration_cost(x, y, traj, bs, repeats, args.quick),
        "accuracy": accuracy(x, y, traj, bs),
        "allocate_loop": allocate_loop(repeats, args.quick),
        "cnn": cnn_compile(args.quick, repeats),
        "scaling": scaling(x, y, traj[1], bs, repeats, args.quick),
        "paper_gpu_s_per_iteration": 0.4,
    }
    payload["wall_s"] = time.perf_counter() - t_start
    path = write_results(
        "lca",
        payload,
        table(payload),
        ["measurement", "seconds", "× value_and_grad"],
        "Loss Change Allocation cost",
        notes(payload),
    )
    print(path.with_suffix(".md").read_text())
    return payload


if __name__ == "__main__":
    main()
