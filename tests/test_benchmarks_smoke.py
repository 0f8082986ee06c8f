"""Every benchmark runs end to end in quick mode (no timing assertions: they must not rot)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_all_quick(tmp_path):
    env = dict(os.environ, OPTAX_LAYCA_BENCH_RESULTS=str(tmp_path), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick"],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    index = (tmp_path / "README.md").read_text()
    for name in ["update_step", "train_step", "monitor_overhead", "lca", "scaling", "multi_device"]:
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["environment"]["jax"], name
        assert (tmp_path / f"{name}.md").read_text().count("|") > 4, name
    assert index.startswith("# Benchmark results")
