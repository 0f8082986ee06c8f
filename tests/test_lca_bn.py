"""BatchNorm in LCA: batch-statistics mode (the authors' setting) never lets a padded row into
a batch statistic, matches an independent transcription on an awkward dataset size, and is
detected automatically; inference mode pads (one compile) and is checked."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_layca import lca

N, D, H, C, B = 103, 5, 7, 3, 25  # 4 full batches of 25 and a last one of 3
EPS = 1e-5


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return {
        "Dense_0": {"kernel": f(D, H) / np.sqrt(D), "bias": 0.1 * f(H)},
        "BatchNorm_0": {"scale": 1.0 + 0.1 * f(H), "bias": 0.1 * f(H)},
        "Dense_1": {"kernel": f(H, C) / np.sqrt(H), "bias": 0.1 * f(C)},
    }


def data(n=N, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    return x, rng.integers(0, C, size=n).astype(np.int32)


def bn_loss(p, batch):
    """Dense → BatchNorm on the statistics of *this* batch → tanh → Dense → cross-entropy."""
    x, y = batch
    h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + EPS)
    h = jnp.tanh(h * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"])
    logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def np_losses(p, x, y):
    """float64 numpy transcription of ``bn_loss`` on one batch."""
    p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in p.items()}
    h = x.astype(np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + EPS)
    h = np.tanh(h * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"])
    z = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    z = z - z.max(1, keepdims=True)
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]


def reference_loss(p, x, y, b):
    """Our path: consecutive batches of ``b``, the last partial one a batch of its own."""
    return sum(np_losses(p, x[i : i + b], y[i : i + b]).sum() for i in range(0, len(y), b)) / len(y)


def authors_loss(p, x, y, b):
    """``get_gradients_and_eval`` of adaptive_calc_gradients.py: ``int(N / b)`` batches
    (remainder dropped), mean of the per-batch mean losses."""
    nb = len(y) // b
    return np.mean(
        [np_losses(p, x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]).mean() for i in range(nb)]
    )


def reference_grad(p, x, y, b):
    """Independent JAX transcription: an explicit loop over the batch slices."""
    f = lambda q: (
        sum(jnp.sum(bn_loss(q, (x[i : i + b], y[i : i + b]))) for i in range(0, len(y), b)) / len(y)
    )
    return jax.jit(jax.grad(f))(p)


def test_batch_statistics_mode_matches_transcription():
    p, (x, y) = make_params(), data()
    ev = lca.Evaluator(bn_loss, (x, y), labels=y, batch_size=B)
    e = ev.evaluate(p)
    assert ev.bn_mode == "batch"  # detected: padding rows would move the batch statistics
    ref = reference_loss(p, x, y, B)
    # float32 forward of ~100-term dots and a float64 host sum: ~1e-6 relative is ample
    np.testing.assert_allclose(e.loss, ref, rtol=2e-6)
    jax.tree.map(
        lambda a, r: np.testing.assert_allclose(a, r, rtol=2e-4, atol=1e-6),
        e.grad,
        reference_grad(p, x, y, B),
    )
    per_class = [
        sum(
            np_losses(p, x[i : i + B], y[i : i + B])[y[i : i + B] == c].sum()
            for i in range(0, N, B)
        )
        / N
        for c in range(C)
    ]
    np.testing.assert_allclose(e.class_loss, per_class, rtol=2e-5, atol=1e-7)
    # the v0.1 path (last batch padded with copies of example 0) is measurably different
    pad = np.r_[np.arange(100, N), np.zeros(B - 3, int)]
    padded = (
        reference_loss(p, x[:100], y[:100], B) * 100 + np_losses(p, x[pad], y[pad])[:3].sum()
    ) / N
    assert abs(padded - ref) > 1e-4 * abs(ref)
    assert lca.Evaluator(bn_loss, (x, y), batch_size=B, bn_mode="batch").evaluate(p).loss == e.loss


def test_authors_path_when_the_batches_divide_the_data():
    p, (x, y) = make_params(2), data()
    # N = 100: every batch full, the authors' mean of batch means is our exact mean
    e = lca.evaluate(bn_loss, p, (x[:100], y[:100]), batch_size=B)
    np.testing.assert_allclose(e.loss, authors_loss(p, x[:100], y[:100], B), rtol=2e-6)
    # N = 103: the authors drop the last 3 examples, we keep them as a batch of their own
    np.testing.assert_allclose(authors_loss(p, x, y, B), authors_loss(p, x[:100], y[:100], B))
    full = lca.evaluate(bn_loss, p, (x, y), batch_size=B).loss
    np.testing.assert_allclose(full, reference_loss(p, x, y, B), rtol=2e-6)


def test_inference_mode_refuses_a_coupled_loss():
    p, (x, y) = make_params(), data()
    with pytest.raises(ValueError, match="couples the examples of a batch"):
        lca.evaluate(bn_loss, p, (x, y), batch_size=B, bn_mode="inference")
    # no partial batch: nothing is padded, nothing to refuse, same numbers in both modes
    a = lca.evaluate(bn_loss, p, (x[:100], y[:100]), batch_size=B, bn_mode="inference")
    b = lca.evaluate(bn_loss, p, (x[:100], y[:100]), batch_size=B, bn_mode="batch")
    assert a.loss == b.loss


def test_batch_iterable_is_evaluated_unpadded():
    p, (x, y) = make_params(), data()
    batches = [(x[i : i + B], y[i : i + B]) for i in range(0, N, B)]
    ev = lca.Evaluator(bn_loss, batches, class_fn=lambda b: b[1], num_classes=C)
    e = ev.evaluate(p)
    assert ev.bn_mode == "batch" and e.num_examples == N
    np.testing.assert_allclose(e.loss, reference_loss(p, x, y, B), rtol=2e-6)


def test_lca_of_a_batchnorm_step_is_conserved():
    p0, (x, y) = make_params(), data()
    g = reference_grad(p0, x, y, B)
    p1 = jax.tree.map(lambda a, d: a - 0.5 * d, p0, g)
    r = lca.allocate(bn_loss, p0, p1, (x, y), labels=y, batch_size=B)
    np.testing.assert_allclose(
        r.loss_change,
        reference_loss(p1, x, y, B) - reference_loss(p0, x, y, B),
        rtol=1e-4,
        atol=1e-6,
    )
    assert r.converged and abs(r.error) <= 1e-3
    assert set(r.per_layer) == {"Dense_0", "BatchNorm_0", "Dense_1"}
    np.testing.assert_allclose(r.per_class.sum(), r.total, rtol=1e-5)


class FlaxBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(H)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(C)(jnp.tanh(x))


def test_flax_batchnorm_modes_are_detected():
    x, y = data()
    model = FlaxBN()
    variables = model.init(jax.random.key(0), x[:4], train=False)
    stats = variables["batch_stats"]

    def train_mode(p, b):  # batch statistics, running averages neither used nor updated
        logits, _ = model.apply(
            {"params": p, "batch_stats": stats}, b[0], train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1])

    def eval_mode(p, b):
        logits = model.apply({"params": p, "batch_stats": stats}, b[0], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1])

    p = variables["params"]
    a = lca.Evaluator(train_mode, (x, y), batch_size=B)
    a.evaluate(p)
    b = lca.Evaluator(eval_mode, (x, y), batch_size=B)
    b.evaluate(p)
    assert (a.bn_mode, b.bn_mode) == ("batch", "inference")
    assert b.layout.padded and not a.layout.padded
