"""``train(on_epoch=...)``: once per epoch per live run, with that run's own parameters and
optimizer state, without switching to one jitted step per call."""

from __future__ import annotations

import numpy as np
import pytest

from optax_layca.app import _train


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 6)) * 2.0
    y = rng.integers(0, 3, 72)
    x = (centers[y] + rng.normal(size=(72, 6))).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])
    return str(path)


def test_on_epoch_sees_each_runs_params_and_state(blobs):
    config = _train.TrainConfig(dataset=blobs, model="deep", epochs=3, batch_size=16)
    task = _train.setup(config)
    runs = (
        _train.Run("ok", "ok", {"lr": 0.1, "weight_decay": 0.0}),
        _train.Run("boom", "boom", {"lr": 1e8, "weight_decay": 0.0}),
    )
    seen = []

    def on_epoch(run, epoch, params, state):
        seen.append((run.key, epoch, params, state))

    out = _train.train(task, [_train.Group("sgd", _train.sgd, runs)], progress=False,
                       on_epoch=on_epoch)
    ok = [s for s in seen if s[0] == "ok"]
    assert [s[1] for s in ok] == [1, 2, 3]
    assert all(int(s[3].rotation_step) == s[1] * task.steps_per_epoch for s in ok)  # its own state
    final = ok[-1][2]
    for path, w in final.items():  # the parameters the run ends with
        for name in w:
            np.testing.assert_array_equal(np.asarray(w[name]), out["ok"].params[path][name])
    boom = [s[1] for s in seen if s[0] == "boom"]
    assert out["boom"].diverged_at is not None and boom == list(range(1, out["boom"].diverged_at))
