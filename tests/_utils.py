"""Test helpers: tree asserts, the one MLP builder, and slow numpy transcriptions of the maths.

The references are written from the paper (Carbonnelle & De Vleeschouwer, 2019: Algorithm 1,
Eq. 1, App. A.2) in float64 numpy, one layer at a time, without importing ``optax_layca``:
they are the independent reference the library is checked against.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.tree_util as jtu
import numpy as np

# ----------------------------------------------------------------------------- tree asserts


def keystr(path) -> str:
    """``"Dense_0/kernel"`` from a key path (own spelling, not the library's)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return "/".join(out)


def flat(tree) -> dict[str, np.ndarray]:
    """``{path: float64 array}`` of a pytree."""
    return {keystr(p): np.asarray(x, np.float64) for p, x in jtu.tree_flatten_with_path(tree)[0]}


def assert_trees_close(actual, expected, rtol=1e-6, atol=0.0, err=""):
    """Leaf-wise ``np.testing.assert_allclose`` naming the leaf; structures must match."""
    a, e = flat(actual), flat(expected)
    assert a.keys() == e.keys(), f"{err} structures differ: {sorted(a)} vs {sorted(e)}"
    for k in a:
        np.testing.assert_allclose(a[k], e[k], rtol=rtol, atol=atol, err_msg=f"{err} leaf {k}")


def assert_trees_close_rel(actual, expected, tol=1e-6, err=""):
    """Per leaf ``‖a − e‖ ≤ tol · max(‖e‖, tiny)``: a relative error on the whole leaf."""
    a, e = flat(actual), flat(expected)
    assert a.keys() == e.keys(), f"{err} structures differ: {sorted(a)} vs {sorted(e)}"
    for k in a:
        d = np.linalg.norm(a[k] - e[k])
        scale = max(np.linalg.norm(e[k]), 1e-30)
        assert d <= tol * scale, f"{err} leaf {k}: relative error {d / scale:.3g} > {tol}"


def assert_tree_finite(tree, err=""):
    for k, v in flat(tree).items():
        assert np.all(np.isfinite(v)), f"{err} leaf {k} is not finite"


def assert_tree_dtypes(tree, dtype):
    for p, x in jtu.tree_flatten_with_path(tree)[0]:
        assert x.dtype == dtype, f"leaf {keystr(p)} has dtype {x.dtype}, expected {dtype}"


def angle(u: np.ndarray, v: np.ndarray) -> float:
    """Angle between two tensors with atan2 (exact for tiny angles), float64."""
    u, v = np.ravel(u).astype(np.float64), np.ravel(v).astype(np.float64)
    dot = u @ v
    perp = v - (dot / (u @ u)) * u
    return float(np.arctan2(np.linalg.norm(perp) * np.linalg.norm(u), dot))


def natural(paths):
    """Own natural sort for the tests (digit runs by value)."""
    key = lambda s: [
        (0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t
    ]
    return sorted(paths, key=key)


# ----------------------------------------------------------------------------- numpy MLP


def init_mlp(sizes, seed=0, dtype=np.float32, bias_scale=0.1):
    """Params ``{"Dense_i": {"kernel": (in, out), "bias": (out,)}}`` (Flax layout, LeCun
    normal kernels, ``bias_scale``-normal biases), numpy arrays of ``dtype``.

    The one MLP builder of the tests: every file takes its params from here.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for i, (m, n) in enumerate(itertools.pairwise(sizes)):
        params[f"Dense_{i}"] = {
            "kernel": (rng.standard_normal((m, n)) / np.sqrt(m)).astype(dtype),
            "bias": (bias_scale * rng.standard_normal(n)).astype(dtype),
        }
    return params


def mlp_apply(params, x, activation=None):
    """Forward pass of :func:`init_mlp` params (jax): ``activation`` (tanh) between layers."""
    import jax.numpy as jnp

    act = jnp.tanh if activation is None else activation
    h = x
    n = len(params)
    for i in range(n):
        h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < n - 1:
            h = act(h)
    return h


def mlp_data(sizes, n=32, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, sizes[0])).astype(np.float32)
    y = rng.standard_normal((n, sizes[-1])).astype(np.float32)
    return x, y


def mlp_loss_np(params, x, y):
    """Tanh MLP, mean squared error (float64)."""
    h = np.asarray(x, np.float64)
    n = len(params)
    for i in range(n):
        h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < n - 1:
            h = np.tanh(h)
    return 0.5 * np.mean(np.sum((h - y) ** 2, axis=1))


def mlp_grad_np(params, x, y):
    """Hand-written backprop of :func:`mlp_loss_np` (float64)."""
    n = len(params)
    hs = [np.asarray(x, np.float64)]
    for i in range(n):
        z = hs[-1] @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        hs.append(np.tanh(z) if i < n - 1 else z)
    delta = (hs[-1] - y) / x.shape[0]
    grads = {}
    for i in reversed(range(n)):
        grads[f"Dense_{i}"] = {"kernel": hs[i].T @ delta, "bias": delta.sum(0)}
        if i:
            delta = (delta @ params[f"Dense_{i}"]["kernel"].T) * (1.0 - hs[i] ** 2)
    return grads


def mlp_loss_jax(params, x, y):
    """:func:`mlp_loss_np` in jax."""
    import jax.numpy as jnp

    return 0.5 * jnp.mean(jnp.sum((mlp_apply(params, x) - y) ** 2, axis=1))


def mlp_xent_jax(params, x, labels, activation=None):
    """Softmax cross-entropy of the MLP's logits against integer ``labels`` (jax)."""
    import jax.numpy as jnp
    import optax

    logits = mlp_apply(params, x, activation).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mlp_class_data(sizes, n=16, seed=1):
    """``(x float32 (n, d), integer labels (n,))`` for :func:`mlp_xent_jax`."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, sizes[0])).astype(np.float32)
    return x, rng.integers(0, sizes[-1], n)


# ----------------------------------------------------------------------------- trees


def subtree(tree, keep):
    """The nested-dict ``tree`` restricted to the leaves whose path is in ``keep``."""
    out = {}
    for path, x in jtu.tree_flatten_with_path(tree)[0]:
        key = keystr(path)
        if key in keep:
            *parents, leaf = key.split("/")
            node = out
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = x
    return out


# ----------------------------------------------------------------------------- Eq. 1


def eq1_multiplier(alpha: float, l: int, L: int) -> float:
    """Carbonnelle & De Vleeschouwer (2019), Eq. 1, written out (L = 1: multiplier 1)."""
    if L == 1:
        return 1.0
    if alpha > 0:
        return (1.0 - alpha) ** (5.0 * (L - 1 - l) / (L - 1))
    return (1.0 + alpha) ** (5.0 * l / (L - 1))


# ----------------------------------------------------------------------------- base directions


class NumpySGD:
    """The raw gradient as the step direction."""

    def __call__(self, grads):
        return grads


class NumpyAdam:
    """Adam's step direction (optax ``scale_by_adam`` defaults: b1=.9, b2=.999, eps=1e-8)."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-8):
        self.b1, self.b2, self.eps = b1, b2, eps
        self.m = self.v = None
        self.t = 0

    def __call__(self, grads):
        self.t += 1
        if self.m is None:
            self.m = {k: {n: np.zeros_like(g) for n, g in d.items()} for k, d in grads.items()}
            self.v = {k: {n: np.zeros_like(g) for n, g in d.items()} for k, d in grads.items()}
        out = {}
        for k, d in grads.items():
            out[k] = {}
            for n, g in d.items():
                self.m[k][n] = self.b1 * self.m[k][n] + (1 - self.b1) * g
                self.v[k][n] = self.b2 * self.v[k][n] + (1 - self.b2) * g * g
                mh = self.m[k][n] / (1 - self.b1**self.t)
                vh = self.v[k][n] / (1 - self.b2**self.t)
                out[k][n] = mh / (np.sqrt(vh) + self.eps)
        return out


# ----------------------------------------------------------------------------- Algorithm 1


def layca_step_np(w, s, w0_norm, rho):
    """One Layca step of one layer (Carbonnelle & De Vleeschouwer, 2019, Algorithm 1), float64.

    ``s`` is the optimizer's step in gradient convention (the update is ``-rho * s``).
    """
    w = np.asarray(w, np.float64)
    s = np.asarray(s, np.float64)
    s = s - (np.vdot(s, w) / np.vdot(w, w)) * w  # 1: project onto the tangent space
    s = s * np.linalg.norm(w) / np.linalg.norm(s)  # 2: rotation-based normalisation
    w = w - rho * s  # 3: step
    return w * w0_norm / np.linalg.norm(w)  # 4: back onto the initial sphere


def lars_step_np(w, s, w0_norm, rho, max_increase=1e-4):
    """One step of the authors' LARS variant (App. A.2 + footnote 7), float64."""
    w = np.asarray(w, np.float64)
    s = np.asarray(s, np.float64)
    s = s * np.linalg.norm(w) / np.linalg.norm(s)
    new = w - rho * s
    limit = np.linalg.norm(w) + max_increase * w0_norm
    if np.linalg.norm(new) - np.linalg.norm(w) > max_increase * w0_norm:
        new = new * limit / np.linalg.norm(new)
    return new


class Reference:
    """Layca (or the LARS variant) on an MLP-shaped params dict, one step at a time (float64).

    Layers are the kernels ``Dense_i/kernel`` in index order; ``‖w⁰‖`` is taken from
    ``params0``. Biases follow ``non_layer`` (``"base"``: ``w -= lr * s``; ``"freeze"``: kept;
    ``"normalize"``: the LARS step of their own norm at their layer's rate; default: the
    library's, ``"freeze"`` for Layca and ``"normalize"`` for LARS, as in the authors' code).
    ``step(params, grads)`` may be fed any params (e.g. the library's, to check one step).
    """

    def __init__(
        self, params0, lr, alpha=0.0, direction="sgd", variant="layca", non_layer=None, lr_at=None
    ):
        if non_layer is None:
            non_layer = "freeze" if variant == "layca" else "normalize"
        self.names = sorted(params0, key=lambda k: int(k.split("_")[1]))
        self.w0 = {
            k: np.linalg.norm(np.asarray(params0[k]["kernel"], np.float64)) for k in self.names
        }
        self.b0 = {
            k: np.linalg.norm(np.asarray(params0[k]["bias"], np.float64)) for k in self.names
        }
        self.opt = NumpyAdam() if direction == "adam" else NumpySGD()
        self.lr, self.alpha, self.variant, self.non_layer = lr, alpha, variant, non_layer
        self.lr_at = lr_at
        self.t = 0

    def step(self, params, grads):
        p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
        eta = self.lr if self.lr_at is None else self.lr_at(self.t)
        self.t += 1
        s = self.opt(grads)
        L = len(self.names)
        new = {}
        for l, k in enumerate(self.names):
            rho = eq1_multiplier(self.alpha, l, L) * eta
            fn = layca_step_np if self.variant == "layca" else lars_step_np
            kernel = fn(p[k]["kernel"], s[k]["kernel"], self.w0[k], rho)
            bias = p[k]["bias"]
            if self.non_layer == "base":
                bias = bias - eta * s[k]["bias"]
            elif self.non_layer == "normalize":
                bias = lars_step_np(bias, s[k]["bias"], self.b0[k], rho)
            new[k] = {"kernel": kernel, "bias": bias}
        return new


def reference_run(
    params,
    grad_fn,
    steps,
    lr,
    alpha=0.0,
    direction="sgd",
    variant="layca",
    non_layer=None,
    lr_at=None,
):
    """``steps`` free-running steps of :class:`Reference`; returns params after every step
    (float64), the first entry being the initial params."""
    ref = Reference(params, lr, alpha, direction, variant, non_layer, lr_at)
    p = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
    history = [p]
    for _ in range(steps):
        p = ref.step(p, grad_fn(p))
        history.append(p)
    return history


def to_jax(params):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def nnx_mlp(sizes, names, seed=0):
    """A flax.nnx MLP (tanh between layers) whose ``nnx.Linear`` layers are the attributes
    ``names``, in forward order (names that sort against it test the forward order)."""
    import jax.numpy as jnp
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            for name, (m, n) in zip(names, itertools.pairwise(sizes)):
                setattr(self, name, nnx.Linear(m, n, rngs=rngs))

        def __call__(self, x):
            for i, name in enumerate(names):
                x = getattr(self, name)(x)
                x = jnp.tanh(x) if i < len(names) - 1 else x
            return x

    return MLP(nnx.Rngs(seed))


# ----------------------------------------------------------------------------- a small LCA run


def small_lca_run(steps=3, iterations=(10, 11, 12)):
    """LCA of ``steps`` SGD steps of a 4-6-3 tanh classifier on 40 examples (with labels):
    ``(list of LCAResult, LCAHistory)``, for tests that consume LCA results."""
    import jax.numpy as jnp
    import optax

    from optax_layca import lca

    params = jax.tree.map(jnp.asarray, init_mlp((4, 6, 3), seed=2))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = rng.integers(0, 3, 40).astype(np.int32)

    def loss_fn(p, batch):
        xb, yb = batch
        h = jnp.tanh(xb @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb)

    opt = optax.sgd(0.3)
    state, traj = opt.init(params), [params]
    for _ in range(steps):
        g = jax.grad(lambda q: jnp.mean(loss_fn(q, (x, y))))(traj[-1])
        u, state = opt.update(g, state)
        traj.append(optax.apply_updates(traj[-1], u))
    results = [
        lca.allocate(loss_fn, a, b, (x, y), batch_size=16, labels=y) for a, b in zip(traj, traj[1:])
    ]
    return results, lca.stack_results(results, iterations=list(iterations))
