"""Embedded datasets (split, standardisation, batching) and reference models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_mnist1d_is_generated_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTAX_LAYCA_CACHE", str(tmp_path))  # generated here, not read
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d must be generated, never downloaded")

    for name in ("get", "post", "request"):
        monkeypatch.setattr(requests, name, no_network)
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
    """The padded last batch with a masked mean (the training loop's loss) has exactly the
    partial batch's gradient."""
    from optax_layca.app._train import TrainConfig, setup

    task = setup(TrainConfig(dataset="digits", model="fc"))
    ds, p = task.data, task.params0
    idx, mask = epoch_batches(len(ds.x_train), 32, seed=0)
    i, m = idx[-1], mask[-1]
    assert not m.all()
    g_pad = jax.grad(task.loss)(p, ds.x_train[i], ds.y_train[i], m)
    real = i[m]
    g_part = jax.grad(task.loss)(p, ds.x_train[real], ds.y_train[real], np.ones(len(real), bool))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_pad, g_part)


def _save(path, x_train, y_train, x_test=None, y_test=None):
    x_test = x_train[:2] if x_test is None else x_test
    y_test = y_train[:2] if y_test is None else y_test
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


X = np.ones((6, 4), np.float32)


@pytest.mark.parametrize(
    "x, y, message",
    [
        (X, np.array([0, 1, -1, 0, 1, 2]), "negative label (-1)"),
        (X, np.array([0, 1, 2, 0, 1, 2**31], np.int64), "label 2147483648, beyond the int32"),
        (X, np.array([0, 1, 2, 0, 1, 2**64 - 1], np.uint64), "label 18446744073709551615"),
        (X, np.array([0, 1, 2, 0, 1, 5000]), "implies 5001 classes for 8 examples"),
        (X, np.array([0, 1, 2, 0, 1, 2.0]), "integer class labels; got dtype float64"),
        (X, np.array([0, 1, 2, 0, 1, 1], bool), "integer class labels; got dtype bool"),
        (X, np.zeros(5, int), "y_train must have shape (6,)"),
        (X.astype(np.complex64), np.zeros(6, int), "complex (complex64)"),
        (np.ones((6, 0)), np.zeros(6, int), "empty feature axis"),
        (np.ones(6), np.zeros(6, int), "shape (N, ...) with N > 0"),
        (np.array([["a"]] * 6), np.zeros(6, int), "must hold real numbers"),
    ],
)
def test_npz_is_refused_never_wrapped(tmp_path, x, y, message):
    with pytest.raises(DataError) as err:
        load_dataset(_save(tmp_path / "d.npz", x, y))
    assert message in str(err.value)
    assert str(tmp_path / "d.npz") in str(err.value)  # names the file


def test_non_finite_features_name_the_feature(tmp_path):
    x = np.zeros((6, 3, 2), np.float32)
    x[4, 2, 1] = np.nan
    x[5, 2, 1] = np.nan
    with pytest.raises(DataError, match=r"x_train has NaN values in feature \(2, 1\) "
                                        r"\(2 sample\(s\), first sample 4\)"):
        load_dataset(_save(tmp_path / "d.npz", x, np.zeros(6, int)))
    x = np.zeros((6, 5), np.float32)
    x[1, 3] = -np.inf
    x[2, 0] = np.inf
    with pytest.raises(DataError, match=r"x_test has infinite values in feature 0 .* and 1 more"):
        load_dataset(_save(tmp_path / "d.npz", np.zeros((6, 5)), np.zeros(6, int), x, np.zeros(6, int)))
    with pytest.raises(DataError, match="beyond float32's range in feature 1"):
        big = np.zeros((6, 2))
        big[:, 1] = [1e300, -1e300, 0, 0, 0, 0]
        load_dataset(_save(tmp_path / "d.npz", big, np.zeros(6, int)), standardized=False)


def test_other_npz_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="differ in shape"):
        load_dataset(_save(tmp_path / "d.npz", X, np.zeros(6, int), np.ones((2, 3)), np.zeros(2, int)))
    with pytest.raises(DataError, match="seed=...\\)` must be an int in \\[0, 2\\*\\*32\\)"):
        load_dataset("digits", seed=2**32)


@settings(max_examples=10, deadline=None)
@given(
    dtype=st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                           np.uint32, np.uint64]),
    labels=st.lists(st.integers(0, 127), min_size=4, max_size=12),
)
def test_valid_labels_survive_exactly(tmp_path_factory, dtype, labels):
    """Any integer dtype: labels within range come back unchanged (no wrap, no truncation),
    as int32, with num_classes = max + 1."""
    y = np.asarray(labels, dtype)
    x = np.arange(len(y) * 2, dtype=np.float64).reshape(len(y), 2)
    path = _save(tmp_path_factory.mktemp("h") / "d.npz", x, y, x, y)
    ds = load_dataset(path)
    assert ds.y_train.dtype == np.int32 and ds.y_train.tolist() == [int(v) for v in labels]
    assert ds.num_classes == max(labels) + 1


def test_fingerprint_identifies_the_data(tmp_path):
    y = np.array([0, 1, 2, 0, 1, 2])
    a = load_dataset(_save(tmp_path / "a.npz", X, y))
    b = load_dataset(_save(tmp_path / "b.npz", X, y))
    c = load_dataset(_save(tmp_path / "c.npz", X, y[::-1].copy()))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_mnist1d_cache_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTAX_LAYCA_CACHE", str(tmp_path))
    fresh = load_dataset("mnist1d", seed=3)
    (cached,) = (tmp_path / "mnist1d").iterdir()
    again = load_dataset("mnist1d", seed=3)
    assert again.fingerprint() == fresh.fingerprint()
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated: regenerated, same data
    assert load_dataset("mnist1d", seed=3).fingerprint() == fresh.fingerprint()
    assert load_dataset("mnist1d", seed=4).fingerprint() != fresh.fingerprint()


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
    "deep": [f"Dense_{i}/kernel" for i in range(6)],
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


def test_init_params_refuses_seeds_jax_would_wrap():
    with pytest.raises(ValueError, match=r"seed=...\)` must be an int in \[0, 2\*\*32\)"):
        init_params(get_model("fc"), (4,), seed=2**32)  # jax.random.key(2**32) == key(0)


def test_cli_knows_every_model():
    from optax_layca.app import cli

    assert set(cli.MODEL_NAMES) == set(MODELS)


def test_deep_model_has_six_layers_in_forward_order():
    model = get_model("deep")
    p = init_params(model, (40, 1))
    order = forward_order(apply_fn(model), p, jnp.zeros((1, 40, 1)))
    assert order == tuple(f"Dense_{i}/kernel" for i in range(6))
