"""Whole jitted train steps: Layca, the papers' LARS and the rotation monitor vs optax.

    python benchmarks/train_step.py            # full: MLP, CNN, scanned transformer
    python benchmarks/train_step.py --quick    # CI smoke: a tiny MLP, 4 candidates, 2 samples

One step is forward + backward + ``tx.update`` + ``optax.apply_updates`` under ``jax.jit``,
params and optimizer state donated (updated in place, as in a training loop). Three models
(Flax linen): a ReLU MLP, a small ConvNet, and a pre-LN transformer whose blocks are one
``nn.scan`` (stacked kernels, ``layer_axis=0`` for them). Optimizers: ``optax.sgd``,
``optax.adam``, ``layca`` with the SGD direction and with the Adam direction
(``base=optax.scale_by_adam()``), and the papers' ``lars``; each alone, wrapped in
``track_rotation`` (figures every step) and in ``track_rotation(every=10)``.

All candidates of one model are timed side by side in one process, round-robin; one sample is
10 consecutive steps (so ``every=10`` pays its one measured step in ten, as in training), and
ratios are of medians over samples. Peak memory is read from the compiled executable
(``memory_analysis()``: arguments + outputs - donated aliases + temporaries).

Targets: Layca <= 1.15x the step of its base optimizer alone; monitor <= 1.10x the step it
watches at every=1, <= 1.03x at every=10; Layca's peak memory <= SGD's + one copy of params.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _timing import time_samples, write_results  # noqa: E402
from flax import linen as nn  # noqa: E402

import optax_layca as ol  # noqa: E402
from optax_layca import models  # noqa: E402

STEPS_PER_SAMPLE = 10
EVERY = 10
TARGETS = {"layca_vs_base": 1.15, "monitor": 1.10, f"monitor_every{EVERY}": 1.03}


class Block(nn.Module):
    """Pre-LN transformer block (causal self-attention, GELU MLP); scan-compatible."""

    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x, _):
        dim = x.shape[-1]
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads)(h, h, mask=mask)
        h = nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x)))
        return x + nn.Dense(dim)(h), None


class ScannedTransformer(nn.Module):
    """Token embedding, ``depth`` blocks in one ``nn.scan`` (params stacked on axis 0), head."""

    vocab: int
    dim: int
    heads: int
    mlp: int
    depth: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.dim)(tokens)
        blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=self.depth)
        x, _ = blocks(self.heads, self.mlp, name="blocks")(x, None)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def stacked_axis(path: str, leaf) -> int | None:
    """``layer_axis`` for the transformer: the scanned kernels stack their layers on axis 0."""
    return 0 if path.startswith("blocks/") else None


def init_params(model: nn.Module, *inputs):
    """``model``'s initial params, initialised under ``jax.jit`` (eager Flax init compiles
    every op on its own: seconds on a loaded CPU); same key and values as
    ``models.init_params``."""
    return jax.jit(model.init)(jax.random.key(0), *inputs)["params"]


def build_models(quick: bool) -> dict:
    """``{name: (apply(params, x), params, xs, ys, layer_axis)}``: ``STEPS_PER_SAMPLE`` batches
    of random inputs ``xs`` and integer labels ``ys``, one per step of a sample. Fresh batches
    keep the gradients changing as in training: on one repeated batch the weights settle
    where the gradient is nearly radial and Layca would time its near-parallel path.

    Quick mode (a smoke run) builds only a tiny MLP: on a loaded 2-core CPU each extra model
    costs seconds of Flax init and XLA compilation per candidate, and the benchmark's code
    path is the same for every model."""
    nb = STEPS_PER_SAMPLE
    rng = np.random.default_rng(0)
    out = {}
    mlp, batch = ((16, 32, 10), 8) if quick else ((784, 512, 512, 512, 10), 64)
    fc = models.FCNet(num_classes=mlp[-1], hidden=mlp[1:-1])
    x = rng.normal(size=(nb, 2 * batch, mlp[0])).astype(np.float32)
    out[f"MLP {'-'.join(map(str, mlp))}"] = (
        models.apply_fn(fc), init_params(fc, jnp.zeros((1, mlp[0]))), x,
        rng.integers(0, mlp[-1], x.shape[:2]), None)
    if quick:
        return out
    cnn_f, img = (32, 64), (32, 32, 3)
    tf = dict(vocab=512, dim=128, heads=4, mlp=512, depth=4, seq=64, batch=16)
    cnn = models.SmallCNN(num_classes=10, features=cnn_f)
    x = rng.normal(size=(nb, batch, *img)).astype(np.float32)
    out[f"CNN {'-'.join(map(str, cnn_f))} on {'x'.join(map(str, img))}"] = (
        models.apply_fn(cnn), init_params(cnn, jnp.zeros((1, *img))), x,
        rng.integers(0, 10, (nb, batch)), None)
    tfm = ScannedTransformer(tf["vocab"], tf["dim"], tf["heads"], tf["mlp"], tf["depth"])
    tokens = rng.integers(0, tf["vocab"], (nb, tf["batch"], tf["seq"] + 1))
    params = init_params(tfm, jnp.asarray(tokens[0, :, :-1]))
    name = f"Transformer {tf['depth']}x(d{tf['dim']}, mlp{tf['mlp']}) nn.scan, seq {tf['seq']}"
    out[name] = (lambda p, t: tfm.apply({"params": p}, t), params, tokens[..., :-1],
                 tokens[..., 1:], stacked_axis)
    return out


# Quick mode compiles only these (compilation dominates a smoke run on 2 CPU cores): one
# candidate per code path: a reference, Layca alone, the fused monitored Layca and the
# standalone monitor (wrapping optax.sgd) at every=EVERY.
QUICK = ("optax.sgd", "layca (sgd)", "layca (sgd) + monitor", f"optax.sgd + monitor every={EVERY}")


def optimizers(layer_axis, quick: bool = False) -> dict[str, tuple[optax.GradientTransformation, str]]:
    """``{label: (tx, reference label)}``: each candidate and the step its ratio is taken to."""
    kw = dict(layer_axis=layer_axis)
    base = {
        "optax.sgd": (optax.sgd(0.1), "optax.sgd"),
        "optax.adam": (optax.adam(1e-3), "optax.adam"),
        "layca (sgd)": (ol.layca(0.01, **kw), "optax.sgd"),
        "layca (adam)": (ol.layca(0.01, base=optax.scale_by_adam(), **kw), "optax.adam"),
        "lars (paper)": (ol.lars(0.01, **kw), "optax.sgd"),
    }
    out = {}
    for label, (tx, ref) in base.items():
        out[label] = (tx, ref)
        out[f"{label} + monitor"] = (ol.track_rotation(tx, **kw), label)
        out[f"{label} + monitor every={EVERY}"] = (ol.track_rotation(tx, every=EVERY, **kw), label)
    return {k: v for k, v in out.items() if k in QUICK} if quick else out


def make_step(apply, tx):
    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def peak_bytes(compiled) -> int:
    """Live bytes at the high-water mark: arguments + outputs - donated aliases + temporaries."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


def bench_model(name, apply, params0, xs, ys, layer_axis, repeats, quick):
    batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in zip(xs, ys)]
    x, y = batches[0]
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    param_bytes = sum(v.nbytes for v in jax.tree.leaves(params0))
    cands = optimizers(layer_axis, quick)
    fns, peaks, first = {}, {}, {}
    for label, (tx, _) in cands.items():
        init = jax.jit(tx.init)  # one program, not one eager compile per op
        state = init(copy(params0))
        step = make_step(apply, tx).lower(params0, state, x, y).compile()  # compiled once
        peaks[label] = peak_bytes(step)
        first[label] = step(copy(params0), state, x, y)[0]
        carry = [copy(params0), init(copy(params0))]

        def run(step=step, carry=carry):
            for xb, yb in batches:
                carry[0], carry[1], loss = step(carry[0], carry[1], xb, yb)
            return loss

        fns[label] = run
    # The monitor passes updates through: its step gives the same parameters, up to XLA
    # fusing `w + u` differently around the monitor's extra reads: u's terms are <= |w| in
    # size and each of the <= 3 roundings is <= eps/2 of them, so |diff| <= 2 eps max|w|.
    eps = float(jnp.finfo(jnp.float32).eps)
    for label, (_, ref) in cands.items():
        if "monitor" in label:
            for a, b in zip(jax.tree.leaves(first[label]), jax.tree.leaves(first[ref])):
                atol = 2 * eps * float(jnp.max(jnp.abs(b)))
                np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=label)
    samples = time_samples(fns, repeats=repeats, warmup=1)
    med = {k: statistics.median(v) / STEPS_PER_SAMPLE for k, v in samples.items()}
    rows = []
    for label, (_, ref) in cands.items():
        q1, _, q3 = statistics.quantiles(samples[label], n=4)
        rows.append({
            "model": name, "optimizer": label, "reference": ref,
            "num_params": int(sum(v.size for v in jax.tree.leaves(params0))),
            "step_ms": 1e3 * med[label], "ratio": med[label] / med[ref],
            "iqr_rel": (q3 - q1) / statistics.median(samples[label]),
            "peak_mb": peaks[label] / 2**20,
            "extra_param_copies": (peaks[label] - peaks[ref]) / param_bytes,
        })
    return rows


def summarise(rows) -> dict:
    """Per target: the worst ratio over models and each model's worst; the memory check."""
    preds = {
        "layca_vs_base": lambda o: o.startswith("layca") and "monitor" not in o,
        "monitor": lambda o: o.endswith("+ monitor"),
        f"monitor_every{EVERY}": lambda o: o.endswith(f"every={EVERY}"),
    }
    out = {}
    for target, pred in preds.items():
        per_model: dict[str, float] = {}
        for r in rows:
            if pred(r["optimizer"]):
                per_model[r["model"]] = max(per_model.get(r["model"], 0.0), r["ratio"])
        out[target] = {"worst": max(per_model.values()), "per_model": per_model,
                       "target": TARGETS[target]}
    # layca (sgd)'s reference is optax.sgd: extra peak memory in units of one params copy
    out["layca_sgd_extra_param_copies_vs_sgd"] = {
        r["model"]: r["extra_param_copies"] for r in rows if r["optimizer"] == "layca (sgd)"}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny MLP, 2 samples")
    parser.add_argument("--repeats", type=int, default=None, help="samples per candidate")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 25)
    rows = []
    for name, (apply, params, x, y, axis) in build_models(args.quick).items():
        new = bench_model(name, apply, params, x, y, axis, repeats, args.quick)
        for r in new:
            print(f"{name[:24]:>24} {r['optimizer']:>34} {r['step_ms']:8.3f} ms "
                  f"x{r['ratio']:.3f} (iqr {r['iqr_rel']:.2f}) peak {r['peak_mb']:.2f} MiB",
                  flush=True)
        rows += new
    summary = summarise(rows)
    table = [[r["model"], f"{r['num_params'] / 1e6:.2f}M", r["optimizer"], r["reference"],
              f"{r['step_ms']:.3f}", f"{r['ratio']:.3f}", f"{r['iqr_rel']:.2f}",
              f"{r['peak_mb']:.1f}", f"{r['extra_param_copies']:+.2f}"] for r in rows]
    notes = (
        "Jitted train step (forward, backward, update, `apply_updates`; params and state "
        f"donated); one sample = {STEPS_PER_SAMPLE} consecutive steps, median of {repeats} "
        f"interleaved samples{' (quick mode: smoke test only)' if args.quick else ''}. "
        "`ratio` is to the `reference` step measured in the same round-robin; `iqr` is the "
        "sample spread (interquartile range / median) of the row, a noise gauge. `peak` is the "
        "compiled executable's live high-water mark (arguments + outputs - donated aliases + "
        "temporaries); `Δ copies` is (peak - peak of the reference) / bytes of one params copy. "
        "The monitor keeps w⁰ (one copy of the layers) by design. "
        "Layca's extra memory is its gradients: each layer's gradient must live until Layca "
        "has its per-layer norms, so XLA keeps all of them at once where SGD consumes each as "
        "it comes (a fraction of a params copy, visible only where activations are small, as "
        "in the MLP). The monitor wrapping fused Layca (`layca (...) + monitor`) takes its "
        "figures from Layca's own reduction pass (which then also reads w⁰ and g) and never "
        "materialises the update; wrapping `optax.sgd`/`adam`/`lars` it makes its own pass "
        "over (w, u, w⁰, g) and materialises u. "
        f"Targets: Layca ≤ {TARGETS['layca_vs_base']}× its base optimizer → worst "
        f"{summary['layca_vs_base']['worst']:.3f}×; monitor ≤ {TARGETS['monitor']}× → worst "
        f"{summary['monitor']['worst']:.3f}×; every={EVERY} ≤ {TARGETS[f'monitor_every{EVERY}']}× → worst "
        f"{summary[f'monitor_every{EVERY}']['worst']:.3f}×. "
        f"Command: `python benchmarks/train_step.py{' --quick' if args.quick else ''}`."
    )
    write_results(
        "train_step",
        {"quick": args.quick, "repeats": repeats, "steps_per_sample": STEPS_PER_SAMPLE,
         "targets": TARGETS, "summary": summary, "rows": rows},
        table,
        ["model", "params", "optimizer", "reference", "step ms", "ratio", "iqr", "peak MiB",
         "Δ copies"],
        "Train step: Layca, LARS and the rotation monitor vs optax",
        notes,
    )
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
