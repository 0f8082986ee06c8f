"""The README's Python examples run as written."""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_quick_start_runs_and_rotates_every_kernel_by_arctan_lr():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README quick start", "exec"), scope)
    params, before = scope["params"], scope["model"].init(
        scope["jax"].random.key(0), scope["x"])["params"]
    for name in before:
        w0, w1 = (np.asarray(p[name]["kernel"], np.float64).ravel() for p in (before, params))
        np.testing.assert_allclose(np.linalg.norm(w1), np.linalg.norm(w0), rtol=1e-5)
        unit = w0 / np.linalg.norm(w0)
        angle = np.arctan2(np.linalg.norm(w1 - (w1 @ unit) * unit), w1 @ unit)
        np.testing.assert_allclose(angle, float(jnp.arctan(3.0**-3)), rtol=1e-4)
