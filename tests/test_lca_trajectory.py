"""Trajectory recording: crash-safe chunked storage, resume without loss or recomputation."""

import json

import numpy as np
import pytest
from test_lca_mlp import make_problem, sgd_trajectory

from optax_layca import lca


class Crashy:
    """A lazy trajectory that raises once when index ``crash_at`` is first read."""

    def __init__(self, traj, crash_at):
        self.traj, self.crash_at = traj, crash_at

    def __len__(self):
        return len(self.traj)

    def __getitem__(self, i):
        if i == self.crash_at:
            self.crash_at = None
            raise RuntimeError("simulated crash")
        return self.traj[i]


@pytest.fixture(scope="module")
def problem():
    x, y, params, loss_fn = make_problem(n=80, seed=1)
    return x, y, sgd_trajectory(params, loss_fn, x, y, steps=7), loss_fn


def _same(h1, h2):
    assert h1.layer_names == h2.layer_names
    np.testing.assert_array_equal(h1.iterations, h2.iterations)
    for k in (
        "per_layer",
        "total",
        "loss_change",
        "error",
        "num_splits",
        "converged",
        "per_class",
        "class_loss_change",
    ):
        np.testing.assert_array_equal(getattr(h1, k), getattr(h2, k), err_msg=k)
    assert h1.per_param.keys() == h2.per_param.keys()
    for k in h1.per_param:
        np.testing.assert_array_equal(h1.per_param[k], h2.per_param[k])


def test_resume_after_crash_equals_uninterrupted(problem, tmp_path):
    x, y, traj, loss_fn = problem
    kw = {
        "labels": y,
        "chunk_size": 3,
        "store_per_param": True,
        "progress": False,
        "class_strategy": "reverse",
    }  # direction-free: the end point is fully reused
    full = lca.allocate_trajectory(loss_fn, traj, (x, y), directory=tmp_path / "a", **kw)
    assert len(full) == 7 and full.iterations.tolist() == list(range(7))
    crashy = Crashy(traj, crash_at=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        lca.allocate_trajectory(loss_fn, crashy, (x, y), directory=tmp_path / "b", **kw)
    assert lca.load_trajectory(tmp_path / "b").iterations.tolist() == [0, 1, 2, 3]
    ev = lca.Evaluator(loss_fn, (x, y), labels=y)
    kw.pop("labels")
    resumed = lca.allocate_trajectory(None, crashy, ev, directory=tmp_path / "b", **kw)
    _same(full, resumed)
    _same(full, lca.load_trajectory(tmp_path / "b"))
    # only iterations 4, 5, 6 were computed: start point + 2 passes each (no halving here)
    assert (full.num_splits == 1).all()
    assert ev.num_evaluations == 1 + 2 * 3
    # resuming a finished run computes nothing
    ev2 = lca.Evaluator(loss_fn, (x, y), labels=y)
    _same(full, lca.allocate_trajectory(None, traj, ev2, directory=tmp_path / "b", **kw))
    assert ev2.num_evaluations == 0


def test_recovers_from_crash_during_chunk_merge(problem, tmp_path):
    x, y, traj, loss_fn = problem
    d = tmp_path / "run"
    rec = lca.LCARecorder(loss_fn, (x, y), directory=d, chunk_size=100)
    rec.start(traj[0])
    for p in traj[1:5]:
        rec(p)
    ref = rec.history()
    pending = sorted((d / "pending").glob("*.npz"))
    assert len(pending) == 4
    # crash after the chunk was written but before the pending files were deleted,
    # with a half-written temp file lying around
    keep = [p.read_bytes() for p in pending]
    rec.flush()
    for p, b in zip(pending, keep):
        p.write_bytes(b)
    (d / "chunk_00000004_00000009.npz.tmp").write_bytes(b"garbage")
    h = lca.load_trajectory(d)
    assert h.iterations.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(h.total, ref.total)
    assert not list((d / "pending").glob("*.npz")) and not list(d.glob("*.tmp"))
    # the online recorder resumes from a checkpoint at or before the first missing iteration
    rec2 = lca.LCARecorder(loss_fn, (x, y), directory=d, chunk_size=100)
    assert rec2.num_recorded == 4
    with pytest.raises(ValueError, match="would skip iterations 4"):
        rec2.start(traj[6], iteration=6)
    rec2.start(traj[2], iteration=2)
    assert rec2(traj[3]) is None and rec2(traj[4]) is None  # already stored: replayed
    assert rec2(traj[5]) is not None
    assert rec2.history().iterations.tolist() == [0, 1, 2, 3, 4]


def test_settings_mismatch_raises(problem, tmp_path):
    x, y, traj, loss_fn = problem
    lca.allocate_trajectory(loss_fn, traj[:3], (x, y), directory=tmp_path, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["method"] == "rk4"
    with pytest.raises(ValueError, match="different settings"):
        lca.allocate_trajectory(
            loss_fn, traj[:3], (x, y), directory=tmp_path, progress=False, method="first_order"
        )
    with pytest.raises(ValueError, match="no LCA run"):
        lca.load_trajectory(tmp_path / "nothing")
