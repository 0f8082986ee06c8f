"""Two processes on one LCA run directory: a second writer is refused while the first lives,
and readers polling a live writer always see a complete, verified prefix and never disturb it."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from optax_layca import lca

WRITER = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_lca_trajectory import linreg, linreg_loss
from optax_layca import lca

directory, steps, hold, gate = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
x, y, ws = linreg(steps=steps)
with lca.LCARecorder(linreg_loss, (x, y), directory=directory, chunk_size=2) as rec:
    rec.start(ws[0])
    print("STARTED", flush=True)
    for i, p in enumerate(ws[1:], 1):
        rec(p)
        time.sleep(0.01)
        # every GATE steps wait (at most a minute) until a reader has seen this far, so that
        # readers see several prefixes however loaded the machine is
        deadline = time.time() + 60
        while gate != "-" and i % 10 == 0 and not Path(f"{gate}.{i}").exists():
            if time.time() > deadline:
                break
            time.sleep(0.02)
    while hold != "-" and not Path(hold).exists():
        time.sleep(0.02)
print("DONE", flush=True)
"""


def _writer(directory, steps, hold="-", gate="-"):
    tests = str(Path(__file__).resolve().parent)
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, tests, str(directory), str(steps), str(hold), str(gate)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


def test_second_writer_refused_while_first_lives(tmp_path):
    from test_lca_trajectory import linreg, linreg_loss

    d, hold = tmp_path / "run", tmp_path / "go"
    proc = _writer(d, 3, hold)
    try:
        assert proc.stdout.readline().strip() == "STARTED", proc.stderr.read()[-2000:]
        x, y, _ = linreg(steps=3)
        with pytest.raises(lca.LCAStorageError, match=rf"pid {proc.pid} on"):
            lca.LCARecorder(linreg_loss, (x, y), directory=d)
    finally:
        hold.touch()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "DONE" in out, err[-2000:]
    assert lca.load_trajectory(d).iterations.tolist() == [0, 1, 2]
    assert not (d / "LOCK").exists()


def test_readers_see_verified_prefixes_of_a_live_writer(tmp_path):
    d, steps, gate = tmp_path / "run", 40, tmp_path / "seen"
    proc = _writer(d, steps, gate=gate)
    seen = []
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        try:
            h = lca.load_trajectory(d)
        except lca.LCAStorageError as err:
            assert "no LCA run" in str(err)  # before the manifest exists
            continue
        assert h.iterations.tolist() == list(range(len(h)))
        seen.append(h)
        for k in range(10, len(h) + 3, 10):  # flushed in chunks of 2: within 2 of the writer
            Path(f"{gate}.{k}").touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "DONE" in out, err[-2000:]
    final = lca.load_trajectory(d)
    assert len(final) == steps
    sizes = {len(h) for h in seen}
    assert len(sizes) >= 3, sizes  # really read while it was writing
    for h in seen:  # every partial view is a prefix of the final numbers
        n = len(h)
        np.testing.assert_array_equal(h.per_leaf, final.per_leaf[:n])
        np.testing.assert_array_equal(h.loss_change, final.loss_change[:n])
