"""``optax-layca reproduce one-layer-at-a-time --quick`` (Carbonnelle & De Vleeschouwer, 2019,
Fig. 1 and App. A.1, Fig. 7), and the feedback it measures against a numpy backprop."""

from __future__ import annotations

import numpy as np
import pytest
from _reproduce_utils import check_files_and_section, panel_titles, quick_fixture

from optax_layca.app import _train
from optax_layca.app._experiments import _one_layer

NAME = "one-layer-at-a-time"


record = quick_fixture(NAME)


def test_files_json_and_report_section(record):
    out, rec = record
    check_files_and_section(out, NAME, rec, may_be_null=("val_acc",))  # no validation split
    layers = len(rec["mean_test_acc"])
    assert layers == len(rec["identity"]["layers"]) - 1  # every layer but the head
    assert np.shape(rec["test_acc"]) == (1, layers) and rec["silhouette_epochs"][0] == 0
    assert all(-1 <= s <= 1 for s in rec["mean_silhouette"])


def test_figure_has_the_papers_panels(record):
    import matplotlib.pyplot as plt

    _, rec = record
    fig = _one_layer.figure(rec)
    titles = panel_titles(fig)
    assert any(t.startswith("Fig. 1: test accuracy") for t in titles)
    assert any(t.startswith("Fig. 7") for t in titles) and "training accuracy" in titles
    acc_ax = fig.axes[0]
    np.testing.assert_allclose(acc_ax.lines[0].get_ydata(), rec["mean_test_acc"], rtol=1e-6)
    plt.close(fig)


def test_only_the_trained_layer_moves(record):
    """The freeze is exact: every other layer (the head included) ends where it started."""
    _, rec = record
    for key, run in rec["repeats"][0]["runs"].items():
        if run["diverged_at"] is not None:
            continue
        k = int(run["hparams"]["layer"])
        moved = {p: d for p, d in run["final_cosine_distance"].items() if d != 0.0}
        assert list(moved) == [f"Dense_{k}/kernel"], key


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    return _train.setup(_train.TrainConfig(dataset=str(path), model="deep", epochs=1))


def _feedback_np(params, x, y):
    """∂ℓ/∂h₀ per example by hand-written backprop of the deep ReLU MLP (float64)."""
    n = len(params)
    w = [np.asarray(params[f"Dense_{i}"]["kernel"], np.float64) for i in range(n)]
    b = [np.asarray(params[f"Dense_{i}"]["bias"], np.float64) for i in range(n)]
    zs, h = [], np.asarray(x, np.float64).reshape(len(x), -1)
    for i in range(n):
        zs.append(h @ w[i] + b[i])
        h = np.maximum(zs[-1], 0.0) if i < n - 1 else zs[-1]
    p = np.exp(h - h.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = p - np.eye(h.shape[1])[y]  # ∂ℓ_i/∂logits_i, each example's own loss
    for i in range(n - 1, 0, -1):
        g = g @ w[i].T  # ∂ℓ/∂h_{i-1}
        if i > 1:
            g = g * (zs[i - 1] > 0)
    return g


def test_first_layer_feedback_matches_backprop(task):
    params = task.params0
    fn = _one_layer.first_layer_feedback(task)
    x, y = task.data.x_test, task.data.y_test
    got = np.asarray(fn(params, x, y), np.float64)
    want = _feedback_np(params, x, y)
    assert got.shape == (len(x), 64)
    # five float32 matmuls of <= 64-term sums and a softmax: |err| <= ~6·64·eps·Σ|terms|
    # (eps = 2**-24), about 2e-5 of the vector's norm when terms do not cancel; 1e-4 leaves 5x
    err = np.linalg.norm(got - want, axis=1)
    assert np.all(err <= 1e-4 * np.linalg.norm(want, axis=1) + 1e-12)


def test_first_layer_feedback_refuses_other_layouts(task):
    import dataclasses

    odd = dataclasses.replace(task, params0={"w": task.params0["Dense_0"]["kernel"]})
    with pytest.raises(ValueError, match="dense layers"):
        _one_layer.first_layer_feedback(odd)
