"""LCA trajectory storage survives SIGKILL: resume loses no iteration, leaves no corrupt file."""

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from optax_layca import lca

CHILD = r"""
import sys, time
import numpy as np
from optax_layca import lca

rng = np.random.default_rng(0)
x = rng.standard_normal((256, 6)).astype(np.float32)
y = (x @ rng.standard_normal(6) + 0.1 * rng.standard_normal(256)).astype(np.float32)

def loss_fn(w, batch):
    xb, yb = batch
    return (xb @ w - yb) ** 2

# A deterministic gradient-descent trajectory, computed in numpy.
ws = [np.zeros(6, np.float32)]
for _ in range(int(sys.argv[2])):
    w = ws[-1]
    ws.append((w - 0.05 * 2 * x.T @ (x @ w - y) / len(x)).astype(np.float32))

class Slow(list):
    def __getitem__(self, i):
        time.sleep(float(sys.argv[3]))  # widen the window in which the parent kills us
        return list.__getitem__(self, i)

directory = sys.argv[1] if sys.argv[1] != "-" else None
hist = lca.allocate_trajectory(loss_fn, Slow(ws), (x, y), directory=directory, chunk_size=3,
                               progress=False, batch_size=100)
np.save(sys.argv[4], np.stack([hist.iterations, hist.total, hist.loss_change], 1))
print("DONE", len(hist.total))
"""

STEPS = 24


def run_child(directory, out, delay, wait=True):
    args = [sys.executable, "-c", CHILD, str(directory), str(STEPS), str(delay), str(out)]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    if wait:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        proc.stderr_text = err
    return proc


def stored_iterations(directory: Path) -> int:
    return len(list(directory.glob("pending/*.npz"))) + sum(
        1 for _ in directory.glob("chunk_*.npz")
    )


@pytest.mark.slow
@pytest.mark.parametrize("kills", [3])
def test_sigkill_mid_run_then_resume(tmp_path, kills):
    reference = tmp_path / "reference.npy"
    run_child("-", reference, 0.0)

    directory = tmp_path / "run"
    for k in range(kills):
        proc = run_child(directory, tmp_path / "unused.npy", 0.05, wait=False)
        deadline = time.time() + 120
        # Kill once a few more records than before exist (at a varying point each round).
        target = 2 + 3 * k
        while time.time() < deadline and proc.poll() is None:
            if directory.exists() and stored_iterations(directory) >= target:
                time.sleep(0.013 * (k + 1))
                break
            time.sleep(0.005)
        assert proc.poll() is None, (
            "child finished before it could be killed: " + proc.stderr.read()[-2000:]
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()

    # the killed writers left a consistent prefix, readable without touching the directory
    assert (directory / "LOCK").exists()  # the last writer died holding it
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    partial = lca.load_trajectory(directory)
    assert 0 < len(partial) < STEPS
    assert partial.iterations.tolist() == list(range(len(partial)))
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before

    resumed = tmp_path / "resumed.npy"
    proc = run_child(directory, resumed, 0.0)
    assert "Took over the stale lock" in proc.stderr_text  # the dead writer's lock
    ref, got = np.load(reference), np.load(resumed)
    np.testing.assert_array_equal(got[:, 0], np.arange(STEPS))  # no iteration lost or doubled
    np.testing.assert_array_equal(got, ref)  # same numbers as the uninterrupted run
    for f in directory.rglob("*.npz"):  # every remaining file is a complete archive
        with zipfile.ZipFile(f) as z:
            assert z.testzip() is None, f
    assert not (directory / "LOCK").exists()  # released by the finished writer
