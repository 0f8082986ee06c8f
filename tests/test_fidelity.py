"""The package against numpy transcriptions of the *authors' code* (``docs/fidelity.md``).

Each reference below transcribes, in float64 numpy and without importing ``optax_layca``, a
code path of Carbonnelle & De Vleeschouwer's repositories (Keras, 2019):
``layer_rotation_control.py`` (Layca on Keras' SGD / Adam), ``LARS.py``,
``get_training_utils.get_learning_rate_multipliers``, ``training_monitoring.py``
(``trainingMemories.layerwise_gradientnorm``, ``Adam_2nd_moment_memory``) and
``rotation_rate_utils.LayerwiseAngleDeviationCurves``. Where the package's default differs
from the authors, the test uses the documented option that reproduces them.

Tolerances (float32, eps = 2**-23 ≈ 1.2e-7): a per-layer reduction over n ≤ 64 entries has
relative error ≤ n·eps ≈ 8e-6 in the worst case and ~√n·eps ≈ 1e-6 typically; one Layca or
LARS step from the *same* params and gradient combines a handful of such reductions, so one
step agrees to 3e-6 relative per leaf (the bound used throughout ``test_layca.py``). Adam's
moments kept in float32 over T steps add ≤ T·eps relative each (T = 20: 2.4e-6), hence 1e-5
where a float32 Adam state is carried.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _utils import assert_trees_close_rel, flat, init_mlp, mlp_data, mlp_grad_np

import optax_layca as ol
from optax_layca import rotation

SIZES = [6, 8, 8, 3]
NAMES = [f"Dense_{i}" for i in range(len(SIZES) - 1)]  # kernel layers in forward order
P0 = init_mlp(SIZES)
X, Y = mlp_data(SIZES, n=40)
KERAS_EPS = 1e-7  # keras.backend.epsilon()


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


# ----------------------------------------------------------------------------- the authors' code


def authors_multipliers(layer_names, alpha):
    """``get_training_utils.get_learning_rate_multipliers``: ``{layer name: multiplier}``."""
    n = len(layer_names)
    if alpha > 0.0:
        mult = (1 - alpha) ** (5 / (n - 1))
        return {k: mult ** (n - 1 - i) for i, k in enumerate(layer_names)}
    mult = (alpha + 1) ** (5 / (n - 1))
    return {k: mult**i for i, k in enumerate(layer_names)}


def authors_layca(name, p, step, lr):
    """``layer_rotation_control.layca``: kernels rotate, every other tensor is returned as is."""
    if "kernel" not in name:
        return p
    norm = lambda w: np.sqrt(np.sum(w * w))
    initial_norm = norm(p)
    step = step - np.sum(step * p) * p / initial_norm**2
    step = np.zeros_like(step) if norm(step) <= KERAS_EPS else step / norm(step) * initial_norm
    new_p = p - lr * step
    return new_p / norm(new_p) * initial_norm


class AuthorsKerasLayca:
    """``layca_optimizers.SGD(layca=True, momentum, adam_like_momentum, multipliers)`` and
    ``layca_optimizers.Adam(layca=True)`` (Keras' Adam: ε added to the uncorrected √v)."""

    def __init__(self, kind, lr, multipliers, b1=0.9, b2=0.999, momentum=0.9):
        self.kind, self.lr, self.multipliers = kind, lr, multipliers
        self.b1, self.b2, self.momentum = b1, b2, momentum
        self.m, self.v, self.t = {}, {}, 0

    def step(self, params, grads):
        self.t += 1
        new = {}
        for name, p in params.items():
            g = grads[name]
            m = self.m.get(name, np.zeros_like(p))
            if self.kind == "adam":  # no multipliers in the authors' Adam
                t, lr = self.t, self.lr
                lr_t = lr * np.sqrt(1.0 - self.b2**t) / (1.0 - self.b1**t)
                self.m[name] = self.b1 * m + (1.0 - self.b1) * g
                self.v[name] = self.b2 * self.v.get(name, np.zeros_like(p)) + (1 - self.b2) * g * g
                step = lr_t * self.m[name] / (np.sqrt(self.v[name]) + KERAS_EPS)
                new[name] = authors_layca(name, p, step, lr)
                continue
            key = name.split("/")[0]  # `key + '/' in p.name`
            new_lr = self.lr * self.multipliers.get(key, 1.0)
            if self.kind == "sgd_amom":  # adam_like_momentum=True
                self.m[name] = self.momentum * m - (1.0 - self.momentum) * g
                v = new_lr * self.m[name]
            else:  # plain SGD, momentum 0 as in `get_optimizer('SGD_layca', ...)`
                v = -new_lr * g
            new[name] = authors_layca(name, p, -v, new_lr)
        return new


class AuthorsLars:
    """``Supplementary Results/LARS.py`` (momentum 0, its default and the paper's runs):
    every tensor, biases and norm parameters included, takes a step of its own norm, and
    its norm growth is capped at 1e-4 of its own initial norm."""

    def __init__(self, params0, lr, multipliers, diff=1e-4):
        self.lr, self.multipliers, self.diff = lr, multipliers, diff
        self.initial_norms = {k: np.linalg.norm(v) for k, v in params0.items()}

    def step(self, params, grads):
        new = {}
        for name, p in params.items():
            # `key in p.name` (first match): a layer's bias shares its kernel's multiplier;
            # a norm layer, absent from the multipliers, gets the plain rate.
            match = [k for k in self.multipliers if k in name]
            new_lr = self.lr * self.multipliers[match[0]] if match else self.lr
            v = -new_lr * grads[name]
            norm = np.linalg.norm(p)
            with np.errstate(invalid="ignore", divide="ignore"):
                step = v / np.linalg.norm(v) * norm
            step = np.where(np.isnan(step), 0.0, step)
            new_p = p + new_lr * step
            new_norm = np.linalg.norm(new_p)
            if new_norm - norm > self.diff * self.initial_norms[name]:
                new_p = new_p / new_norm * (norm + self.initial_norms[name] * self.diff)
            new[name] = new_p
        return new


def keras_adam_direction(b2=0.999):
    """The recipe of ``layca``'s docstring: Keras' Adam step divided by the learning rate."""
    return optax.inject_hyperparams(optax.scale_by_adam)(
        b1=0.9, b2=b2, eps=lambda t: KERAS_EPS / jnp.sqrt(1 - b2 ** (t + 1))
    )


# ----------------------------------------------------------------------------- stepping


def _mlp_grads(params):
    return flat(mlp_grad_np(_np(params), X, Y))


def _nest(flat_tree):
    out = {}
    for path, v in flat_tree.items():
        mod, leaf = path.split("/")
        out.setdefault(mod, {})[leaf] = v
    return out


def _compare_steps(tx, ref, params, grads_at, steps, tol):
    """From the package's params at every step, one float64 step of the authors' code on the
    same gradient equals the package's step (per leaf, relative ``tol``)."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(steps):
        g64 = grads_at(t, params)
        expected = ref.step(flat(params), g64)
        updates, state = update(_f32(_nest(g64)), state, params)
        new = optax.apply_updates(params, updates)
        assert_trees_close_rel(new, _nest(expected), tol=tol, err=f"step {t}:")
        params = new
    return params


@pytest.mark.parametrize("alpha", [0.0, 0.6])
@pytest.mark.parametrize("kind", ["sgd", "sgd_amom"])
def test_layca_sgd_is_the_authors(kind, alpha):
    """Kernels follow the authors' Keras SGD + Layca; biases never move (the default)."""
    lr = 0.05
    base = optax.ema(0.9, debias=False) if kind == "sgd_amom" else None
    tx = ol.layca(lr, base=base, alpha=alpha, min_step_norm=KERAS_EPS, parallel_tol=0.0)
    ref = AuthorsKerasLayca(kind, lr, authors_multipliers(NAMES, alpha))
    p0 = _f32(P0)
    final = _compare_steps(tx, ref, p0, lambda t, p: _mlp_grads(p), 15, tol=3e-6)
    for name in NAMES:  # frozen bit for bit
        np.testing.assert_array_equal(final[name]["bias"], p0[name]["bias"])
    assert not np.allclose(final["Dense_0"]["kernel"], p0["Dense_0"]["kernel"])


def test_layca_adam_is_the_authors_with_the_keras_recipe():
    lr = 0.02
    tx = ol.layca(lr, base=keras_adam_direction(), min_step_norm=KERAS_EPS, parallel_tol=0.0)
    ref = AuthorsKerasLayca("adam", lr, {})
    # float32 Adam moments carried over 20 steps: 1e-5 (module docstring).
    _compare_steps(tx, ref, _f32(P0), lambda t, p: _mlp_grads(p), 20, tol=1e-5)


def test_layca_authors_absolute_guard():
    """The authors drop a kernel step whose lr-scaled projection is ≤ 1e-7; so does
    ``min_step_norm=1e-7``; the package's default (relative guard only) rotates it."""
    lr, p0 = 0.05, _f32(P0)
    g = _mlp_grads(p0)
    g["Dense_1/kernel"] = g["Dense_1/kernel"] * (1e-7 / np.linalg.norm(g["Dense_1/kernel"]))
    expected = AuthorsKerasLayca("sgd", lr, {}).step(flat(p0), g)
    # the authors still renormalise the unmoved layer: float64 rounding only
    np.testing.assert_allclose(expected["Dense_1/kernel"], flat(p0)["Dense_1/kernel"],
                               rtol=1e-15)
    for min_step_norm, moves in ((KERAS_EPS, False), (0.0, True)):
        tx = ol.layca(lr, min_step_norm=min_step_norm, parallel_tol=0.0)
        u, _ = tx.update(_f32(_nest(g)), tx.init(p0), p0)
        assert bool(jnp.any(u["Dense_1"]["kernel"] != 0)) == moves
        assert bool(jnp.any(u["Dense_0"]["kernel"] != 0))


def _lars_params():
    """An MLP with a zero-initialised bias and a norm layer (scale 1, bias 0) in between."""
    p = {k: dict(v) for k, v in P0.items()}
    p["Dense_0"]["bias"] = np.zeros_like(p["Dense_0"]["bias"])
    p["BatchNorm_0"] = {"scale": np.ones(SIZES[1], np.float32),
                        "bias": np.zeros(SIZES[1], np.float32)}
    return _f32(p)


def test_lars_is_the_authors():
    """Every tensor normalised and capped on its own norm, the module's multiplier for a bias,
    the plain rate for a norm layer, a zero tensor left at 0, a zero gradient a zero step."""
    lr, alpha = 0.1, 0.6
    params = _lars_params()
    tx = ol.lars(lr, alpha=alpha)  # the defaults are the authors'
    ref = AuthorsLars(flat(params), lr, authors_multipliers(NAMES, alpha))
    rng = np.random.default_rng(3)

    def grads(t, p):
        g = {k: rng.standard_normal(np.shape(v)) for k, v in flat(p).items()}
        if t == 2:
            g["Dense_2/bias"] = np.zeros_like(g["Dense_2/bias"])  # authors: NaN step -> 0
        return g

    final = _compare_steps(tx, ref, params, grads, 12, tol=3e-6)
    for leaf in ("Dense_0/bias", "BatchNorm_0/bias"):  # zero tensors: exactly 0
        np.testing.assert_array_equal(flat(final)[leaf], 0.0)
    assert not np.allclose(final["BatchNorm_0"]["scale"], 1.0)  # trained, with its own norm
    # The former behaviour, a plain step for non-layers, is the option "base".
    g0 = _f32(_nest(grads(0, params)))
    base = ol.lars(lr, non_layer="base")
    u, _ = base.update(g0, base.init(params), params)
    # one float32 product: exact to half an ulp
    np.testing.assert_allclose(u["Dense_0"]["bias"], np.float32(-lr) * g0["Dense_0"]["bias"],
                               rtol=2**-23)


# ----------------------------------------------------------------------------- Adam epsilon


def _keras_adam_steps(grads_seq, lr, b1=0.9, b2=0.999):
    m = v = 0.0
    for t, g in enumerate(grads_seq, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + KERAS_EPS)
    return step


def test_adam_direction_keras_epsilon():
    """Keras' Adam (the authors') vs optax's: the recipe is exact to float32, the default is
    measurably apart (ε = 1e-8 on the corrected √v̂ instead of 1e-7 on the raw √v)."""
    rng = np.random.default_rng(0)
    # Gradients of 1e-5..1e-4, the size of late-training gradients, where ε matters.
    grads_seq = [1e-5 * (1 + 9 * rng.random(64)) * rng.choice([-1, 1], 64) for _ in range(20)]
    want = _keras_adam_steps(grads_seq, lr=1.0)

    def run(tx):
        p = jnp.zeros(64)
        state = tx.init(p)
        for g in grads_seq:
            u, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
        return np.asarray(u, np.float64)

    def rel(a):
        return np.linalg.norm(a - want) / np.linalg.norm(want)

    # One step of the recipe: 20 float32 updates of m and v (≤ 20·eps each) and a division:
    # ≤ 3e-6 relative; 1e-5 leaves room for the float32 β₂ᵗ and the square root.
    recipe = run(keras_adam_direction())
    assert rel(recipe) < 1e-5
    # Directions (what Layca keeps): optax's default is 8.3e-4 apart here (its step size
    # 1.1%), far above the float32 noise of the recipe's direction.
    unit = lambda a: a / np.linalg.norm(a)
    gap = lambda a: np.linalg.norm(unit(a) - unit(want))
    default = run(optax.scale_by_adam())
    assert gap(default) > 3e-4 and gap(default) > 50 * gap(recipe)
    assert abs(np.linalg.norm(default) / np.linalg.norm(want) - 1) > 5e-3


# ----------------------------------------------------------------------------- α multipliers


def test_alpha_multipliers_are_the_authors():
    for alpha, n in itertools.product([-0.8, -0.3, 0.0, 0.4, 0.8], [2, 11]):
        names = [f"Dense_{i}" for i in range(n)]
        want = np.array(list(authors_multipliers(names, alpha).values()))
        # float32 power of an exactly representable base: ≤ a few eps relative.
        np.testing.assert_allclose(ol.layer_multipliers(alpha, n), want, rtol=1e-6)


# ----------------------------------------------------------------------------- gradient norm


def _authors_gradient_norms(params, x, y, batch_size=128):
    """``trainingMemories.layerwise_gradientnorm``: per batch (the last one smaller), the norm
    of the gradient of the *sum* of per-sample losses (Keras differentiates the loss vector),
    then the mean over batches; kernels only."""
    norms = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        g = flat(mlp_grad_np(params, xb, yb))  # gradient of the batch *mean*
        norms.append({k: len(xb) * np.linalg.norm(v) for k, v in g.items() if "kernel" in k})
    return {k: np.mean([n[k] for n in norms]) for k in norms[0]}


def _per_sample_loss(p, batch):
    x, y = batch
    h = x
    for i in range(len(p)):
        h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
        h = jnp.tanh(h) if i < len(p) - 1 else h
    return 0.5 * jnp.sum((h - y) ** 2, axis=1)


def test_gradient_norm_estimator_is_the_authors():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, SIZES[0])).astype(np.float32)  # 2 batches of 128 + 44
    y = rng.standard_normal((300, SIZES[-1])).astype(np.float32)
    params = _f32(P0)
    got = rotation.mean_batch_gradient_norms(_per_sample_loss, params, (x, y))
    want = _authors_gradient_norms(_np(params), x.astype(np.float64), y.astype(np.float64))
    assert set(got) == set(want)
    # A float32 gradient entry sums ≤ 128 per-sample terms: ≤ 128·eps·Σ|terms| ≈ 1.5e-5 of
    # Σ|terms|, and Σ|terms| ≤ ~5 |Σ terms| for these norms: 1e-4 relative.
    for k in want:
        np.testing.assert_allclose(float(got[k]), want[k], rtol=1e-4, err_msg=k)
    # reduction="mean" divides each batch's gradient by its size.
    mean = rotation.mean_batch_gradient_norms(_per_sample_loss, params, (x, y), reduction="mean")
    sizes = np.array([128, 128, 44])
    for k in want:
        per_batch = []
        for start, n in zip((0, 128, 256), sizes):
            g = flat(mlp_grad_np(_np(params), x[start:start + n].astype(np.float64),
                                 y[start:start + n].astype(np.float64)))
            per_batch.append(np.linalg.norm(g[k]))
        np.testing.assert_allclose(float(mean[k]), np.mean(per_batch), rtol=1e-4, err_msg=k)


def test_gradient_norm_estimator_keys_one_trace_and_errors():
    traces = []

    def dropout_loss(p, batch, key):
        traces.append(1)  # runs only while tracing
        keep = jax.random.bernoulli(key, 0.5, batch[0].shape)
        return _per_sample_loss(p, (batch[0] * keep, batch[1]))

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((70, SIZES[0])), jnp.float32)
    y = jnp.asarray(rng.standard_normal((70, SIZES[-1])), jnp.float32)
    params, key = _f32(P0), jax.random.key(7)
    got = rotation.mean_batch_gradient_norms(dropout_loss, params, (x, y), batch_size=32, key=key)
    assert len(traces) == 2  # the scanned body and the last, smaller batch
    rotation.mean_batch_gradient_norms(dropout_loss, params, (x, y), batch_size=32, key=key)
    assert len(traces) == 2  # no retrace
    # By hand: one key per batch, split from `key`, batches 32, 32, 6.
    keys = jax.random.split(key, 3)
    grad = jax.jit(jax.grad(lambda p, b, k: jnp.sum(dropout_loss(p, b, k))))
    norms = [
        ol.rotation.layer_norms(grad(params, (x[s:s + 32], y[s:s + 32]), k))
        for s, k in zip((0, 32, 64), keys)
    ]
    for path in got:
        # Same float32 ops in another order (scan vs loop): a few eps.
        np.testing.assert_allclose(got[path], np.mean([n[path] for n in norms]), rtol=1e-5)
    with pytest.raises(ValueError, match=r"batch_size=\.\.\.\)` must be an int >= 1"):
        rotation.mean_batch_gradient_norms(_per_sample_loss, params, (x, y), batch_size=0)
    with pytest.raises(ValueError, match=r"reduction=\.\.\.\)` must be one of"):
        rotation.mean_batch_gradient_norms(_per_sample_loss, params, (x, y), reduction="max")
    with pytest.raises(ValueError, match="leading sample axis"):
        rotation.mean_batch_gradient_norms(_per_sample_loss, params, (x, y[:5]))


# ----------------------------------------------------------------------------- Adam ν (Fig. 11)


def test_second_moment_percentiles_over_every_tensor():
    """``Adam_2nd_moment_memory``: ``np.percentile(v, [10, 50, 90])`` of every Adam ``v``."""
    params = _f32(P0)
    tx = optax.adam(1e-3)
    state = tx.init(params)
    rng = np.random.default_rng(5)
    for _ in range(3):
        g = jax.tree.map(lambda w: jnp.asarray(rng.standard_normal(w.shape), jnp.float32), params)
        _, state = tx.update(g, state, params)
    nu = flat(optax.tree.get(state, "nu"))
    got = rotation.second_moment_percentiles(state, layers_only=False)
    assert set(got) == set(nu) == {f"{n}/{leaf}" for n in NAMES for leaf in ("kernel", "bias")}
    for path, v in nu.items():
        # Linear interpolation between two float32 order statistics: a few eps relative.
        np.testing.assert_allclose(got[path], np.percentile(v, [10, 50, 90]), rtol=1e-6)
    assert set(rotation.second_moment_percentiles(state)) == {f"{n}/kernel" for n in NAMES}


# ----------------------------------------------------------------------------- rotation timing


def test_authors_rotation_curve_timing():
    """``LayerwiseAngleDeviationCurves(batch_frequency > batches per epoch)``: the cosine
    distance after batch 0 of every epoch, plotted at x = 1, 2, … after a prepended 0."""
    steps_per_epoch, epochs = 4, 3
    params = _f32(P0)
    tx = rotation.track_rotation(optax.sgd(0.3))
    state = tx.init(params)
    hist = rotation.RotationHistory(every=lambda step: (step - 1) % steps_per_epoch == 0)
    authors, w0 = [], flat(params)
    update = jax.jit(tx.update)
    for epoch in range(epochs):
        for batch in range(steps_per_epoch):
            g = _f32(mlp_grad_np(_np(params), X[batch::4], Y[batch::4]))
            u, state = update(g, state, params)
            params = optax.apply_updates(params, u)
            step = epoch * steps_per_epoch + batch + 1
            hist.record(step, state)
            if batch == 0:  # on_batch_end, `batch % batch_frequency == 0`: scipy's cosine
                w = flat(params)
                cos = lambda u, v: 1 - u @ v / np.sqrt((u @ u) * (v @ v))
                authors.append([cos(w[k].ravel(), w0[k].ravel())
                                for k in (f"{n}/kernel" for n in NAMES)])
    assert hist.steps.tolist() == [1, 5, 9]
    cd = hist.get("cosine_distance")
    got = np.stack([cd[f"{n}/kernel"] for n in NAMES], axis=1)
    # float32 params, distance from the atan2 angle: |err| ≲ 1e-6 at these distances (<0.1).
    np.testing.assert_allclose(got, np.asarray(authors), rtol=1e-4, atol=1e-6)
