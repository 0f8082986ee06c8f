"""``one-layer-at-a-time``: train a single layer of a deep MLP, the others frozen
(Carbonnelle & De Vleeschouwer, 2019, Fig. 1, and App. A.1, Fig. 7).

**Freezing.** Every layer but the trained one gets a zero update through
``optax.multi_transform`` (one label per layer module, kernel and bias together, as Keras'
``trainable = False`` in the authors' code) with a *traced* 0/1 ``optax.scale`` per label:
the index of the trained layer is a hyperparameter, so every choice of layer (and learning
rate) trains in one vmapped group, one compiled program. The output layer is never trained,
as in the paper.

**Learning rate.** Plain SGD at a constant rate, chosen per layer (and per repetition) on the
grid ``LRS`` as the one with the lowest training loss in the last epoch: trainability alone
decides, the test set plays no part.

**Feedback (Fig. 7).** The feedback a layer receives is the gradient of the loss with respect
to its output, per example (the authors' ``LayerFeedbackMemory``, on test examples), here for
the first layer trained alone at rate ``FEEDBACK_LR = 1``, the authors' rate for Fig. 7. The
library has no instrument for it, so :func:`first_layer_feedback` computes it with
``jax.grad`` through the model's own loss; scikit-learn's ``silhouette_score`` (cosine
distance, the paper's choice) scores it against the classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import AGREES, CARBONNELLE_2019, INCONCLUSIVE, Experiment, ExperimentConfig, register
from ._common import combine, compare_accuracies, rank_trend, run_summary, train_runs, trend_status

__all__ = ["figure", "first_layer_feedback", "only_layer", "run", "verdict"]

NAME = "one-layer-at-a-time"
LRS = (1.0, 3.0, 10.0, 30.0)  # SGD learning rates tried for every layer
DEFAULT_REPEATS, DEFAULT_EPOCHS = 5, 150
QUICK_REPEATS, QUICK_EPOCHS = 1, 20
FEEDBACK_POINTS = 16  # epochs at which the first layer's feedback is measured (0 included)
FEEDBACK_LR = 1.0  # Fig. 7's run: the first layer alone at the authors' rate for that figure
TRAINED = 0.99  # "100% training accuracy": every trained layer must fit the training set


def layer_modules(order: Sequence[str]) -> list[str]:
    """The module of each layer, in forward order (``"Dense_3/kernel"`` → ``"Dense_3"``)."""
    return [p.rsplit("/", 1)[0] for p in order]


def only_layer(task: Any, hp: Mapping[str, Any]):
    """SGD on layer ``hp["layer"]`` only (a traced index), rate ``hp["lr"]``; every other
    parameter (the head included) gets a zero update."""
    import jax
    import jax.numpy as jnp
    import optax

    from ... import path_str

    modules = layer_modules(task.order)

    def label(params):
        def one(path, _):
            module = path_str(path).rsplit("/", 1)[0]
            return module if module in modules else "frozen"

        return jax.tree_util.tree_map_with_path(one, params)

    scales = {m: optax.scale((hp["layer"] == i).astype(jnp.float32)) for i, m in enumerate(modules)}
    scales["frozen"] = optax.set_to_zero()
    return optax.chain(optax.multi_transform(scales, label), optax.sgd(task.schedule(hp["lr"])))


def run_key(layer: int, lr: float) -> str:
    return f"layer{layer}_lr{lr:g}"


def _group(num_layers: int):
    from .._train import Group, Run

    runs = tuple(
        Run(run_key(k, lr), f"layer {k} (lr {lr:g})", {"layer": float(k), "lr": lr})
        for k in range(num_layers)
        for lr in LRS
    )
    return Group(f"one layer at a time ({len(runs)} runs, vmapped)", only_layer, runs)


def first_layer_feedback(task: Any):
    """``f(params, x, y) -> (N, units)``: per example, the gradient of the loss with respect
    to the first layer's output ``h = relu(x W₀ + b₀)`` (jitted).

    The second layer computes ``z = h W₁ + b₁``, so shifting ``h`` by ``ε`` is shifting ``b₁``
    by ``ε W₁``: ``∂ℓ/∂h`` is the gradient of ``ℓ`` with respect to that ``ε`` at 0, one
    example at a time (``vmap``). Needs a dense net whose second layer reads the first's
    output (the ``"deep"``, ``"mlp"`` and ``"fc"`` models).
    """
    import jax
    import jax.numpy as jnp

    if len(task.order) < 2:
        raise ValueError("`first_layer_feedback` needs a model with at least two layers.")
    first, second = layer_modules(task.order)[:2]
    p = task.params0
    if not all(m in p and {"kernel", "bias"} <= set(p[m]) for m in (first, second)):
        raise ValueError(
            f"`first_layer_feedback` needs dense layers {first!r} and {second!r} with a kernel "
            f"and a bias at the top of the parameters; got {sorted(p)}."
        )
    units = p[first]["kernel"].shape[-1]

    def loss_at(eps, params, x, y):
        layer = params[second]
        shifted = {**params, second: {**layer, "bias": layer["bias"] + eps @ layer["kernel"]}}
        return task.loss(shifted, x[None], y[None], jnp.ones(1, bool))

    per_example = jax.vmap(jax.grad(loss_at), in_axes=(None, None, 0, 0))
    return jax.jit(lambda params, x, y: per_example(jnp.zeros(units, jnp.float32), params, x, y))


class FeedbackProbe:
    """``on_epoch`` callback keeping the first layer's feedback on the test set for the runs
    ``keys`` at ``epochs`` (device arrays: no host sync during training)."""

    def __init__(self, task: Any, keys: Sequence[str], epochs: Sequence[int]):
        import jax.numpy as jnp

        self.fn = first_layer_feedback(task)
        self.x, self.y = jnp.asarray(task.data.x_test), jnp.asarray(task.data.y_test)
        self.epochs = {int(e) for e in epochs}
        at_init = self.fn(task.params0, self.x, self.y)
        self.feedback = {k: {0: at_init} for k in keys}

    def __call__(self, run: Any, epoch: int, params: Any, opt_state: Any) -> None:
        del opt_state
        if run.key in self.feedback and epoch in self.epochs:
            self.feedback[run.key][epoch] = self.fn(params, self.x, self.y)

    def silhouettes(self, key: str, labels: np.ndarray) -> tuple[list[int], list[float]]:
        """``(epochs, silhouette scores)`` of run ``key``'s feedback against ``labels``."""
        from sklearn.metrics import silhouette_score

        epochs = sorted(self.feedback[key])
        scores = [
            float(silhouette_score(np.asarray(self.feedback[key][e]), labels, metric="cosine"))
            for e in epochs
        ]
        return epochs, scores


def _train_config(config: ExperimentConfig, seed: int):
    from .._train import TrainConfig

    epochs = QUICK_EPOCHS if config.quick else DEFAULT_EPOCHS
    return TrainConfig(
        dataset="digits",
        model="deep",
        epochs=epochs,
        batch_size=10,
        seed=seed,
        num_train=100,
        decay_at=(),
        records_per_epoch=1,
        eval_every=epochs,
    )


def _repeat(config: ExperimentConfig, seed: int) -> dict[str, Any]:
    """One repetition (its own data subset and initialisation): every layer × rate."""
    from .._train import setup

    tc = _train_config(config, seed)
    task = setup(tc)
    num_layers = len(task.order) - 1  # the head is never trained
    epochs = np.unique(np.linspace(0, tc.epochs, FEEDBACK_POINTS).round().astype(int))
    probe = FeedbackProbe(task, [run_key(0, FEEDBACK_LR)], epochs[epochs > 0])
    task, res, identity = train_runs(
        NAME, config, tc, [_group(num_layers)], task=task, on_epoch=probe
    )
    runs = {k: run_summary(r, task.order) for k, r in res.items()}
    loss = lambda k: runs[k]["epoch_loss"][-1]
    chosen = []
    for k in range(num_layers):
        keys = [run_key(k, lr) for lr in LRS]
        finite = [key for key in keys if loss(key) is not None and math.isfinite(loss(key))]
        chosen.append(min(finite, key=loss) if finite else keys[0])
    sil_epochs, sil = probe.silhouettes(run_key(0, FEEDBACK_LR), np.asarray(task.data.y_test))
    return {
        "seed": seed,
        "identity": identity,
        "num_test": len(task.data.x_test),
        "chosen": chosen,
        "test_acc": [runs[k]["final"]["test_acc"] for k in chosen],
        "train_acc": [runs[k]["final"]["train_acc"] for k in chosen],
        "silhouette_epochs": sil_epochs,
        "silhouette": sil,
        "runs": runs,
        "histories": {f"s{seed}_{k}": res[k].history for k in chosen},
    }


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Every layer trained alone, at every rate, for each repetition; Fig. 7's silhouettes."""
    repeats = QUICK_REPEATS if config.quick else DEFAULT_REPEATS
    reps = [_repeat(config, config.seed + i) for i in range(repeats)]
    histories = {k: h for r in reps for k, h in r.pop("histories").items()}
    test, train = (
        np.asarray([r["test_acc"] for r in reps]),
        np.asarray([r["train_acc"] for r in reps]),
    )
    sil = np.asarray([r["silhouette"] for r in reps], float)
    out = {
        "identity": {**reps[0]["identity"], "seeds": [r["seed"] for r in reps]},
        "lrs": list(LRS),
        "num_test_total": int(sum(r["num_test"] for r in reps)),
        "test_acc": test.tolist(),
        "train_acc": train.tolist(),
        "mean_test_acc": np.nanmean(test, axis=0).tolist(),
        "mean_train_acc": np.nanmean(train, axis=0).tolist(),
        "silhouette_epochs": reps[0]["silhouette_epochs"],
        "silhouette": sil.tolist(),
        "mean_silhouette": sil.mean(axis=0).tolist(),
        "repeats": [{k: v for k, v in r.items() if k != "identity"} for r in reps],
        "histories": histories,
    }
    out["table"] = _table(out)
    return out


def _table(results: Mapping[str, Any]) -> str:
    from .._report import md_table

    chosen = [r["chosen"] for r in results["repeats"]]
    rows = [
        [
            str(k),
            f"{results['mean_train_acc'][k]:.3f}",
            f"{results['mean_test_acc'][k]:.3f}",
            ", ".join(c[k].split("_lr")[1] for c in chosen),
        ]
        for k in range(len(results["mean_test_acc"]))
    ]
    head = ["trained layer", "train acc (mean)", "test acc (mean)", "lr chosen (per repetition)"]
    return md_table(head, rows)


# ----------------------------------------------------------------------------- figure


def figure(results: Mapping[str, Any]):
    """Fig. 1 (test accuracy vs the index of the trained layer), the training accuracy that
    goes with it, and Fig. 7 (silhouette of the first layer's feedback over training)."""
    import matplotlib.pyplot as plt

    from ... import plot
    from .._figures import tidy

    fig, (acc_ax, train_ax, sil_ax) = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    n = len(results["test_acc"])
    plot.layer_accuracy_figure(
        results["test_acc"], ax=acc_ax, title=f"Fig. 1: test accuracy ({n} repetitions)"
    )
    plot.layer_accuracy_figure(
        results["train_acc"], ax=train_ax, ylabel="training accuracy", title="training accuracy"
    )
    series = {
        f"layer 0 trained, lr {FEEDBACK_LR:g} (mean of {n})": (
            results["silhouette_epochs"],
            results["mean_silhouette"],
        )
    }
    plot.training_curves_figure(
        series,
        ax=sil_ax,
        ylabel="silhouette score of the feedback",
        colors=["C2"],
        title="Fig. 7: first layer's feedback vs classes",
    )
    tidy(fig, [acc_ax, train_ax, sil_ax], "One layer trained at a time (the others frozen)")
    return fig


# ----------------------------------------------------------------------------- verdict


def verdict(results: Mapping[str, Any]) -> tuple[str, str]:
    """Four rules (:mod:`._common`): every layer fits the training set (a precondition: the
    verdict cannot agree without it); test accuracy falls with the depth of the trained layer
    (Spearman); the first layer beats the last (2 se); the feedback's silhouette rises over
    training (Spearman)."""
    test, train = np.asarray(results["mean_test_acc"]), np.asarray(results["train_acc"], float)
    fits = bool(np.all(np.isfinite(train)) and np.all(train >= TRAINED))
    s_fit = AGREES if fits else INCONCLUSIVE
    r_depth = rank_trend(np.arange(len(test)), -test)
    s_depth = trend_status(r_depth)
    s_ends, delta, se = compare_accuracies(
        float(test[0]), float(test[-1]), results["num_test_total"], "greater"
    )
    r_sil = rank_trend(results["silhouette_epochs"], results["mean_silhouette"])
    s_sil = trend_status(r_sil)
    sil = results["mean_silhouette"]
    text = (
        f"Training accuracy of the trained layers (min over layers and repetitions) "
        f"{np.nanmin(train):.3f} (all ≥ {TRAINED}: {s_fit}). Mean test accuracy per trained "
        f"layer {np.round(test, 3).tolist()}: Spearman r of the decrease with depth = "
        f"{r_depth:.2f} ({s_depth}); first layer − last layer = {delta:+.3f} (2·se = "
        f"{2 * se:.3f}): {s_ends}. Silhouette of the first layer's feedback {sil[0]:.3f} at "
        f"init → {sil[-1]:.3f} at the end, Spearman r with the epoch = {r_sil:.2f}: {s_sil}."
    )
    return combine([s_fit, s_depth, s_ends, s_sil]), text


CLAIM = (
    "Figure 1 supports our intuition with a toy example where training a single layer of an "
    "11 layer MLP network, although always reaching 100% train accuracy, results in different "
    "test accuracies depending on the layer's localisation in the network's architecture. [...] "
    "In this specific example, the test accuracy mostly degrades with the depth of the trained "
    "layer, with a final difference of nearly 20%. [...] the figure shows that "
    "even when only the first layer is trained, the feedback it receives gets more correlated "
    "with the classes/targets through training."
)

register(
    Experiment(
        name=NAME,
        reference=CARBONNELLE_2019.at("§1, Fig. 1 and App. A.1, Fig. 7"),
        claim=CLAIM,
        stand_in=(
            "scikit-learn's 8×8 digits (64 pixels) reduced to its first 100 training examples "
            "(≈10 per class, the paper's 10 per class of MNIST) with the full 450-example test "
            "split, and the `deep` MLP: five identical 64×64 ReLU layers (input size = width, "
            "as the paper's 784) and a 64×10 head, for the paper's ten 784×784 layers. Each "
            "layer is trained alone with minibatch SGD (batch 10, constant rate, the best of "
            f"{', '.join(f'{lr:g}' for lr in LRS)} on training loss) for 150 epochs (quick: 20) "
            "instead of full-batch SGD at rate 10 for 4,000 epochs (the full batch costs one "
            "host round trip per step in this loop); 5 repetitions (quick: 1) instead of 10. "
            "Fig. 7's feedback is measured on the test examples at 16 epochs of the first "
            "layer's run at rate 1 (the authors' rate for Fig. 7; 500 full-batch epochs there)."
        ),
        run=run,
        figure=figure,
        verdict=verdict,
    )
)
