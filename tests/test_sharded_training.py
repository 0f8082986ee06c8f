"""The scale-out recipe in examples/: 8 host devices give the numbers of one device."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, jax, numpy as np
sys.path.insert(0, {examples!r})
from sharded_training import train
assert jax.device_count() == 8, jax.device_count()
ref, _ = train("replicated", 10)
for mode in ("data", "fsdp"):
    out, shard = train(mode, 10)
    specs = {{str(s.spec) for s in jax.tree.leaves(shard)}}
    if mode == "fsdp":
        assert any("model" in s for s in specs), specs  # kernels really are split
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
print("OK")
"""


@pytest.mark.slow
def test_data_parallel_and_fsdp_match_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    code = SCRIPT.format(examples=str(ROOT / "examples"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
