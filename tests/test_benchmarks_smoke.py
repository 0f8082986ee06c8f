"""Every benchmark runs end to end in quick mode (no timing assertions: they must not rot).

One test per benchmark (xdist spreads them), each in its own process as ``run_all.py`` runs
them, with its quick-mode XLA flags; one more runs ``run_all.py`` itself on the cheapest
benchmark and checks the index page it writes.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# loaded from its file: putting benchmarks/ on sys.path would shadow names such as `lca`
_spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)


def quick_env(results: Path) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} {run_all.QUICK_XLA_FLAGS}".strip()
    return dict(os.environ, OPTAX_LAYCA_BENCH_RESULTS=str(results), MPLBACKEND="Agg",
                XLA_FLAGS=flags)


def check_outputs(results: Path, name: str) -> None:
    payload = json.loads((results / f"{name}.json").read_text())
    assert payload["environment"]["jax"], name
    assert payload["quick"] is True, name
    table = [line for line in (results / f"{name}.md").read_text().splitlines()
             if line.startswith("|")]
    assert len(table) >= 3, name  # header, rule and at least one row


@pytest.mark.slow
@pytest.mark.parametrize("name", run_all.BENCHMARKS)
def test_benchmark_quick(name, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick"],
                          env=quick_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_outputs(tmp_path, name)


@pytest.mark.slow
def test_run_all_writes_index(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--only", "scaling"],
        env=quick_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_outputs(tmp_path, "scaling")
    index = (tmp_path / "README.md").read_text()
    assert index.startswith("# Benchmark results")
    # each benchmark's title is demoted one level under the index's own
    assert "\n## Fused Layca update time vs parameter count\n" in index
