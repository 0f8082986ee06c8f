"""LCA over a training run: a recorder for the training loop, an offline driver over a saved
trajectory, and the reader of a stored run (storage format: :mod:`._storage`)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from .._layers import path_str
from ._evaluate import hash_tree
from ._integrate import Stepper, check_params, make_evaluators
from ._options import LCAOptions, resolve
from ._result import LCAHistory, LCAResult
from ._storage import SCALARS, LCAStorageError, Store, identity_diff, read_run

# A resumed run re-evaluates the loss where the stored run stopped; the same loss on the same
# parameters and data agrees to float32 reduction-order noise (different device counts sum
# in different orders: a few ulps, ~1e-7 relative), far below what changing the loss does.
RESUME_LOSS_RTOL = 1e-6


def params_hash(params: Any) -> str:
    return hash_tree(params).hexdigest()


def _record_of(result: LCAResult, prefix: str, store_per_param: bool, store_grads: bool):
    rec = {prefix + "per_leaf": np.asarray([result.per_leaf[n] for n in result.leaf_names])}
    for k in SCALARS:
        rec[prefix + k] = np.asarray(getattr(result, k))
    if result.per_class_leaf is not None:
        rec[prefix + "per_class_leaf"] = np.asarray(result.per_class_leaf, np.float64)
        rec[prefix + "class_loss_change"] = np.asarray(result.class_loss_change, np.float64)
    for flag, field, tag in (
        (store_grads, "grad_before", "gr"),
        (store_per_param, "per_param", "pp"),
    ):
        if not flag:
            continue
        tree = getattr(result, field)
        if tree is None:
            raise ValueError(
                f"`store_{'grads' if tag == 'gr' else 'per_param'}=True` needs the 'grad' engine."
            )
        for i, x in enumerate(jax.tree.leaves(jax.device_get(tree))):
            rec[f"{prefix}{tag}{i}"] = np.asarray(x)
    return rec


def history_from_records(
    records: Sequence[dict], leaf_names: Sequence[str], method: str = "rk4", prefix: str = ""
) -> LCAHistory:
    """Builds an :class:`LCAHistory` from per-iteration records (dicts of arrays)."""
    names = tuple(leaf_names)
    if not records:
        z = np.zeros((0,))
        return LCAHistory(
            names,
            np.zeros((0, len(names))),
            z,
            z,
            z,
            z,
            z,
            z.astype(int),
            z.astype(bool),
            noise_floor=z,
            iterations=z.astype(int),
            method=method,
        )
    stack = lambda k: np.stack([np.asarray(r[prefix + k]) for r in records])
    first = records[0]

    def keyed(tag):
        keys = sorted(
            (
                k[len(prefix) + 2 :]
                for k in first
                if k.startswith(prefix + tag) and k[len(prefix) + 2 :].isdigit()
            ),
            key=int,
        )
        return {names[int(i)]: stack(tag + i) for i in keys} or None

    has_classes = prefix + "per_class_leaf" in first
    test = None
    if not prefix and "test_total" in first:
        test = history_from_records(records, names, method, prefix="test_")
    return LCAHistory(
        leaf_names=names,
        per_leaf=stack("per_leaf").astype(np.float64),
        **{k: stack(k).astype(np.float64) for k in SCALARS[:5]},
        num_splits=stack("num_splits").astype(np.int64),
        converged=stack("converged").astype(bool),
        noise_floor=stack("noise_floor").astype(np.float64),
        per_class_leaf=stack("per_class_leaf") if has_classes else None,
        class_loss_change=stack("class_loss_change") if has_classes else None,
        per_param=keyed("pp"),
        grad_before=keyed("gr"),
        iterations=np.asarray([int(r["iteration"]) for r in records], np.int64),
        method=method,
        test=test,
    )


class LCARecorder:
    """Records the LCA of every training step; call it with the params after each step.

    The full-dataset gradient at the end of step ``t`` is the start of step ``t + 1``, so RK4 with
    the ``grad`` engine costs about two full-dataset passes per step. With ``directory`` every
    iteration is saved at once (crash-safe, verified on read, see :mod:`._storage`) and
    re-creating the recorder on the same directory resumes: :attr:`num_recorded` is the first
    missing iteration. The directory is locked while the recorder is open (one writer; a lock
    left by a killed process is taken over with a warning); :meth:`close` it, or use it as a
    context manager. Resuming checks that it is the same run: the manifest (initial params,
    data, loss options, integration settings), the parameters where the run resumes (hash
    chain of the stored steps) and the loss there.

    Args:
      loss_fn, data, labels, test_data, test_labels: as in :func:`~optax_layca.lca.allocate`
        (``data``/``test_data`` may be :class:`~optax_layca.lca.Evaluator`\\ s).
      directory: where to store records (None: kept in memory only).
      chunk_size: iterations per chunk file.
      store_per_param: also store the per-parameter LCA (≈ params size per iteration).
      store_grads: also store the full-dataset gradient at the start of each step (for
        :func:`~optax_layca.lca.oscillations`; ≈ params size per iteration).
      keep_results: keep the returned ``LCAResult``\\ s in :attr:`results` (memory).
      options: an :class:`~optax_layca.lca.LCAOptions`.
      **overrides: any of its fields, overriding ``options``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> x = np.linspace(-1, 1, 16, dtype=np.float32)
      >>> rec = LCARecorder(lambda w, b: (w * b - 0.5) ** 2, x)
      >>> w = jnp.float32(0.0)
      >>> rec.start(w)
      >>> for _ in range(3):
      ...     w = w - 0.5 * jax.grad(lambda w: jnp.mean((w * x - 0.5) ** 2))(w)
      ...     _ = rec(w)
      >>> h = rec.history()
      >>> bool(np.all(np.abs(h.error) <= 1e-6)), rec.evaluator.num_evaluations
      (True, 7)
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], Any] | None,
        data: Any,
        *,
        labels: Any = None,
        test_data: Any = None,
        test_labels: Any = None,
        directory: str | os.PathLike | None = None,
        chunk_size: int = 100,
        store_per_param: bool = False,
        store_grads: bool = False,
        keep_results: bool = False,
        options: LCAOptions | None = None,
        **overrides: Any,
    ):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive int; got {chunk_size!r}.")
        self.options = resolve(options, overrides, "LCARecorder")
        self.evaluators = make_evaluators(
            loss_fn, data, labels, test_data, test_labels, self.options
        )
        self.evaluator = self.evaluators[0]
        self.store_per_param, self.store_grads = bool(store_per_param), bool(store_grads)
        self.keep_results = keep_results
        self.results: list[LCAResult] = []
        self._memory: list[dict] = []
        self._stepper: Stepper | None = None
        self._prev = self._prev_hash = None
        self._check_loss_at: int | None = None
        self.iteration: int | None = None
        self._store = Store(directory, chunk_size) if directory is not None else None
        self.leaf_names: tuple[str, ...] | None = None
        if self._store is not None and self._store.manifest is not None:
            self.leaf_names = tuple(self._store.manifest["identity"]["params"]["leaf_names"])

    # ------------------------------------------------------------------ identity

    def _identity(self, params: Any, init_hash: str | None) -> dict:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        o = self.options
        strategies = [t.strategy for t in self._stepper.tracks]
        evs = self.evaluators
        return {
            "params": {
                "leaf_names": [path_str(p) for p, _ in leaves],
                "shapes": [list(np.shape(x)) for _, x in leaves],
                "dtypes": [np.dtype(jax.numpy.result_type(x)).str for _, x in leaves],
                "init_hash": init_hash,
            },
            "data": {
                "train": evs[0].fingerprint(),
                "test": evs[1].fingerprint() if len(evs) > 1 else None,
            },
            "loss": {
                "engines": list(o.engines),
                "batch_size": [ev.requested_batch_size for ev in evs],
                "bn_mode": [ev.bn_mode for ev in evs],
                "num_classes": [ev.num_classes for ev in evs],
                "class_strategy": strategies,
            },
            "integration": {
                "method": o.method,
                "tol": o.tol,
                "max_splits": o.max_splits,
                "refine_on_test": o.refine_on_test,
            },
            "storage": {"store_per_param": self.store_per_param, "store_grads": self.store_grads},
        }

    def _open_run(self, params: Any, iteration: int, h: str) -> None:
        store = self._store
        ident = self._identity(params, h if iteration == 0 else None)
        if store.manifest is None:
            if iteration:
                raise ValueError(
                    f"`start(iteration={iteration})`: {str(store.dir)!r} holds no run yet; "
                    "start at iteration 0."
                )
            info = {
                "loss_fn": getattr(
                    self.evaluator.loss_fn, "__qualname__", repr(self.evaluator.loss_fn)
                ),
                "host": socket.gethostname(),
                "created": time.time(),
            }
            store.create(ident, info)
            return
        old = store.manifest["identity"]
        if iteration:
            ident["params"]["init_hash"] = old["params"].get("init_hash")
        diff = identity_diff(old, ident)
        if diff:
            raise LCAStorageError(
                f"`directory={str(store.dir)!r}` holds a different LCA run: it differs in "
                f"{', '.join(diff)}. Use a new directory (or the original run's settings)."
            )
        self._check_chain(iteration, h)

    def _check_chain(self, iteration: int, h: str) -> None:
        n = self.num_recorded
        if iteration > n:
            raise ValueError(
                f"`start(iteration={iteration})` would skip iterations {n}…{iteration - 1}, "
                f"which are not recorded; restart from iteration <= {n}."
            )
        if iteration and str(self._store.index[iteration - 1]["params_after"]) != h:
            raise LCAStorageError(
                f"`start(params, iteration={iteration})`: these params are not the ones the "
                f"stored run reached after iteration {iteration - 1} (another seed, data order "
                "or checkpoint?). Use a new directory."
            )
        if iteration == n and iteration:
            self._check_loss_at = iteration

    def check_initial_params(self, params: Any) -> None:
        """Raises unless ``params`` are the stored run's initial parameters (``θ_0``)."""
        if self._store is None or self._store.manifest is None:
            return
        stored = self._store.manifest["identity"]["params"].get("init_hash")
        if stored != params_hash(params):
            raise LCAStorageError(
                f"`directory={str(self._store.dir)!r}` holds a different LCA run: it differs in "
                "params.init_hash (another initialisation). Use a new directory."
            )

    # ------------------------------------------------------------------ recording

    @property
    def num_recorded(self) -> int:
        """Iterations ``0 … num_recorded − 1`` are stored; the next one to compute."""
        if self._store is not None:
            return self._store.num_recorded
        return len(self._memory)

    def start(self, params: Any, iteration: int = 0) -> None:
        """Sets the params *before* step ``iteration`` (the initial params, or a checkpoint's)."""
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"`start(iteration=...)` must be an int >= 0; got {iteration!r}.")
        for ev in self.evaluators:
            ev.prepare(params)
        names = tuple(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
        self._stepper = Stepper(self.evaluators, self.options, len(names))
        h = self._hash(params)
        if self._store is not None:
            self._open_run(params, iteration, h)
        elif iteration > self.num_recorded:
            raise ValueError(
                f"`start(iteration={iteration})` would skip iterations {self.num_recorded}…"
                f"{iteration - 1}, which are not recorded; restart from iteration "
                f"<= {self.num_recorded}."
            )
        self.leaf_names = names
        self._prev, self._prev_hash, self.iteration = params, h, iteration

    def _hash(self, params: Any) -> str:
        """Hash of ``params`` (ties stored records into a chain); not needed in memory."""
        return params_hash(params) if self._store is not None else ""

    def _replay(self, t: int, h: str) -> None:
        if self._store is not None and str(self._store.index[t]["params_after"]) != h:
            raise LCAStorageError(
                f"The params after iteration {t} differ from the stored run's (another seed or "
                "data order?); its records would not describe this trajectory."
            )
        self._stepper.reset()  # the start of the next step is not cached

    def _check_resumed_loss(self, t: int, result: LCAResult) -> None:
        stored = float(self._store.index[t - 1]["loss_after"])
        tol = RESUME_LOSS_RTOL * abs(stored) + 2 * float(result.noise_floor)
        if abs(float(result.loss_before) - stored) > tol:
            raise LCAStorageError(
                f"Resumed at iteration {t}: the loss there is {float(result.loss_before)!r} but "
                f"the stored run ended iteration {t - 1} at {stored!r} (same params and data, so "
                "`loss_fn` differs). Use a new directory."
            )
        self._check_loss_at = None

    def __call__(self, params: Any) -> LCAResult | None:
        """Allocates step ``iteration`` (previous params → ``params``) and advances.

        Returns the step's ``LCAResult``, or None when that iteration was already stored (a
        resumed run replaying steps).
        """
        if self._stepper is None:
            raise ValueError("Call `recorder.start(initial_params)` before recording steps.")
        check_params(self._prev, params)
        t, h = self.iteration, self._hash(params)
        result = None
        if t < self.num_recorded:
            self._replay(t, h)
        else:
            result = self._stepper.step(self._prev, params, keep_end=True)
            if self._check_loss_at == t:
                self._check_resumed_loss(t, result)
            self._save(result, t, h)
        self._prev, self._prev_hash, self.iteration = params, h, t + 1
        return result

    def _save(self, result: LCAResult, t: int, h: str) -> None:
        rec = {
            "iteration": np.asarray(t, np.int64),
            "params_before": np.asarray(self._prev_hash),
            "params_after": np.asarray(h),
        }
        rec.update(_record_of(result, "", self.store_per_param, self.store_grads))
        if result.test is not None:
            rec.update(_record_of(result.test, "test_", self.store_per_param, False))
        if self._store is not None:
            self._store.add(rec)
        else:
            self._memory.append(rec)
        if self.keep_results:
            self.results.append(result)

    def flush(self) -> None:
        """Merges pending per-iteration files into a chunk (also done every ``chunk_size``)."""
        if self._store is not None:
            self._store.flush()

    def close(self) -> None:
        """Flushes and releases the directory's lock."""
        if self._store is not None:
            self._store.flush()
            self._store.close()

    def __enter__(self) -> LCARecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def history(self) -> LCAHistory:
        """Every recorded iteration (disk and memory) as an :class:`LCAHistory`."""
        if self._store is not None and self._store.manifest is not None:
            return load_trajectory(self._store.dir)
        method = self.options.method
        return history_from_records(list(self._memory), self.leaf_names or (), method)


def load_trajectory(directory: str | os.PathLike) -> LCAHistory:
    """Reads a run stored by :class:`LCARecorder` / :func:`allocate_trajectory`.

    Read-only (works on a read-only copy, never disturbs a live writer) and verified: every
    iteration ``0 … T−1`` present once, each file's contents matching its name and the run's
    manifest, consecutive steps chained; otherwise :class:`~optax_layca.lca.LCAStorageError`
    names the file and what is wrong.
    """
    manifest, records = read_run(directory)
    ident = manifest["identity"]
    return history_from_records(
        records, ident["params"]["leaf_names"], ident["integration"]["method"]
    )


def allocate_trajectory(
    loss_fn: Callable[[Any, Any], Any] | None,
    trajectory: Sequence[Any],
    data: Any,
    *,
    directory: str | os.PathLike | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> LCAHistory:
    """LCA of every step of a saved trajectory ``θ_0, θ_1, …, θ_T`` (offline, resumable).

    Args:
      loss_fn, data: as in :func:`~optax_layca.lca.allocate`.
      trajectory: a sequence of ``T + 1`` param pytrees (may be lazy: any object with
        ``__len__`` and ``__getitem__``, e.g. one that loads checkpoint ``t`` from disk).
      directory: storage directory; an interrupted run resumes at its first missing iteration.
      progress: show a tqdm progress bar when tqdm is installed.
      **kwargs: passed to :class:`LCARecorder` (``labels``, ``test_data``, ``chunk_size``,
        ``store_per_param``, ``options`` and any :class:`LCAOptions` field).

    Returns:
      The :class:`LCAHistory` of all ``T`` steps.
    """
    n = len(trajectory)
    if n < 2:
        raise ValueError(f"`trajectory` needs at least 2 param snapshots; got {n}.")
    rec = LCARecorder(loss_fn, data, directory=directory, **kwargs)
    try:
        first = min(rec.num_recorded, n - 1)
        if first:
            rec.check_initial_params(trajectory[0])
        rec.start(trajectory[first], iteration=first)
        steps = range(first + 1, n)
        if progress:
            try:
                from tqdm.auto import tqdm

                steps = tqdm(steps, desc="LCA", initial=first, total=n - 1)
            except ImportError:  # optional dependency
                pass
        for t in steps:
            rec(trajectory[t])
        rec.flush()
        return rec.history()
    finally:
        rec.close()
