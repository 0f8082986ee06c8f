"""A stored LCA run is verified on read: every corruption class raises LCAStorageError naming
the file and what is wrong (never numpy's allow_pickle hint, a bare BadZipFile, KeyError or
JSONDecodeError), and nothing else goes unnoticed."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_lca_trajectory import linreg, linreg_loss

from optax_layca import lca

STEPS = 10  # chunk_size 3: chunks 0-3, 3-6, 6-9 and iteration 9 pending


def _record(directory, ws, data, **kw):
    with lca.LCARecorder(linreg_loss, data, directory=directory, chunk_size=3, **kw) as rec:
        rec.start(ws[0])
        for p in ws[1:]:
            rec(p)
        # leave the last record pending, as after a crash (close() would merge it)
        rec._store.flush = lambda: None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    x, y, ws = linreg(steps=STEPS)
    _record(root / "a", ws, (x, y))
    # same data, initialisation and settings, another trajectory (learning rate)
    other = [ws[0]]
    for a, b in zip(ws, ws[1:]):
        other.append({k: other[-1][k] + 0.5 * (b[k] - a[k]) for k in a})
    _record(root / "same_identity", other, (x, y))
    _record(root / "other_settings", ws, (x, y), options=lca.LCAOptions(tol=1e-4))
    return root, lca.load_trajectory(root / "a")


@pytest.fixture
def run(runs, tmp_path):
    root, ref = runs
    d = tmp_path / "run"
    shutil.copytree(root / "a", d)
    return d, root, ref


def _chunk(d, a, b):
    return d / f"chunk_{a:08d}_{b:08d}.npz"


def _truncate(p, frac=0.5):
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * frac)])


def _overlap(d):
    a = dict(np.load(_chunk(d, 0, 3)))
    b = dict(np.load(_chunk(d, 3, 6)))
    np.savez(_chunk(d, 2, 5), **{k: np.concatenate([a[k][2:], b[k][:2]]) for k in a})


def _swap(p, q):
    bp, bq = p.read_bytes(), q.read_bytes()
    p.write_bytes(bq)
    q.write_bytes(bp)


CORRUPTIONS = {
    "truncated chunk": (
        lambda d, r: _truncate(_chunk(d, 3, 6)),
        "chunk_00000003_00000006",
        "truncated or corrupt",
    ),
    "empty chunk": (
        lambda d, r: _chunk(d, 0, 3).write_bytes(b""),
        "chunk_00000000_00000003",
        "empty",
    ),
    "truncated pending": (
        lambda d, r: _truncate(d / "pending/it_00000009.npz", 0.9),
        "it_00000009",
        "truncated or corrupt",
    ),
    "bit flip": (lambda d, r: _flip(_chunk(d, 6, 9)), "chunk_00000006_00000009", "corrupt"),
    "text as chunk": (
        lambda d, r: _chunk(d, 0, 3).write_text("hello"),
        "chunk_00000000_00000003",
        "not a complete .npz",
    ),
    "foreign npz": (
        lambda d, r: np.savez(_chunk(d, 3, 6), a=np.zeros(3)),
        "chunk_00000003_00000006",
        "lacks the entries",
    ),
    "deleted chunk": (
        lambda d, r: _chunk(d, 3, 6).unlink(),
        "lacks iteration 3",
        "chunk_00000006_00000009",
    ),
    "deleted last records": (
        lambda d, r: (d / "pending/it_00000009.npz").unlink(),
        "iterations 9…9 are missing",
        "progress.json",
    ),
    "deleted first chunk": (
        lambda d, r: _chunk(d, 0, 3).unlink(),
        "lacks iteration 0",
        "chunk_00000003_00000006",
    ),
    "renamed chunk": (
        lambda d, r: _chunk(d, 6, 9).rename(_chunk(d, 9, 12)),
        "chunk_00000009_00000012",
        "renamed or swapped",
    ),
    "swapped chunks": (
        lambda d, r: _swap(_chunk(d, 0, 3), _chunk(d, 3, 6)),
        "chunk_00000000_00000003",
        "renamed or swapped",
    ),
    "overlapping chunks": (lambda d, r: _overlap(d), "both hold iteration 2", "chunk_00000002"),
    "garbage manifest": (
        lambda d, r: (d / "manifest.json").write_text("{oops"),
        "manifest.json",
        "not valid JSON",
    ),
    "edited manifest": (lambda d, r: _edit_manifest(d), "manifest.json", "run_id does not match"),
    "manifest of another run": (
        lambda d, r: shutil.copy(r / "other_settings/manifest.json", d),
        "belongs to another run",
        "progress.json",
    ),
    "garbage progress": (
        lambda d, r: (d / "progress.json").write_bytes(b"\x00\x01"),
        "progress.json",
        "not valid JSON",
    ),
    "chunk of another trajectory": (
        lambda d, r: shutil.copy(_chunk(r / "same_identity", 3, 6), d),
        "does not start where iteration 2 ended",
        "chunk_00000003_00000006",
    ),
}


def _flip(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside some array's bytes: the zip CRC-32 catches it
    p.write_bytes(bytes(data))


def _edit_manifest(d):
    m = json.loads((d / "manifest.json").read_text())
    m["identity"]["integration"]["tol"] = 0.5
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_is_reported_with_the_file(run, kind):
    d, root, _ = run
    corrupt, *words = CORRUPTIONS[kind]
    corrupt(d, root)
    with pytest.raises(lca.LCAStorageError) as info:
        lca.load_trajectory(d)
    msg = str(info.value)
    for w in words:
        assert w in msg, (kind, msg)
    assert "allow_pickle" not in msg
    assert type(info.value) is lca.LCAStorageError and isinstance(info.value, ValueError)
    # a writer refuses to resume over it too (it reads every file's header, not every byte)
    if kind != "bit flip":
        x, y, _ = linreg(steps=STEPS)
        with pytest.raises(lca.LCAStorageError):
            lca.LCARecorder(linreg_loss, (x, y), directory=d)


def test_intact_copy_reads_back(run):
    d, _, ref = run
    h = lca.load_trajectory(d)
    assert h.iterations.tolist() == list(range(STEPS))
    np.testing.assert_array_equal(h.per_leaf, ref.per_leaf)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(which=st.integers(0, 3), where=st.floats(0.0, 1.0), mode=st.sampled_from(["cut", "flip"]))
def test_any_damage_is_caught_or_harmless(runs, tmp_path_factory, which, where, mode):
    """Truncation anywhere is always caught; a flipped byte either is caught or lands where
    it changes nothing (zip metadata outside the CRC), never silently alters a number."""
    root, ref = runs
    d = tmp_path_factory.mktemp("h") / "run"
    shutil.copytree(root / "a", d)
    files = [_chunk(d, 0, 3), _chunk(d, 3, 6), _chunk(d, 6, 9), d / "pending/it_00000009.npz"]
    p = files[which]
    data = bytearray(p.read_bytes())
    i = min(int(where * len(data)), len(data) - 1)
    if mode == "cut":
        p.write_bytes(bytes(data[:i]))
    else:
        data[i] ^= 0x5A
        p.write_bytes(bytes(data))
    try:
        h = lca.load_trajectory(d)
    except lca.LCAStorageError as err:
        assert p.name in str(err) and "allow_pickle" not in str(err)
        return
    assert mode == "flip"
    for k in ("per_leaf", "total", "loss_change", "error", "noise_floor", "num_splits"):
        np.testing.assert_array_equal(getattr(h, k), getattr(ref, k))
    np.testing.assert_array_equal(h.iterations, ref.iterations)


def test_writer_writes_atomically(tmp_path, monkeypatch):
    """Every file goes through temp + fsync + os.replace; a failure mid-write leaves the old
    file and no temp file behind."""
    import os

    from optax_layca import _io

    calls = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(
        os, "replace", lambda a, b: calls.append(("replace", Path(b).name)) or real_replace(a, b)
    )
    x, y, ws = linreg(steps=4)
    _record(tmp_path / "run", ws, (x, y))
    names = {c[1] for c in calls if isinstance(c, tuple)}
    assert {
        "manifest.json",
        "progress.json",
        "chunk_00000000_00000003.npz",
        "it_00000003.npz",
    } <= names
    assert calls.count("fsync") >= 2 * len([c for c in calls if isinstance(c, tuple)])

    def boom(f):
        f.write(b"partial")
        raise OSError("disk full")

    target = tmp_path / "run" / "progress.json"
    before = target.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        _io.atomic_write(target, boom)
    assert target.read_bytes() == before
    assert not list((tmp_path / "run").glob("*.tmp"))
