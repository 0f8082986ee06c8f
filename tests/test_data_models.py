"""Embedded datasets (split, standardisation, batching) and reference models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_layca import forward_order, natural_order
from optax_layca.data import (
    DataError,
    epoch_batches,
    iterate_batches,
    load_dataset,
    split,
    standardize,
)
from optax_layca.models import MODELS, apply_fn, get_model, init_params

# ----------------------------------------------------------------------------- data


def test_digits_split_is_deterministic_stratified_and_disjoint():
    a = load_dataset("digits", seed=0, standardized=False)
    b = load_dataset("digits", seed=0, standardized=False)
    c = load_dataset("digits", seed=1, standardized=False)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_test, c.x_test)  # another seed, another split
    assert len(a.x_train) + len(a.x_test) == 1797
    assert a.x_train.shape[1:] == (8, 8, 1) and a.num_classes == 10
    # stratified: every class is ~25% held out
    for k in range(10):
        n_te, n_tr = np.sum(a.y_test == k), np.sum(a.y_train == k)
        assert abs(n_te / (n_te + n_tr) - 0.25) < 0.02
    # disjoint: no test image appears in the training set
    train_rows = {row.tobytes() for row in a.x_train.reshape(len(a.x_train), -1)}
    dup = sum(row.tobytes() in train_rows for row in a.x_test.reshape(len(a.x_test), -1))
    assert dup <= 2  # the raw digits contain a couple of exact duplicates, nothing more


def test_split_keeps_every_sample_once():
    x = np.arange(103.0)[:, None]
    y = np.arange(103) % 4
    xtr, ytr, xte, yte = split(x, y, 0.3, seed=5)
    assert sorted(np.concatenate([xtr, xte])[:, 0].tolist()) == x[:, 0].tolist()
    np.testing.assert_array_equal(
        np.concatenate([ytr, yte]) % 4, np.concatenate([xtr, xte])[:, 0].astype(int) % 4
    )
    with pytest.raises(DataError, match="test_fraction"):
        split(x, y, 1.5)


def test_standardisation_uses_training_statistics_only():
    ds = load_dataset("digits")
    flat = ds.x_train.reshape(len(ds.x_train), -1)
    std = flat.std(0)
    np.testing.assert_allclose(flat.mean(0), 0, atol=1e-5)
    live = std > 0  # always-blank pixels stay 0 (std 1 by convention, no division by 0)
    np.testing.assert_allclose(std[live], 1, atol=1e-4)
    assert np.isfinite(ds.x_test).all()
    assert abs(float(ds.x_test.mean())) > 1e-6  # test set uses the *training* statistics
    _, te = standardize(np.array([[0.0], [2.0]]), np.array([[4.0]]))
    assert te.tolist() == [[3.0]]


def test_mnist1d_is_generated_offline():
    ds = load_dataset("mnist1d")
    assert ds.x_train.shape == (4000, 40, 1) and ds.x_test.shape == (1000, 40, 1)
    assert ds.num_classes == 10 and ds.y_train.dtype == np.int32


@pytest.mark.parametrize("n, bs", [(10, 3), (10, 5), (7, 20), (1347, 32)])
def test_batching_never_drops_a_sample(n, bs):
    idx, mask = epoch_batches(n, bs, seed=3, epoch=1)
    assert idx.shape == (-(-n // min(bs, n)), min(bs, n))
    assert sorted(idx[mask].tolist()) == list(range(n))  # every sample exactly once
    assert mask.sum() == n and mask[:-1].all()  # only the last batch may be padded
    assert mask[-1].all() == (n % min(bs, n) == 0)
    again, _ = epoch_batches(n, bs, seed=3, epoch=1)
    other, _ = epoch_batches(n, bs, seed=3, epoch=2)
    np.testing.assert_array_equal(idx, again)  # seeded
    if n > 3:
        assert not np.array_equal(idx, other)  # reshuffled each epoch
    x = np.arange(n)
    got = np.concatenate([b for b, _ in iterate_batches(x, x, bs, seed=3, epoch=1)])
    np.testing.assert_array_equal(got, idx[mask])


def test_masked_padding_gives_the_partial_batch_gradient():
    """The padded last batch with a masked mean has exactly the partial batch's gradient."""
    from optax_layca.app.cli import _loss_fn

    model = get_model("fc", num_classes=10)
    ds = load_dataset("digits")
    p = init_params(model, ds.input_shape)
    apply = apply_fn(model)
    idx, mask = epoch_batches(len(ds.x_train), 32, seed=0)
    i, m = idx[-1], mask[-1]
    assert not m.all()
    g_pad = jax.grad(_loss_fn, 1)(apply, p, ds.x_train[i], ds.y_train[i], m)
    real = i[m]
    g_part = jax.grad(_loss_fn, 1)(
        apply, p, ds.x_train[real], ds.y_train[real], np.ones(len(real), bool)
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_pad, g_part)


def test_npz_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")
    p = tmp_path / "d.npz"
    np.savez(
        p,
        x_train=np.ones((3, 2)),
        y_train=np.array([0, 1, -1]),
        x_test=np.ones((1, 2)),
        y_test=np.array([0]),
    )
    with pytest.raises(DataError, match="non-negative integer"):
        load_dataset(str(p))
    np.savez(
        p,
        x_train=np.ones((3, 2)),
        y_train=np.array([0, 1, 2]),
        x_test=np.ones((1, 3)),
        y_test=np.array([0]),
    )
    with pytest.raises(DataError, match="differ in shape"):
        load_dataset(str(p))


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(8, 8, 1), (40, 1)])
def test_model_output_shapes(name, shape):
    model = get_model(name, num_classes=7)
    params = init_params(model, shape, seed=0)
    out = apply_fn(model)(params, jnp.ones((3, *shape)))
    assert out.shape == (3, 7) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


EXPECTED_ORDER = {
    "fc": ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"],
    "mlp": ["Dense_0/kernel", "Dense_1/kernel"],
    "cnn": ["Conv_0/kernel", "Conv_1/kernel", "Conv_2/kernel", "Conv_3/kernel", "Dense_0/kernel"],
    "resnet": [
        "stem/kernel",
        "ResBlock_0/conv1/kernel",
        "ResBlock_0/conv2/kernel",
        "ResBlock_1/conv1/kernel",
        "ResBlock_1/conv2/kernel",
        "ResBlock_1/shortcut/kernel",
        "head/kernel",
    ],
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_order_is_input_to_output(name):
    model = get_model(name)
    params = init_params(model, (8, 8, 1))
    order = forward_order(apply_fn(model), params, jnp.zeros((1, 8, 8, 1)))
    assert list(order) == EXPECTED_ORDER[name]
    # the first layer reads the input's features, the last one produces the 10 logits
    flat = {
        "/".join(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert flat[order[0]].shape[-2] in (64, 1)
    assert flat[order[-1]].shape[-1] == 10
    if name != "resnet":  # automatic names sort naturally in forward order
        assert tuple(order) == natural_order(order)


def test_resnet_has_shortcut_convolutions():
    params = init_params(get_model("resnet"), (8, 8, 1))
    sc = params["ResBlock_1"]["shortcut"]["kernel"]
    assert sc.shape == (1, 1, 16, 32)
    assert "shortcut" not in params["ResBlock_0"]  # same shape: identity shortcut
