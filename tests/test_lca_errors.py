"""Bad input to LCA raises clear errors naming the argument or the problem."""

import jax.numpy as jnp
import numpy as np
import pytest

from optax_layca import lca

X = np.linspace(-1, 1, 12, dtype=np.float32)[:, None]
P0 = {"w": jnp.zeros(1), "b": jnp.zeros(())}
P1 = {"w": jnp.ones(1), "b": jnp.ones(())}


def loss(p, b):
    return (b @ p["w"] + p["b"] - 1.0) ** 2


def test_empty_dataset():
    with pytest.raises(ValueError, match="`data` is empty"):
        lca.allocate(loss, P0, P1, X[:0])
    with pytest.raises(ValueError, match="`data` is empty"):
        lca.allocate(loss, P0, P1, [])
    with pytest.raises(ValueError, match="`data` is empty"):
        lca.allocate(loss, P0, P1, ())


def test_mismatched_params():
    with pytest.raises(ValueError, match="`params_after` and `params_before` must have the same"):
        lca.allocate(loss, P0, {"w": jnp.ones(1)}, X)
    with pytest.raises(ValueError, match="Leaf 'w' has shape"):
        lca.allocate(loss, P0, {"w": jnp.ones(2), "b": jnp.ones(())}, X)
    with pytest.raises(TypeError, match="floating-point"):
        lca.allocate(loss, {"w": jnp.zeros(1, int)}, {"w": jnp.ones(1, int)}, X)


def test_scalar_wrong_shape_or_integer_loss():
    with pytest.raises(ValueError, match=r"per-example losses of shape \[B\].*got shape \(\)"):
        lca.allocate(lambda p, b: jnp.mean(loss(p, b)), P0, P1, X)
    with pytest.raises(ValueError, match=r"got shape \(12, 1\)"):
        lca.allocate(lambda p, b: loss(p, b)[:, None], P0, P1, X)
    with pytest.raises(TypeError, match="floating-point losses.*got dtype int32"):
        lca.allocate(lambda p, b: jnp.round(loss(p, b)).astype(jnp.int32), P0, P1, X)
    with pytest.raises(TypeError, match="floating-point losses.*got dtype bool"):
        lca.evaluate(lambda p, b: loss(p, b) > 0.5, P0, X)


@pytest.mark.parametrize("tol", [0, -1e-3, float("nan"), float("inf"), True])
def test_bad_tol(tol):
    with pytest.raises(ValueError, match=r"`LCAOptions\(tol=...\)` must be a finite number > 0"):
        lca.allocate(loss, P0, P1, X, tol=tol)


def test_bad_options():
    with pytest.raises(ValueError, match=r"`LCAOptions\(method=...\)` must be one of"):
        lca.allocate(loss, P0, P1, X, method="euler")
    with pytest.raises(ValueError, match=r"max_splits=...\)` must be an int >= 2"):
        lca.allocate(loss, P0, P1, X, max_splits=1)  # RK4 is already 2 sub-intervals
    with pytest.raises(ValueError, match=r"engines=...\)` must be a non-empty subset"):
        lca.allocate(loss, P0, P1, X, engines=("hessian",))
    with pytest.raises(ValueError, match=r"class_strategy=...\)` must be one of"):
        lca.allocate(loss, P0, P1, X, labels=np.zeros(12, int), class_strategy="x")
    with pytest.raises(ValueError, match=r"batch_size=...\)` must be an int >= 1"):
        lca.allocate(loss, P0, P1, X, batch_size=0)
    with pytest.raises(ValueError, match=r"bn_mode=...\)` must be one of"):
        lca.allocate(loss, P0, P1, X, bn_mode="train")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['tolerance'\]"):
        lca.allocate(loss, P0, P1, X, tolerance=1e-3)
    with pytest.raises(TypeError, match="must be an LCAOptions"):
        lca.allocate(loss, P0, P1, X, options={"tol": 1e-3})
    with pytest.raises(TypeError, match="`Evaluator` takes the options"):
        lca.Evaluator(loss, X, tol=1e-3)
    assert lca.LCAOptions(method="first_order", max_splits=1).max_splits == 1
    with pytest.raises(ValueError, match="needs `num_classes=`"):
        lca.allocate(loss, P0, P1, X, class_fn=lambda b: b[:, 0])
    with pytest.raises(ValueError, match="`labels` must be a 1-d integer array"):
        lca.allocate(loss, P0, P1, X, labels=np.zeros(12))
    with pytest.raises(ValueError, match="outside"):
        lca.allocate(loss, P0, P1, X, class_fn=lambda b: jnp.full(b.shape[0], 5), num_classes=2)


def test_nan_loss_and_nan_data():
    with pytest.raises(ValueError, match="`loss_fn` returned NaN or inf"):
        lca.allocate(lambda p, b: jnp.log(loss(p, b) - 10.0), P0, P1, X)
    bad = X.copy()
    bad[5, 0] = np.nan
    with pytest.raises(ValueError, match="`data` contains NaN or inf"):
        lca.allocate(loss, P0, P1, bad)
    with pytest.raises(ValueError, match=r"`data` \(batch 1\) contains NaN or inf"):
        lca.allocate(loss, P0, P1, [X[6:], bad[:6]])


def test_bad_data_containers():
    with pytest.raises(ValueError, match="disagree on the example axis"):
        lca.allocate(loss, P0, P1, (X, X[:5]))
    with pytest.raises(TypeError, match="one-shot iterator"):
        lca.allocate(loss, P0, P1, iter([X[:6], X[6:]]))
    with pytest.raises(ValueError, match="more than `batch_size`"):
        lca.allocate(loss, P0, P1, [X[:4], X[4:]])
    with pytest.raises(ValueError, match="set `labels`/`batch_size`"):
        lca.allocate(loss, P0, P1, lca.Evaluator(loss, X), batch_size=4)
    with pytest.raises(ValueError, match="Evaluator of another `loss_fn`"):
        lca.allocate(lambda p, b: loss(p, b), P0, P1, lca.Evaluator(loss, X))
    with pytest.raises(ValueError, match="`test_labels=` needs `test_data=`"):
        lca.allocate(loss, P0, P1, X, test_labels=np.zeros(12, int))


def test_recorder_misuse():
    rec = lca.LCARecorder(loss, X)
    with pytest.raises(ValueError, match="start"):
        rec(P1)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        lca.LCARecorder(loss, X, chunk_size=0)
    with pytest.raises(ValueError, match="at least 2 param snapshots"):
        lca.allocate_trajectory(loss, [P0], X)


def test_analysis_needs_per_param():
    r = lca.allocate(loss, P0, P1, X, engines="jvp")
    with pytest.raises(ValueError, match="'grad' engine"):
        lca.helping_fraction([r])
    with pytest.raises(TypeError, match="Expected an LCAHistory"):
        lca.cumulative_per_layer(3)
