"""Trajectory recording: crash-safe chunked storage, resume without loss or recomputation, run
identity (manifest, hash chain, loss check), one writer at a time, read-only verified reads."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import warnings
from pathlib import Path

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


def linreg(n=64, d=4, steps=10, seed=0):
    """A tiny least-squares problem and its gradient-descent trajectory (fast to allocate)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=d) + 0.1 * rng.normal(size=n)).astype(np.float32)
    ws = [{"w": np.zeros(d, np.float32), "b": np.zeros((), np.float32)}]
    for _ in range(steps):
        w, b = ws[-1]["w"], ws[-1]["b"]
        r = x @ w + b - y
        ws.append(
            {"w": (w - 0.1 * x.T @ r / n).astype(np.float32), "b": np.float32(b - 0.1 * r.mean())}
        )
    return x, y, ws


def linreg_loss(p, batch):
    x, y = batch
    return 0.5 * (x @ p["w"] + p["b"] - y) ** 2


@pytest.fixture(scope="module")
def problem():
    x, y, params, loss_fn = make_problem(n=80, seed=1)
    return x, y, sgd_trajectory(params, loss_fn, x, y, steps=7), loss_fn


def _same(h1, h2):
    assert h1.leaf_names == h2.leaf_names
    np.testing.assert_array_equal(h1.iterations, h2.iterations)
    for k in (
        "per_leaf",
        "total",
        "loss_change",
        "error",
        "noise_floor",
        "num_splits",
        "converged",
        "per_class_leaf",
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
    assert not (tmp_path / "b" / "LOCK").exists()  # released on the way out
    assert lca.load_trajectory(tmp_path / "b").iterations.tolist() == [0, 1, 2, 3]
    ev = lca.Evaluator(loss_fn, (x, y), labels=y)
    kw.pop("labels")
    resumed = lca.allocate_trajectory(None, crashy, ev, directory=tmp_path / "b", **kw)
    _same(full, resumed)
    _same(full, lca.load_trajectory(tmp_path / "b"))
    # only iterations 4, 5, 6 were computed: start point + 2 passes each (no halving here)
    assert (full.num_splits == 2).all()
    assert ev.num_evaluations == 1 + 2 * 3
    # resuming a finished run computes nothing
    ev2 = lca.Evaluator(loss_fn, (x, y), labels=y)
    _same(full, lca.allocate_trajectory(None, traj, ev2, directory=tmp_path / "b", **kw))
    assert ev2.num_evaluations == 0


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _read_only_load(d: Path, monkeypatch):
    """``load_trajectory`` with every way of modifying the file system disabled."""

    def refuse(*a, **k):
        raise AssertionError(f"a reader modified the run directory: {a}")

    with monkeypatch.context() as m:
        for mod, name in (
            (os, "unlink"),
            (os, "remove"),
            (os, "replace"),
            (os, "rename"),
            (os, "mkdir"),
            (shutil, "rmtree"),
        ):
            m.setattr(mod, name, refuse)
        m.setattr(Path, "unlink", refuse)
        m.setattr(Path, "write_bytes", refuse)
        m.setattr(Path, "write_text", refuse)
        return lca.load_trajectory(d)


def test_crash_residue_is_read_without_touching_it(tmp_path, monkeypatch):
    x, y, ws = linreg(steps=5)
    d = tmp_path / "run"
    with lca.LCARecorder(linreg_loss, (x, y), directory=d, chunk_size=100) as rec:
        rec.start(ws[0])
        for p in ws[1:5]:
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
    (d / ".chunk_00000004_00000009.npz.1234.abcd.tmp").write_bytes(b"garbage")
    before = _snapshot(d)
    for f in d.rglob("*"):  # read-only directory (effective for non-root users)
        f.chmod(f.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    d.chmod(0o555)
    try:
        h = _read_only_load(d, monkeypatch)
    finally:
        d.chmod(0o755)
        (d / "pending").chmod(0o755)
    assert _snapshot(d) == before  # nothing deleted, merged or written
    assert h.iterations.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(h.total, ref.total)
    # the writer (holding the lock) cleans up: duplicates and temp files go
    rec2 = lca.LCARecorder(linreg_loss, (x, y), directory=d, chunk_size=100)
    assert rec2.num_recorded == 4
    assert not list((d / "pending").glob("*.npz")) and not list(d.glob("*.tmp"))
    with pytest.raises(ValueError, match="would skip iterations 4"):
        rec2.start(ws[5], iteration=5)
    rec2.start(ws[2], iteration=2)
    assert rec2(ws[3]) is None and rec2(ws[4]) is None  # already stored: replayed
    assert rec2(ws[5]) is not None
    assert rec2.history().iterations.tolist() == [0, 1, 2, 3, 4]
    rec2.close()


def _run(d, ws, steps=None, **kw):
    x, y = kw.pop("data")
    return lca.allocate_trajectory(
        linreg_loss,
        ws if steps is None else ws[: steps + 1],
        (x, y),
        directory=d,
        progress=False,
        chunk_size=3,
        **kw,
    )


IDENTITY_CHANGES = {
    "params.init_hash": lambda x, y, ws: (
        x,
        y,
        [{"w": ws[0]["w"] + 0.5, "b": ws[0]["b"]}] + ws[1:],
        {},
    ),
    "data.train.hash": lambda x, y, ws: (_poke(x), y, ws, {}),
    "integration.tol": lambda x, y, ws: (x, y, ws, {"tol": 1e-4}),
    "integration.max_splits": lambda x, y, ws: (x, y, ws, {"max_splits": 8}),
    "integration.method": lambda x, y, ws: (x, y, ws, {"method": "first_order"}),
    "loss.engines": lambda x, y, ws: (x, y, ws, {"engines": ("grad", "jvp")}),
    "loss.batch_size": lambda x, y, ws: (x, y, ws, {"batch_size": 16}),
    "storage.store_per_param": lambda x, y, ws: (x, y, ws, {"store_per_param": True}),
}


def _poke(x):
    x = x.copy()
    x[3, 1] = 7.0
    return x


@pytest.mark.parametrize("field", sorted(IDENTITY_CHANGES))
def test_resuming_another_run_names_what_differs(tmp_path, field):
    x, y, ws = linreg(steps=4)
    d = tmp_path / "run"
    _run(d, ws, steps=2, data=(x, y))
    x2, y2, ws2, kw = IDENTITY_CHANGES[field](x, y, ws)
    with pytest.raises(lca.LCAStorageError, match=rf"different LCA run: it differs in .*{field}"):
        _run(d, ws2, data=(x2, y2), **kw)
    assert lca.load_trajectory(d).iterations.tolist() == [0, 1]  # untouched


def test_resuming_another_trajectory_or_loss_raises(tmp_path):
    x, y, ws = linreg(steps=6)
    d = tmp_path / "run"
    _run(d, ws, steps=3, data=(x, y))
    other = [ws[0]] + [{"w": p["w"] * 1.01, "b": p["b"]} for p in ws[1:]]  # same start
    with pytest.raises(lca.LCAStorageError, match="not the ones the stored run reached"):
        _run(d, other, data=(x, y))
    rec = lca.LCARecorder(linreg_loss, (x, y), directory=d)
    rec.start(ws[1], iteration=1)
    with pytest.raises(lca.LCAStorageError, match="params after iteration 1 differ"):
        rec(other[2])  # replaying a stored step with other params
    rec.close()
    scaled = lambda p, b: 2.0 * linreg_loss(p, b)  # same params and data, another loss
    with pytest.raises(lca.LCAStorageError, match="`loss_fn` differs"):
        lca.allocate_trajectory(scaled, ws, (x, y), directory=d, progress=False, chunk_size=3)
    assert lca.load_trajectory(d).iterations.tolist() == [0, 1, 2]
    h = _run(d, ws, data=(x, y))  # the right run resumes
    assert h.iterations.tolist() == list(range(6))


def test_one_writer_at_a_time_and_stale_lock(tmp_path):
    x, y, ws = linreg(steps=3)
    d = tmp_path / "run"
    rec = lca.LCARecorder(linreg_loss, (x, y), directory=d)
    with pytest.raises(lca.LCAStorageError, match=rf"another LCA recorder \(pid {os.getpid()}"):
        lca.LCARecorder(linreg_loss, (x, y), directory=d)
    rec.start(ws[0])
    rec(ws[1])
    assert lca.load_trajectory(d).iterations.tolist() == [0]  # readers need no lock
    rec.close()
    assert not (d / "LOCK").exists()
    # a lock left by a dead process of this host is taken over, with a warning
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    (d / "LOCK").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "token": "x"}))
    with pytest.warns(RuntimeWarning, match=f"stale lock .*pid {pid}"):
        rec = lca.LCARecorder(linreg_loss, (x, y), directory=d)
    assert json.loads((d / "LOCK").read_text())["pid"] == os.getpid()
    rec.close()
    # a lock of another host cannot be checked: refused
    (d / "LOCK").write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "x"}))
    with pytest.raises(lca.LCAStorageError, match="pid 1 on elsewhere"):
        lca.LCARecorder(linreg_loss, (x, y), directory=d)
    (d / "LOCK").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lca.LCARecorder(linreg_loss, (x, y), directory=d).close()


def test_memory_recorder_matches_disk(tmp_path):
    x, y, ws = linreg(steps=4)
    test = (x[:20] * 2, y[:20])
    disk = _run(tmp_path / "run", ws, data=(x, y), store_grads=True, test_data=test)
    mem = lca.allocate_trajectory(
        linreg_loss, ws, (x, y), progress=False, store_grads=True, test_data=test
    )
    for k in ("per_leaf", "total", "error", "noise_floor", "num_splits"):
        np.testing.assert_array_equal(getattr(disk, k), getattr(mem, k), err_msg=k)
        np.testing.assert_array_equal(getattr(disk.test, k), getattr(mem.test, k), err_msg=k)
    assert not np.allclose(disk.test.loss_change, disk.loss_change)
    for k in disk.grad_before:
        np.testing.assert_array_equal(disk.grad_before[k], mem.grad_before[k])


def test_settings_are_checked_and_bad_directory(tmp_path):
    x, y, ws = linreg(steps=3)
    with pytest.raises(lca.LCAStorageError, match="no LCA run"):
        lca.load_trajectory(tmp_path / "nothing")
    with pytest.raises(TypeError, match="unknown option"):
        lca.LCARecorder(linreg_loss, (x, y), tolerance=1e-3)
    rec = lca.LCARecorder(linreg_loss, (x, y), directory=tmp_path / "r")
    with pytest.raises(ValueError, match="holds no run yet"):
        rec.start(ws[1], iteration=1)
    rec.close()
