"""LCA results are the same on 1 and 8 host devices (own process: XLA_FLAGS set before import)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_lca_mlp import make_problem, sgd_trajectory
    from test_lca_bn import bn_loss, make_params, data as bn_data
    from optax_layca import lca
    assert jax.device_count() == 8, jax.devices()
    x, y, params, loss_fn = make_problem(n=100)
    traj = sgd_trajectory(params, loss_fn, x, y, steps=2)
    out = {}
    for ndev in (1, 8):
        devs = jax.local_devices()[:ndev]
        ev = lca.Evaluator(loss_fn, (x, y), labels=y, batch_size=36, devices=devs)
        hs = []
        for engines, strategy in (("grad", "reverse"), ("jvp", "jvp")):
            h = lca.allocate_trajectory(None, traj, ev, engines=engines,
                                        class_strategy=strategy, progress=False,
                                        keep_results=False)
            hs.append(dict(per_layer=h.per_layer.tolist(), per_class=h.per_class.tolist(),
                           total=h.total.tolist(), loss_change=h.loss_change.tolist(),
                           num_splits=h.num_splits.tolist()))
        assert ev.bn_mode == "inference" and ev.batch_size % ndev == 0  # padded to fill devices
        e = ev.evaluate(traj[0])
        batches = [(x[i:i + 30], y[i:i + 30]) for i in range(0, 100, 30)]  # last has 10
        eb = lca.Evaluator(loss_fn, batches, devices=devs).evaluate(traj[0])
        assert eb.num_examples == 100 and abs(eb.loss - e.loss) < 1e-5 * abs(e.loss), (eb, e)
        hs.append(dict(loss=e.loss, grad=[np.asarray(g).tolist() for g in jax.tree.leaves(e.grad)]))
        # BatchNorm on batch statistics: full batches of 24 split over the devices (the
        # statistics are still over all 24), the last 4 examples a batch of their own
        xb, yb = bn_data(n=100)
        ebn = lca.Evaluator(bn_loss, (xb, yb), batch_size=24, devices=devs)
        e = ebn.evaluate(make_params())
        assert ebn.bn_mode == "batch" and not ebn.layout.padded
        hs.append(dict(loss=e.loss, grad=[np.asarray(g).tolist() for g in jax.tree.leaves(e.grad)]))
        out[ndev] = hs
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_one_vs_eight_host_devices():
    import numpy as np

    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    tests_dir = str(Path(__file__).resolve().parent)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, tests_dir],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, eight = out["1"], out["8"]
    for a, b in zip(one[:2], eight[:2]):
        assert a["num_splits"] == b["num_splits"]
        for k in ("per_layer", "per_class", "total", "loss_change"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for i in (2, 3):  # plain and BatchNorm evaluations
        np.testing.assert_allclose(one[i]["loss"], eight[i]["loss"], rtol=1e-6)
        for g1, g8 in zip(one[i]["grad"], eight[i]["grad"]):
            np.testing.assert_allclose(g1, g8, rtol=1e-5, atol=1e-7)
