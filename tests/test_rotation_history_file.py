"""RotationHistory files: atomic, verified on read, and a loaded history records on exactly as
one never saved (same schedule, per-epoch rotation from the last boundary, same run only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _utils import init_mlp, mlp_data, mlp_loss_jax

import optax_layca as ol

SIZES, STEPS_PER_EPOCH = (4, 6, 5, 3), 3


def _run(seed, hist, epochs, start=0, carry=None):
    """Trains ``epochs`` epochs of SGD + monitor, recording into ``hist``; returns the carry
    (params, state) so that a run can be continued."""
    tx = ol.track_rotation(optax.sgd(0.2))
    x, y = mlp_data(SIZES, n=24, seed=seed)
    if carry is None:
        params = jax.tree.map(jnp.asarray, init_mlp(SIZES, seed=seed))
        carry = (params, tx.init(params))
    step = jax.jit(lambda p, s: _step(tx, p, s, x, y))
    params, state = carry
    for t in range(start * STEPS_PER_EPOCH + 1, (start + epochs) * STEPS_PER_EPOCH + 1):
        params, state = step(params, state)
        end = t % STEPS_PER_EPOCH == 0
        hist.record(t, state, epoch=t // STEPS_PER_EPOCH if end else None,
                    params=params if end else None)
    return params, state


def _step(tx, p, s, x, y):
    u, s = tx.update(jax.grad(mlp_loss_jax)(p, x, y), s, p)
    return optax.apply_updates(p, u), s


def _same(a: ol.RotationHistory, b: ol.RotationHistory):
    da, db = a.as_dict(), b.as_dict()
    assert da.keys() == db.keys()
    for k in da:
        np.testing.assert_array_equal(da[k], db[k], err_msg=k)


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_loaded_then_appended_equals_never_saved(tmp_path, suffix):
    whole = ol.RotationHistory(every=2)
    _run(0, whole, epochs=4)
    first = ol.RotationHistory(every=2)
    carry = _run(0, first, epochs=2)
    path = first.save(tmp_path / f"h{suffix}")
    resumed = ol.RotationHistory.load(path)
    _run(0, resumed, epochs=2, start=2, carry=carry)
    # Same records (the every=2 schedule survived) and the same per-epoch rotation: epoch 3 is
    # measured from the end of epoch 2, not from init (v0.1 measured it from init).
    _same(resumed, whole)


def test_a_record_from_another_run_or_going_back_is_refused(tmp_path):
    hist = ol.RotationHistory()
    _run(0, hist, epochs=1)
    loaded = ol.RotationHistory.load(hist.save(tmp_path / "h.npz"))
    with pytest.raises(ValueError, match="another run"):
        _run(1, loaded, epochs=1, start=1)
    with pytest.raises(ValueError, match="steps never go back"):
        _run(0, ol.RotationHistory.load(tmp_path / "h.npz"), epochs=1)


def test_a_callable_schedule_must_be_given_again_to_record(tmp_path):
    every = lambda step: step % 3 == 1
    hist = ol.RotationHistory(every=every)
    carry = _run(0, hist, epochs=1)
    path = hist.save(tmp_path / "h.npz")
    loaded = ol.RotationHistory.load(path)
    np.testing.assert_array_equal(loaded.steps, hist.steps)  # reading needs nothing
    with pytest.raises(ValueError, match="pass it again"):
        _run(0, loaded, epochs=1, start=1, carry=carry)
    again = ol.RotationHistory.load(path, every=every)
    _run(0, again, epochs=1, start=1, carry=carry)
    assert again.steps.tolist() == [1, 3, 4, 6]


def _saved(tmp_path):
    hist = ol.RotationHistory()
    _run(0, hist, epochs=1)
    return hist.save(tmp_path / "h.npz")


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_array(path):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("cosine_distance/")}
    np.savez(path, **arrays)


def _wrong_rows(path):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in arrays if k.startswith("step_angle/"))
    arrays[key] = arrays[key][:-1]
    np.savez(path, **arrays)


def _encrypted_flag(path):
    """A damaged byte that sets the first member's "strong encryption" flag (zipfile raises
    NotImplementedError, not BadZipFile)."""
    data = bytearray(path.read_bytes())
    entry = data.find(b"PK\x01\x02")  # the first central-directory entry
    data[entry + 8] |= 0x41  # its general purpose bit flag: bits 0 and 6
    path.write_bytes(bytes(data))


def _foreign_meta(path):
    np.savez(path, __meta__=np.asarray(json.dumps({"format": "something/else"})))


CORRUPTIONS = {
    "truncated": _truncate,
    "empty": lambda p: p.write_bytes(b""),
    "garbage": lambda p: p.write_bytes(os.urandom(300)),
    "array missing": _drop_array,
    "rows disagree": _wrong_rows,
    "foreign format": _foreign_meta,
    "no metadata": lambda p: np.savez(p, step=np.arange(3)),
    "pickled object": lambda p: np.savez(p, __meta__=np.array([{"a": 1}], dtype=object)),
    "encrypted flag": _encrypted_flag,
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_damaged_file_is_named_with_what_is_wrong(tmp_path, corrupt):
    path = _saved(tmp_path)
    corrupt(path)
    with pytest.raises(ValueError, match=r"h\.npz.*is not a complete saved RotationHistory") as e:
        ol.RotationHistory.load(path)
    assert "allow_pickle" not in str(e.value)
    assert not isinstance(e.value.__cause__, (zipfile.BadZipFile, KeyError))


def test_a_failed_save_leaves_the_previous_file(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    before = path.read_bytes()
    bigger = ol.RotationHistory()
    _run(0, bigger, epochs=2)

    def disk_full(file, **arrays):
        file.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        bigger.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.npz"]


SAVER = textwrap.dedent(
    """
    import sys, numpy as np
    import optax_layca as ol
    path = sys.argv[1]
    hist = ol.RotationHistory()
    figs = {"cosine_distance": {"w": np.zeros(())}}
    for step in range(10**9):
        hist.record(step, {"cosine_distance": {"w": np.float32(step)}, "x": {"w": np.ones(4096)}})
        hist.save(path)
        if step == 0:
            print("saved", flush=True)
    """
)


@pytest.mark.slow
def test_killed_while_saving_the_last_good_file_loads(tmp_path):
    """SIGKILL a process that saves a growing history in a loop, at several moments: the file
    on disk always loads, holding a prefix of the records."""
    path = tmp_path / "h.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for delay in (0.05, 0.3, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saved"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        hist = ol.RotationHistory.load(path)
        steps = hist.steps
        np.testing.assert_array_equal(steps, np.arange(len(steps)))
        np.testing.assert_array_equal(hist.get("cosine_distance")["w"], steps.astype(np.float32))
