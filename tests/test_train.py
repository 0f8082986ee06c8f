"""The app's one training loop (``optax_layca.app._train``): vmapped groups, records,
accuracies and divergence, checked against independent numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from optax_layca.app import _train

SPE = 6  # 96 training examples, batch 16


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """Three Gaussian blobs in 6-d: 96 train / 48 test examples."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 6)) * 2.0
    y = rng.integers(0, 3, 144)
    x = (centers[y] + rng.normal(size=(144, 6))).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, x_train=x[:96], y_train=y[:96], x_test=x[96:], y_test=y[96:])
    return str(path)


def _config(path, **kw):
    kw = {
        "dataset": path,
        "model": "deep",
        "epochs": 3,
        "batch_size": 16,
        "records_per_epoch": 3,
        **kw,
    }
    return _train.TrainConfig(**kw)


TRACES: list[str] = []


def _counted(builder):
    def build(task, hp):
        TRACES.append(builder.__name__)  # runs only while jax traces the group's programs
        return builder(task, hp)

    build.__name__ = builder.__name__
    return build


@pytest.fixture(scope="module")
def trained(blobs):
    run = _train.Run
    hp2 = {"rho": 3.0**-2, "alpha": 0.5}
    groups = [
        _train.Group(
            "pair",
            _counted(_train.layca_sgd),
            (run("a", "A", {"rho": 3.0**-3, "alpha": 0.0}), run("b", "B", hp2)),
        ),
        _train.Group("alone", _train.layca_sgd, (run("b_alone", "B alone", hp2),)),
        _train.Group(
            "sgd",
            _train.sgd,
            (
                run("ok", "ok", {"lr": 0.1, "weight_decay": 0.0}),
                run("boom", "boom", {"lr": 1e8, "weight_decay": 0.0}),
            ),
        ),
    ]
    TRACES.clear()
    task = _train.setup(_config(blobs))
    return task, _train.train(task, groups, progress=False)


def test_a_vmapped_run_is_the_run_alone(trained):
    task, res = trained
    a, b = res["b"], res["b_alone"]
    # Same program up to batching: XLA may sum float32 dot products in another order, each
    # differing by <= n·eps·Σ|x·y| (n <= 64 terms, eps = 2**-23, ~1e-5 relative); 18 Layca
    # steps on the sphere carry that over without growth beyond ~1e-4.
    for p in task.order:
        np.testing.assert_allclose(
            b.params[p.split("/")[0]]["kernel"],
            a.params[p.split("/")[0]]["kernel"],
            rtol=1e-4,
            atol=1e-5,
        )
    np.testing.assert_allclose(
        a.history.get("cosine_distance")[task.order[0]],
        b.history.get("cosine_distance")[task.order[0]],
        atol=1e-5,
    )


def test_one_trace_per_group_program(trained):
    # init and the epoch scan are traced once each for all 3 epochs and both runs
    assert TRACES == ["layca_sgd", "layca_sgd"]


def test_records_follow_the_schedule(trained):
    task, res = trained
    h = res["a"].history
    every = SPE // 3
    expected = sorted(set(range(0, 3 * SPE + 1, every)) | {SPE, 2 * SPE, 3 * SPE})
    assert h.steps.tolist() == expected
    epochs = h.epochs
    assert np.isnan(epochs[0]) and epochs[h.steps.tolist().index(SPE)] == 1
    ids, rot = h.per_epoch_rotation()
    assert ids.tolist() == [1, 2, 3] and all(len(v) == 3 for v in rot.values())


def _cosine_distance(w, w0) -> float:
    w, w0 = np.ravel(w).astype(np.float64), np.ravel(w0).astype(np.float64)
    return 1.0 - w @ w0 / (np.linalg.norm(w) * np.linalg.norm(w0))


def test_final_records_match_a_numpy_reference(trained):
    task, res = trained
    for key in ("a", "ok"):
        r = res[key]
        cd = r.history.get("cosine_distance")
        for path in task.order:
            name = path.split("/")[0]
            ref = _cosine_distance(r.params[name]["kernel"], task.params0[name]["kernel"])
            # float32 monitor vs float64 numpy: cos from dot products of <= 4096 terms,
            # |err| <= n·eps ≈ 5e-4 relative on the dots, far less in practice (atol 1e-4)
            np.testing.assert_allclose(cd[path][-1], ref, atol=1e-4, err_msg=f"{key} {path}")


def test_accuracies_match_a_numpy_reference(trained):
    task, res = trained
    r = res["a"]
    logits = np.asarray(task.apply(r.params, task.data.x_test))
    acc = float(np.mean(logits.argmax(-1) == task.data.y_test))
    assert r.eval_epochs.tolist() == [0, 1, 2, 3]
    assert r.test_acc[-1] == pytest.approx(acc, abs=1e-12)  # counts of 0/1 errors: exact
    assert np.isnan(r.val_acc).all()  # no validation split


def test_divergence_is_isolated(trained):
    task, res = trained
    boom, ok = res["boom"], res["ok"]
    assert boom.diverged_at == 1 and ok.diverged_at is None
    assert np.isnan(boom.epoch_loss).all() and np.isfinite(ok.epoch_loss).all()
    assert np.isnan(boom.test_acc[1:]).all() and np.isfinite(ok.test_acc).all()
    assert boom.history.steps.tolist() == [0]  # records stop at the divergence
    assert ok.history.steps[-1] == 3 * SPE


def test_per_step_callback_and_max_steps(blobs):
    task = _train.setup(_config(blobs, epochs=2))
    seen = []
    group = _train.Group(
        "sgd", _train.sgd, (_train.Run("s", "s", {"lr": 0.1, "weight_decay": 0.0}),)
    )
    res = _train.train(
        task,
        [group],
        progress=False,
        max_steps=8,
        on_step=lambda run, step, params: seen.append((run.key, step)),
    )
    assert seen == [("s", t) for t in range(1, 9)]
    h = res["s"].history
    assert h.steps[-1] == 8 and h.epochs[-1] == 2  # the cut epoch is closed at step 8
    assert np.isfinite(res["s"].epoch_loss[0]) and np.isnan(res["s"].epoch_loss[1])


def test_validation_split_is_held_out(blobs):
    task = _train.setup(_config(blobs, validation=0.25))
    assert len(task.x_val) == 24 and len(task.data.x_train) == 72
    full = _train.setup(_config(blobs)).data.x_train
    both = np.concatenate([task.data.x_train, task.x_val])
    assert sorted(map(bytes, both)) == sorted(map(bytes, full))  # a partition of the set


def test_too_many_steps_refused_before_training(blobs):
    task = _train.setup(_config(blobs, epochs=2**31 // SPE + 1))
    group = _train.Group(
        "sgd", _train.sgd, (_train.Run("s", "s", {"lr": 0.1, "weight_decay": 0.0}),)
    )
    with pytest.raises(ValueError, match="int32 step counter"):
        _train.train(task, [group], progress=False)


def test_history_takes_state_and_dict_records_in_any_order():
    """Regression: a dict passed through jax.tree comes back with sorted keys; records from
    an optimizer state and from such a dict mix in one history."""
    import jax
    import jax.numpy as jnp
    import optax

    from optax_layca.rotation import FIGURES, RotationHistory, track_rotation

    params = {"Dense_0": {"kernel": jnp.ones((3, 2))}, "Dense_1": {"kernel": jnp.ones((2, 2))}}
    tx = track_rotation(optax.sgd(0.1))
    state = tx.init(params)
    hist = RotationHistory()
    hist.record(0, state)
    figs = jax.tree.map(lambda x: x, {n: getattr(state, n) for n in FIGURES})  # sorted keys
    assert tuple(figs) != FIGURES
    hist.record(1, figs)
    assert hist.steps.tolist() == [0, 1] and hist.names == FIGURES
