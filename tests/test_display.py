"""Notebook displays: the HTML of RotationHistory / LCAResult / LCAHistory (layer names,
numbers, an inline PNG), its registration with IPython, and a cheap `import optax_layca`."""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from _utils import small_lca_run

from optax_layca import RotationHistory, lca, plot
from optax_layca.plot import _display

LAYERS = ("Dense_0/kernel", "Dense_1/kernel", "Dense_10/kernel")


def history(n=4):
    """Known figures: cosine distance 0.1·t + 0.01·i for layer i at step t; 20 units in one."""
    hist = RotationHistory()
    for t in range(1, n + 1):
        figs = {
            "cosine_distance": {p: jnp.asarray(0.1 * t + 0.01 * i) for i, p in enumerate(LAYERS)},
            "weight_norm": {
                p: jnp.full((20,) if i == 2 else (), 1.0 + t) for i, p in enumerate(LAYERS)
            },
        }
        hist.record(t, figs, epoch=t // 2 if t % 2 == 0 else None)
    return hist


@pytest.fixture(scope="module")
def lca_run():
    return small_lca_run()


def png_of(html: str) -> bytes:
    (data,) = re.findall(r'<img alt="figure" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    png = base64.b64decode(data)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return png


def rows_of(html: str) -> list[list[str]]:
    body = html.split("<tbody>")[1].split("</tbody>")[0]
    return [re.findall(r"<td>(.*?)</td>", row) for row in body.split("</tr>") if row]


def test_rotation_history_table_and_figure():
    html = plot.rotation_history_html(history())
    assert "4 records, steps 1–4, epochs 1–2, 3 layers" in html
    rows = rows_of(html)
    assert [r[0] for r in rows] == list(LAYERS)  # natural order: Dense_10 last
    # latest record (t = 4): cosine distance 0.4 + 0.01 i (float32, shown to 4 digits)
    assert [r[1] for r in rows] == ["0.4", "0.41", "0.42"]
    assert rows[0][2] == "5" and rows[2][2] == "5 [5, 5] (20)"  # a 20-unit vector summarised
    assert len(png_of(html)) > 1000


def test_empty_history_and_escaping():
    assert "empty" in plot.rotation_history_html(RotationHistory())
    hist = RotationHistory()
    hist.record(1, {"cosine_distance": {"<b>/kernel": jnp.asarray(0.5)}})
    html = plot.rotation_history_html(hist, figure=False)
    assert "&lt;b&gt;/kernel" in html and "<b>/kernel" not in html and "<img" not in html


def test_lca_result_and_history(lca_run):
    results, hist = lca_run
    r = results[0]
    html = plot.lca_html(r)
    rows = rows_of(html)
    names = list(r.layer_names)
    assert [row[0] for row in rows] == names
    assert [float(row[1]) for row in rows] == pytest.approx(
        [r.per_layer[n] for n in names],
        rel=5e-4,  # 4 significant digits shown
    )
    shares = [float(row[2].rstrip("%")) for row in rows]
    assert sum(shares) == pytest.approx(100.0, abs=0.05 * len(shares))  # each rounded to 0.05
    assert f"measured ΔL = {float(r.loss_change):.4g}" in html
    png_of(html)

    html = plot.lca_html(hist)
    assert "3 iterations (10–12)" in html
    rows = rows_of(html)
    per_layer = np.asarray(hist.per_layer)
    for k, row in enumerate(rows):
        assert float(row[1]) == pytest.approx(per_layer[:, k].sum(), rel=5e-4)
        assert row[3] == f"{100 * np.mean(per_layer[:, k] < 0):.0f}%"
    png_of(html)


def test_registered_names_are_the_classes():
    classes = {
        "rotation_history_html": [RotationHistory],
        "lca_html": [lca.LCAResult, lca.LCAHistory],
    }
    registered = {(c.__module__, c.__name__) for cs in classes.values() for c in cs}
    assert registered == set(_display.DISPLAYED)


def test_ipython_shell_formats_history(lca_run):
    ipython = pytest.importorskip("IPython.core.interactiveshell")
    shell = ipython.InteractiveShell.instance()
    try:
        assert plot.register_display(shell)
        data, _ = shell.display_formatter.format(history())
        assert "<table>" in data["text/html"] and "Dense_10/kernel" in data["text/html"]
        data, _ = shell.display_formatter.format(lca_run[1])
        assert "LCAHistory" in data["text/html"]
    finally:
        ipython.InteractiveShell.clear_instance()


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_is_cheap():
    code = (
        "import sys, optax_layca\n"
        "heavy = ('matplotlib', 'IPython', 'tensorboardX', 'tensorboard', 'wandb', 'sphinx')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    assert run_python(code) == "[]"


def test_import_registers_in_a_running_ipython():
    code = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()  # a notebook: IPython runs, then the import\n"
        "import sys, optax_layca, optax_layca.lca\n"
        "html = shell.display_formatter.formatters['text/html']\n"
        "print(html.lookup_by_type(optax_layca.RotationHistory).__name__,\n"
        "      html.lookup_by_type(optax_layca.lca.LCAHistory).__name__,\n"
        "      'matplotlib' in sys.modules)\n"
    )
    assert run_python(code) == "rotation_history_html lca_html False"
