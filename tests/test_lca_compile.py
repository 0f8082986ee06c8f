"""`lca.allocate` in a loop compiles once per loss function and data shapes (trace counter,
not timing), and the compiled kernels die with the loss function."""

import gc

import jax
import numpy as np
from test_lca_mlp import make_problem, sgd_trajectory

from optax_layca import lca
from optax_layca.lca import _engines


def counting(loss_fn):
    traces = []

    def counted(p, b):
        traces.append(1)  # runs only while JAX traces the function
        return loss_fn(p, b)

    return counted, traces


def test_allocate_in_a_loop_traces_once():
    x, y, params, loss_fn = make_problem(n=90, seed=3)
    traj = sgd_trajectory(params, loss_fn, x, y, steps=4)
    counted, traces = counting(loss_fn)
    rng = np.random.default_rng(0)
    lca.allocate(counted, traj[0], traj[1], (x, y), labels=y)
    first = len(traces)
    assert first > 0
    for t in range(1, 4):  # new params and new data of the same shapes: nothing retraced
        x2 = rng.normal(size=x.shape).astype(np.float32)
        y2 = rng.integers(0, 3, size=y.shape).astype(y.dtype)
        r = lca.allocate(counted, traj[t], traj[t + 1], (x2, y2), labels=y2)
        assert r.per_class_leaf.shape == (3, 4)
    assert len(traces) == first
    # options that change what is computed compile their own kernels, once
    lca.allocate(counted, traj[0], traj[1], (x, y), method="first_order")
    second = len(traces)
    lca.allocate(counted, traj[1], traj[2], (x, y), method="first_order")
    assert len(traces) == second


def test_kernel_cache_is_weak():
    x, y, params, loss_fn = make_problem(n=40, seed=4)
    p1 = jax.tree.map(lambda a: a * 0.99, params)
    before = _engines.cache_size()
    counted, _ = counting(loss_fn)
    lca.allocate(counted, params, p1, (x, y))
    assert _engines.cache_size() == before + 1
    del counted
    gc.collect()
    assert _engines.cache_size() == before  # entry (and its executables) freed with the loss


def test_bound_methods_share_kernels():
    x, y, params, loss_fn = make_problem(n=40, seed=5)

    class Model:
        def loss(self, p, b):
            self.traces += 1
            return loss_fn(p, b)

    m = Model()
    m.traces = 0
    p1 = jax.tree.map(lambda a: a * 0.99, params)
    lca.allocate(m.loss, params, p1, (x, y))  # `m.loss` is a new bound-method object each time
    n = m.traces
    lca.allocate(m.loss, params, p1, (x, y))
    assert m.traces == n
