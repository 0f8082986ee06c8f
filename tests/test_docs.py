"""The docs site builds offline with warnings as errors, and holds what it promises: an API page
per wing, the maths, the notebooks, the command line's help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_with_warnings_as_errors(tmp_path):
    for module in ("sphinx", "myst_nb", "sphinx_book_theme"):
        pytest.importorskip(module, reason="the docs extra is not installed")
    out = tmp_path / "html"
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "html",
        "docs",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    page = lambda name: (out / name).read_text(encoding="utf-8")
    control, rotation, lca, show = (
        page(f"api/{name}.html") for name in ("control", "rotation", "lca", "show")
    )
    assert 'id="optax_layca.layca"' in control and 'id="optax_layca.forward_order"' in control
    assert 'id="optax_layca.rotation.track_rotation"' in rotation
    assert 'id="optax_layca.rotation.RotationHistory.record"' in rotation
    assert 'id="optax_layca.lca.allocate"' in lca
    assert 'id="optax_layca.plot.rotation_curves_figure"' in show
    assert 'id="optax_layca.metrics.write"' in show
    assert "optax-layca demo" in page("api/cli.html")
    assert page("maths.html").count('class="math') > 20
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    for nb in notebooks:
        assert "highlight-python" in page(f"notebooks/{nb}.html"), nb
