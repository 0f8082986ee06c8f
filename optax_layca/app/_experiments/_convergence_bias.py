"""``convergence-bias``: shallower layers converge faster, and learn the low frequencies
(Chen, Yuille & Zhou, 2023, Definition 2.1, §2 and §5).

The layer-wise convergence rate of Definition 2.1 (:func:`optax_layca.rotation.layer_convergence_rate`),
``C_l^{(t1,t2)} = (‖θ_l(t1) − θ_l*‖ − ‖θ_l(t2) − θ_l*‖) / ((t2 − t1) ‖θ_l(t0) − θ_l*‖)``, with
``θ*`` the parameters at the end of training, gives each layer's share of its way to ``θ*``
covered by step ``t``: ``F_l(t) = t · C_l^{(0,t)}``.

Part A (convergence bias): SGD (lr 0.1, the step decay of the other experiments) trains the
6-layer MLP on MNIST-1D through the one training loop; the parameters are kept every few
steps; ``C_l`` over consecutive windows is the paper's convergence-rate curve.

Part B (frequencies): the paper's text available to us ends at Definition 2.1; its 1-D
experiment is not described there, so this one is ours. The same 6-layer MLP (one input, one
output) fits ``y = sin(2πx) + sin(12πx)`` on 256 points of ``[−1, 1)`` by full-batch Adam
(lr 1e-3; mean squared error; its own small loop, since the one training loop is for
classification). The residual's discrete Fourier coefficient at each frequency, over the
target's, says when each is learned (``t_low``, ``t_high``: the first record where it falls
to 0.5).

Rules, fixed before any run (depth = layer index; Spearman r, :mod:`._common`):

* A, "shallower layers converge faster": the step at which a layer has covered half its way
  to ``θ*`` rises with depth (r ≥ 0.5: agrees; ≤ −0.5: does not reproduce);
* B, "shallower layers tend to learn the low-frequency components ... deeper layers ... the
  high-frequency components": when the low frequency is learned, the shallower layers are
  further along (``F_l(t_low)`` falls with depth, r ≤ −0.5: agrees; ≥ 0.5: does not
  reproduce), and the share of its way a layer covers while the high frequency is learned,
  ``F_l(t_high) − F_l(t_low)``, rises with depth (r ≥ 0.5: agrees; ≤ −0.5: does not
  reproduce); inconclusive when a frequency is never learned or is learned no later than the
  other.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import INCONCLUSIVE, Experiment, ExperimentConfig, Reference, register
from ._common import combine, mnist1d_config, rank_trend, trend_status

__all__ = ["coverage", "figure", "first_below", "run", "verdict"]

CHEN_2023 = Reference(
    "Chen, Yuille & Zhou",
    2023,
    "",
    title=(
        "Which Layer is Learning Faster? A Systematic Exploration of Layer-wise Convergence "
        "Rate for Deep Neural Networks"
    ),
)

SGD_LR = 0.1
FREQS = (1, 6)  # cycles per unit length: 2 and 12 periods on [-1, 1)
NUM_POINTS = 256
ADAM_LR = 1e-3
LEARNED = 0.5  # a frequency is learned when its residual falls to half the target's
HALF_WAY = 0.5


def coverage(trajectory: Mapping[int, Any], final: Any, steps: Sequence[int]) -> dict:
    """``{layer: [F_l(t) for t in steps]}``: the share of its way to ``final`` each layer has
    covered by step ``t`` (``t · C_l^{(0,t)}``, Definition 2.1 with ``t0 = t1 = 0``;
    ``F(0) = 0``).

    Examples:
      >>> traj = {t: {"w": np.full((2, 2), 4.0 - t)} for t in range(5)}
      >>> coverage(traj, traj[4], [0, 1, 4])["w"].tolist()
      [0.0, 0.25, 1.0]
    """
    from ...rotation import layer_convergence_rate

    out: dict[str, list] = {}
    for t in steps:
        if t == 0:
            continue
        for k, v in layer_convergence_rate(trajectory, final, 0, 0, t).items():
            out.setdefault(k, []).append(float(v) * t)
    return {k: np.asarray([0.0] * (len(steps) - len(v)) + v) for k, v in out.items()}


def window_rates(trajectory: Mapping[int, Any], final: Any, steps: Sequence[int]) -> dict:
    """``{layer: [C_l^{(t_{i-1}, t_i)}]}`` over consecutive recorded steps (Definition 2.1)."""
    from ...rotation import layer_convergence_rate

    out: dict[str, list] = {}
    for a, b in zip(steps[:-1], steps[1:]):
        for k, v in layer_convergence_rate(trajectory, final, steps[0], a, b).items():
            out.setdefault(k, []).append(float(v))
    return {k: np.asarray(v) for k, v in out.items()}


def first_below(x: Sequence[float], t: Sequence[float], level: float, above: bool = False):
    """The first ``t`` where ``x <= level`` (``x >= level`` with ``above``), or NaN.

    Examples:
      >>> first_below([1.0, 0.6, 0.4, 0.7], [0, 10, 20, 30], 0.5)
      20.0
    """
    x = np.asarray(x, float)
    hit = np.flatnonzero(x >= level if above else x <= level)
    return float(np.asarray(t, float)[hit[0]]) if hit.size else math.nan


# ----------------------------------------------------------------------------- part A


def _part_a(config: ExperimentConfig) -> dict[str, Any]:
    from .. import _report, _train

    tc = dataclasses.replace(mnist1d_config(config, validation=0.0), eval_every=10**6)
    every = 1 if config.quick else 25
    snaps: dict[int, Any] = {}

    def on_step(run, step, params):
        if step % every == 0:
            snaps[step] = _train.jax_get(params)

    task = _train.setup(tc)
    snaps[0] = _train.jax_get(task.params0)
    group = _train.Group(
        "SGD",
        _train.sgd,
        (_train.Run("sgd", f"SGD (lr {SGD_LR:g})", {"lr": SGD_LR, "weight_decay": 0.0}),),
    )
    res = _train.train(task, [group], progress=config.progress, on_step=on_step)["sgd"]
    snaps[task.total_steps] = res.params  # θ*: the end of training, whatever `every` is
    steps = sorted(snaps)
    final = snaps[steps[-1]]
    cov = coverage(snaps, final, steps)
    order = list(task.order)
    half = {p: first_below(cov[p], steps, HALF_WAY, above=True) for p in order}
    spe = task.steps_per_epoch
    return {
        "identity": _report.run_identity(
            "reproduce", tc, task, experiment="convergence-bias", quick=config.quick
        ),
        "layers": order,
        "epochs": (np.asarray(steps) / spe).tolist(),
        "coverage": {p: cov[p] for p in order},
        "window_rate": {p: v for p, v in window_rates(snaps, final, steps).items()},
        "half_way_epoch": {p: half[p] / spe for p in order},
        "final_test_acc": float(res.test_acc[-1]),
        "epoch_loss": res.epoch_loss,
        "history": res.history,
    }


# ----------------------------------------------------------------------------- part B


def _target(n: int = NUM_POINTS):
    x = -1.0 + 2.0 * np.arange(n) / n
    y = sum(np.sin(2 * np.pi * f * x) for f in FREQS)
    return x.astype(np.float32)[:, None], y.astype(np.float32)


def _bins(n: int = NUM_POINTS) -> list[int]:
    """DFT bins of the frequencies on the grid of :func:`_target` (period 2 ↔ n points)."""
    return [2 * f for f in FREQS]


def _fit_loop(params, apply, x, y, steps: int, every: int):
    """Full-batch Adam on the mean squared error, ``every`` steps per jitted scan; yields
    ``(step, params, prediction)`` at 0 and after every chunk (host copies)."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.adam(ADAM_LR)
    loss = lambda p: jnp.mean((apply(p, x)[:, 0] - y) ** 2)

    @jax.jit
    def chunk(p, s):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        (p, s), _ = jax.lax.scan(body, (p, s), None, length=every)
        return p, s, apply(p, x)[:, 0]

    state = tx.init(params)
    yield 0, jax.device_get(params), np.asarray(apply(params, x)[:, 0])
    for t in range(every, steps + 1, every):
        params, state, pred = chunk(params, state)
        yield t, jax.device_get(params), np.asarray(pred)


def _part_b(config: ExperimentConfig, order: Sequence[str]) -> dict[str, Any]:
    import jax.numpy as jnp

    from ...models import apply_fn, get_model, init_params

    steps, every = (800, 10) if config.quick else (6000, 30)
    x, y = _target()
    model = get_model("deep", num_classes=1)
    params0 = init_params(model, (1,), config.seed)
    apply = apply_fn(model)
    snaps, preds, ts = {}, [], []
    for t, p, pred in _fit_loop(params0, apply, jnp.asarray(x), jnp.asarray(y), steps, every):
        snaps[t] = p
        preds.append(pred)
        ts.append(t)
    resid = np.fft.rfft(np.asarray(preds) - y[None], axis=1)
    target = np.fft.rfft(y)
    rel = {f: np.abs(resid[:, k]) / np.abs(target[k]) for f, k in zip(FREQS, _bins())}
    cov = coverage(snaps, snaps[ts[-1]], ts)
    learned = {f: first_below(rel[f], ts, LEARNED) for f in FREQS}
    at = lambda t: (
        {p: float(np.interp(t, ts, cov[p])) for p in order}
        if math.isfinite(t)
        else {p: math.nan for p in order}
    )
    pick = [
        0,
        int(np.argmin(np.abs(np.asarray(ts) - np.nan_to_num(learned[FREQS[0]])))),
        len(ts) - 1,
    ]
    return {
        "x": x[:, 0],
        "y": y,
        "steps": ts,
        "fits": {str(ts[i]): preds[i] for i in pick},
        "residual": {str(f): rel[f] for f in FREQS},
        "learned_step": {str(f): learned[f] for f in FREQS},
        "coverage": {p: cov[p] for p in order},
        "coverage_at_low": at(learned[FREQS[0]]),
        "coverage_at_high": at(learned[FREQS[1]]),
        "final_mse": float(np.mean((preds[-1] - y) ** 2)),
    }


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Part A (MNIST-1D, SGD) and part B (1-D regression, Adam); see the module docstring."""
    a = _part_a(config)
    order = a["layers"]
    b = _part_b(config, order)
    history = a.pop("history")
    out = {
        "identity": a.pop("identity"),
        "layers": order,
        "classification": a,
        "frequencies": b,
        "histories": {"sgd": history},
    }
    out["table"] = _table(out)
    return out


def _table(results: Mapping[str, Any]) -> str:
    from .._report import md_table

    a, b = results["classification"], results["frequencies"]
    fmt = lambda v: "never" if not math.isfinite(v) else f"{v:.2f}"
    rows = [
        [
            p,
            fmt(a["half_way_epoch"][p]),
            fmt(b["coverage_at_low"][p]),
            fmt(b["coverage_at_high"][p] - b["coverage_at_low"][p]),
        ]
        for p in results["layers"]
    ]
    lo, hi = (b["learned_step"][str(f)] for f in FREQS)
    return (
        f"Part B: the low frequency ({FREQS[0]} cycle per unit) is learned at step {fmt(lo)}, "
        f"the high one ({FREQS[1]} cycles) at step {fmt(hi)}.\n\n"
        + md_table(
            ["layer", "A: epoch at half way to θ*", "B: F(t_low)", "B: F(t_high) − F(t_low)"], rows
        )
    )


# ----------------------------------------------------------------------------- figure


def figure(results: Mapping[str, Any]):
    """Part A: convergence-rate curves per layer (windows), the share of the way covered, the
    epoch at half way by depth; part B: the fits, the residual per frequency, the share of the
    way covered with ``t_low`` / ``t_high`` marked, and the shares by depth."""
    import matplotlib.pyplot as plt

    from ... import plot

    order, a, b = results["layers"], results["classification"], results["frequencies"]
    depth = list(range(len(order)))
    fig = plt.figure(figsize=(17, 8.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    ax = top.subplots(1, 3)
    ep = np.asarray(a["epochs"], float)
    mid = (ep[:-1] + ep[1:]) / 2
    curves = lambda d, x: {p: (x, d[p]) for p in order}
    plot.training_curves_figure(
        curves(a["window_rate"], mid),
        ax=ax[0],
        ylabel="C_l per step",
        title="layer-wise convergence rate (Definition 2.1)",
    )
    plot.training_curves_figure(
        curves(a["coverage"], ep),
        ax=ax[1],
        legend=False,
        ylabel="share of the way to θ* covered",
        title="F_l(t) = t · C_l^(0,t)",
    )
    plot.training_curves_figure(
        {"epoch at half way": (depth, [a["half_way_epoch"][p] for p in order])},
        ax=ax[2],
        xlabel="layer depth (0 = input)",
        ylabel="epoch",
        colors=["k"],
        title="when each layer is half way",
        legend=False,
    )
    ax[2].lines[0].set_marker("o")
    top.suptitle("Part A: layer convergence bias (MNIST-1D, 6-layer MLP, SGD)", fontsize=11)
    _figure_b(bottom, order, b)
    return fig


def _figure_b(sub, order, b) -> None:
    from ... import plot

    ax = sub.subplots(1, 4)
    fits = {f"step {t}": (b["x"], v) for t, v in b["fits"].items()}
    plot.training_curves_figure(
        {"target": (b["x"], b["y"]), **fits},
        ax=ax[0],
        xlabel="x",
        ylabel="y",
        colors=["k", *plot_colors(len(fits))],
        title="target and fits",
    )
    steps = b["steps"]
    plot.training_curves_figure(
        {f"{f} cycle(s) per unit": (steps, b["residual"][str(f)]) for f in FREQS},
        ax=ax[1],
        xlabel="step",
        ylabel="|residual| / |target| at the frequency",
        colors=["tab:blue", "tab:red"],
        title="spectral residual",
    )
    plot.training_curves_figure(
        {p: (steps, b["coverage"][p]) for p in order},
        ax=ax[2],
        xlabel="step",
        ylabel="share of the way to θ*",
        legend=False,
        title="F_l(t); dashed: t_low, t_high",
    )
    for f, c in zip(FREQS, ("tab:blue", "tab:red")):
        t = b["learned_step"][str(f)]
        if math.isfinite(_num(t)):
            for axis in ax[1:3]:
                axis.axvline(t, color=c, ls="--", lw=0.8)
    depth = list(range(len(order)))
    lo = [_num(b["coverage_at_low"][p]) for p in order]
    hi = [_num(b["coverage_at_high"][p]) - _num(b["coverage_at_low"][p]) for p in order]
    plot.training_curves_figure(
        {"F(t_low)": (depth, lo), "F(t_high) − F(t_low)": (depth, hi)},
        ax=ax[3],
        xlabel="layer depth (0 = input)",
        ylabel="share of the way",
        colors=["tab:blue", "tab:red"],
        title="who moves in which phase",
    )
    for line in ax[3].lines:
        line.set_marker("o")
    sub.suptitle(
        "Part B: low and high frequency of a 1-D target (ours: the paper's setting is "
        "not in its available text)",
        fontsize=11,
    )


def _num(v: Any) -> float:
    """A number read back from the JSON (None for a non-finite one) as a float."""
    return math.nan if v is None else float(v)


def plot_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["autumn"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


# ----------------------------------------------------------------------------- verdict


def verdict(results: Mapping[str, Any]) -> tuple[str, str]:
    """The rules of the module docstring."""
    order, a, b = results["layers"], results["classification"], results["frequencies"]
    depth = list(range(len(order)))
    half = [_num(a["half_way_epoch"][p]) for p in order]
    r_a = rank_trend(depth, half)
    lo_t, hi_t = (_num(b["learned_step"][str(f)]) for f in FREQS)
    ok = math.isfinite(lo_t) and math.isfinite(hi_t) and lo_t < hi_t
    low = [_num(b["coverage_at_low"][p]) for p in order]
    high = [_num(b["coverage_at_high"][p]) for p in order]
    r_lo = rank_trend(depth, low) if ok else math.nan
    r_hi = rank_trend(depth, np.subtract(high, low)) if ok else math.nan
    s_a, s_lo, s_hi = trend_status(r_a), trend_status(-r_lo), trend_status(r_hi)
    if not ok:
        s_lo = s_hi = INCONCLUSIVE
    fmt = lambda v: "never" if not math.isfinite(v) else f"{v:.0f}"
    text = (
        f"A: epoch at which each layer is half way to θ* {[round(v, 2) for v in half]} "
        f"(input to output): Spearman r with depth {r_a:.2f} (≥ 0.5: shallower converge "
        f"faster): {s_a}. B: low frequency learned at step {fmt(lo_t)}, high at {fmt(hi_t)}; "
        f"r(depth, F(t_low)) = {r_lo:.2f} (≤ −0.5: shallower further along): {s_lo}; "
        f"r(depth, F(t_high) − F(t_low)) = {r_hi:.2f} (≥ 0.5: deeper move in the high phase): "
        f"{s_hi}."
    )
    return combine([s_a, s_lo, s_hi]), text


CLAIM = (
    "This work demonstrates that the shallower layers of DNNs tend to converge faster than the "
    "deeper layers. We call this phenomenon Layer Convergence Bias. [...] Another surprising "
    "result is that the shallower layers tend to learn the low-frequency components of the "
    "target function, while the deeper layers usually learn the high-frequency components."
)

EXPERIMENT = register(
    Experiment(
        "convergence-bias",
        CHEN_2023.at("Definition 2.1, §2 and §5"),
        CLAIM,
        "A: MNIST-1D (4,000 train sequences) and a 6-layer ReLU MLP (width 64), 30 epochs of "
        "SGD (lr 0.1, ×0.2 at 70% and 90%) with the parameters kept every 25 steps (quick: 3 "
        "epochs on 1,000 examples, every step), stand in for the paper's image networks; θ* "
        "is the end of training. B: the same MLP with one input fits sin(2πx) + sin(12πx) on "
        "256 points by full-batch Adam (lr 1e-3), 6,000 steps (quick: 800); the paper's own "
        "1-D setting is not in its available text, so this setting and its rule are ours.",
        run,
        figure,
        verdict,
    )
)
