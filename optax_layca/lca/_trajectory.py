"""LCA over a training run: a recorder for the training loop, an offline driver over a saved
trajectory, and crash-safe chunked storage.

Storage format — ``.npz`` chunks with atomic rename (chosen over Orbax):

* a record per iteration is small (per-leaf LCA, scalars, optionally per-class and the
  per-parameter LCA ≈ the size of the params), host-side numpy, never sharded: Orbax's strengths
  (async sharded checkpoints of device arrays, one directory per step with metadata trees) buy
  nothing here and cost a directory per iteration plus a heavy dependency at read time;
* an ``.npz`` needs numpy only, so a finished run can be read anywhere (a notebook, a CPU box);
* crash safety comes from POSIX ``os.replace``: every file is written to ``*.tmp`` and renamed,
  so a file either exists complete or not at all. Each iteration is written at once to
  ``pending/it_XXXXXXXX.npz``; every ``chunk_size`` iterations the pending records are merged
  into ``chunk_XXXXXXXX_YYYYYYYY.npz`` (atomic) and only then deleted. After a crash at any
  point, re-opening the directory finds every finished iteration (in a chunk or pending; a
  pending record duplicated by a chunk is dropped) and resumes at the first missing one: no
  iteration is lost and none is recomputed.
* ``meta.json`` holds the leaf names and settings; re-opening with different ones raises.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .._layers import path_str
from ._evaluate import make_evaluator
from ._integrate import Stepper, check_params, resolve_options
from ._result import LCAHistory, LCAResult

_SCALARS = ("total", "loss_change", "loss_before", "loss_after", "error", "num_splits", "converged")
_CHUNK = re.compile(r"chunk_(\d{8})_(\d{8})\.npz$")
_PENDING = re.compile(r"it_(\d{8})\.npz$")


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _record(
    result: LCAResult, iteration: int, store_per_param: bool, store_grads: bool = False
) -> dict[str, np.ndarray]:
    rec = {
        "iteration": np.asarray(iteration, np.int64),
        "per_layer": np.asarray([result.per_layer[n] for n in result.layer_names], np.float64),
    }
    for k in _SCALARS:
        rec[k] = np.asarray(getattr(result, k))
    if result.per_class is not None:
        rec["per_class"] = np.asarray(result.per_class, np.float64)
        rec["class_loss_change"] = np.asarray(result.class_loss_change, np.float64)
    if store_grads:
        if result.grad_before is None:
            raise ValueError("`store_grads=True` needs the 'grad' engine.")
        for i, x in enumerate(jax.tree.leaves(jax.device_get(result.grad_before))):
            rec[f"gr{i}"] = np.asarray(x)
    if store_per_param:
        if result.per_param is None:
            raise ValueError("`store_per_param=True` needs the 'grad' engine.")
        for i, x in enumerate(jax.tree.leaves(jax.device_get(result.per_param))):
            rec[f"pp{i}"] = np.asarray(x)
    return rec


def history_from_records(
    records: Sequence[dict], layer_names: Sequence[str], method: str = "rk4"
) -> LCAHistory:
    """Builds an :class:`LCAHistory` from per-iteration records (dicts of arrays)."""
    names = tuple(layer_names)
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
            iterations=z.astype(int),
            method=method,
        )
    stack = lambda k: np.stack([np.asarray(r[k]) for r in records])

    def keyed(prefix):
        keys = sorted((k for k in records[0] if k.startswith(prefix)), key=lambda k: int(k[2:]))
        return {names[int(k[2:])]: stack(k) for k in keys} or None

    return LCAHistory(
        layer_names=names,
        per_layer=stack("per_layer"),
        total=stack("total").astype(np.float64),
        loss_change=stack("loss_change").astype(np.float64),
        loss_before=stack("loss_before").astype(np.float64),
        loss_after=stack("loss_after").astype(np.float64),
        error=stack("error").astype(np.float64),
        num_splits=stack("num_splits").astype(np.int64),
        converged=stack("converged").astype(bool),
        per_class=stack("per_class") if "per_class" in records[0] else None,
        class_loss_change=stack("class_loss_change") if "per_class" in records[0] else None,
        per_param=keyed("pp"),
        grad_before=keyed("gr"),
        iterations=stack("iteration").astype(np.int64),
        method=method,
    )


class _Store:
    """Chunked, crash-safe storage of per-iteration records (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, meta: dict, chunk_size: int):
        self.dir = Path(directory)
        self.pending_dir = self.dir / "pending"
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.chunk_size = chunk_size
        meta_path = self.dir / "meta.json"
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if old != meta:
                diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
                raise ValueError(
                    f"`directory={str(self.dir)!r}` holds an LCA run with different settings "
                    f"({', '.join(diff)}); use a new directory."
                )
        else:
            meta_path.with_name("meta.json.tmp").write_text(json.dumps(meta, indent=1))
            os.replace(meta_path.with_name("meta.json.tmp"), meta_path)
        self.meta = meta
        for tmp in list(self.dir.glob("*.tmp")) + list(self.pending_dir.glob("*.tmp")):
            tmp.unlink()  # half-written by a crash
        self.chunks = sorted(
            (int(m[1]), int(m[2]), p) for p in self.dir.iterdir() if (m := _CHUNK.match(p.name))
        )
        in_chunks = set()
        for a, b, _ in self.chunks:
            in_chunks.update(range(a, b))
        self.pending: dict[int, Path] = {}
        for p in self.pending_dir.iterdir():
            m = _PENDING.match(p.name)
            if not m:
                continue
            t = int(m[1])
            if t in in_chunks:
                p.unlink()  # merged into a chunk just before a crash
            else:
                self.pending[t] = p
        done = in_chunks | set(self.pending)
        n = 0
        while n in done:
            n += 1
        self.num_recorded = n

    def add(self, record: dict) -> None:
        t = int(record["iteration"])
        path = self.pending_dir / f"it_{t:08d}.npz"
        _atomic_savez(path, record)
        self.pending[t] = path
        self.num_recorded = max(self.num_recorded, t + 1)
        if len(self.pending) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        its = sorted(self.pending)
        recs = [dict(np.load(self.pending[t])) for t in its]
        arrays = {k: np.stack([r[k] for r in recs]) for k in recs[0]}
        a, b = its[0], its[-1] + 1
        path = self.dir / f"chunk_{a:08d}_{b:08d}.npz"
        _atomic_savez(path, arrays)
        self.chunks.append((a, b, path))
        for t in its:
            self.pending.pop(t).unlink()

    def records(self) -> list[dict]:
        out = {}
        for _, _, path in self.chunks:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            for i, t in enumerate(arrays["iteration"]):
                out[int(t)] = {k: v[i] for k, v in arrays.items()}
        for t, path in self.pending.items():
            with np.load(path) as z:
                out[t] = {k: z[k] for k in z.files}
        return [out[t] for t in sorted(out)]


class LCARecorder:
    """Records the LCA of every training step; call it with the params after each step.

    The full-dataset gradient at the end of step ``t`` is the start of step ``t + 1``, so RK4 with
    the ``grad`` engine costs about two full-dataset passes per step. With ``directory`` every
    iteration is saved at once (crash-safe, see the module docstring) and re-creating the
    recorder on the same directory resumes: :attr:`num_recorded` is the first missing iteration.

    Args:
      loss_fn, data: as in :func:`~optax_layca.lca.allocate` (``data`` may be an Evaluator).
      directory: where to store records (None: kept in memory only).
      chunk_size: iterations per chunk file.
      store_per_param: also store the per-parameter LCA (≈ params size per iteration).
      store_grads: also store the full-dataset gradient at the start of each step (for
        :func:`~optax_layca.lca.oscillations`; ≈ params size per iteration).
      keep_results: keep the returned ``LCAResult``s in :attr:`results` (memory).
      **kwargs: ``method``, ``tol``, ``max_splits``, ``engines``, ``labels``, ``class_fn``,
        ``num_classes``, ``class_strategy``, ``batch_size`` as in ``allocate``.

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
      >>> np.allclose(h.total, h.loss_change, atol=1e-6), rec.evaluator.num_evaluations
      (True, 7)
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], Any],
        data: Any,
        *,
        directory: str | os.PathLike | None = None,
        chunk_size: int = 100,
        store_per_param: bool = False,
        store_grads: bool = False,
        keep_results: bool = False,
        method: str = "rk4",
        tol: float = 1e-3,
        max_splits: int = 32,
        engines: str | Sequence[str] = ("grad",),
        labels: Any = None,
        class_fn: Callable[[Any], Any] | None = None,
        num_classes: int | None = None,
        class_strategy: str = "auto",
        batch_size: int | None = None,
    ):
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive int; got {chunk_size!r}.")
        self.evaluator = make_evaluator(loss_fn, data, batch_size, labels, class_fn, num_classes)
        self._settings = {
            "method": method,
            "tol": tol,
            "max_splits": max_splits,
            "engines": engines,
            "class_strategy": class_strategy,
        }
        resolve_options(method, tol, max_splits, engines, class_strategy, 1, 0)  # validate early
        self.directory = directory
        self.chunk_size = chunk_size
        self.store_per_param = store_per_param
        self.store_grads = store_grads
        self.keep_results = keep_results
        self.results: list[LCAResult] = []
        self._memory: list[dict] = []
        self._store: _Store | None = None
        self._stepper: Stepper | None = None
        self._prev = None
        self.iteration = None
        self.layer_names: tuple[str, ...] | None = None
        if directory is not None and (Path(directory) / "meta.json").exists():
            meta = json.loads((Path(directory) / "meta.json").read_text())
            self.layer_names = tuple(meta["layer_names"])
            self._open_store(meta)

    def _meta(self, params) -> dict:
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        return {
            "format": "optax_layca.lca/1",
            "layer_names": [path_str(p) for p, _ in leaves],
            "shapes": [list(np.shape(x)) for _, x in leaves],
            "method": self._settings["method"],
            "tol": float(self._settings["tol"]),
            "max_splits": int(self._settings["max_splits"]),
            "engines": sorted(
                [self._settings["engines"]]
                if isinstance(self._settings["engines"], str)
                else self._settings["engines"]
            ),
            "num_classes": int(self.evaluator.num_classes),
            "store_per_param": bool(self.store_per_param),
            "store_grads": bool(self.store_grads),
        }

    def _open_store(self, meta):
        self._store = _Store(self.directory, meta, self.chunk_size)

    @property
    def num_recorded(self) -> int:
        """Iterations ``0 … num_recorded − 1`` are stored; the next one to compute."""
        if self._store is not None:
            return self._store.num_recorded
        return int(self._memory[-1]["iteration"]) + 1 if self._memory else 0

    def start(self, params: Any, iteration: int = 0) -> None:
        """Sets the params *before* step ``iteration`` (the initial params, or a checkpoint's)."""
        names = tuple(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
        meta = self._meta(params)
        if self.directory is not None and (self._store is None or self._store.meta != meta):
            self._open_store(meta)
        if self._store is not None and iteration > self.num_recorded:
            raise ValueError(
                f"`start(iteration={iteration})` would skip iterations {self.num_recorded}…"
                f"{iteration - 1}, which are not recorded; restart from iteration "
                f"<= {self.num_recorded}."
            )
        self.layer_names = names
        opts = resolve_options(
            **self._settings, num_leaves=len(names), num_classes=self.evaluator.num_classes
        )
        self._stepper = Stepper(self.evaluator, opts)
        self._prev = params
        self.iteration = int(iteration)

    def __call__(self, params: Any) -> LCAResult | None:
        """Allocates step ``iteration`` (previous params → ``params``) and advances.

        Returns the step's ``LCAResult``, or None when that iteration was already stored (a
        resumed run replaying steps).
        """
        if self._stepper is None:
            raise ValueError("Call `recorder.start(initial_params)` before recording steps.")
        check_params(self._prev, params)
        t = self.iteration
        result = None
        if t < self.num_recorded:
            self._stepper.reset()  # start of the next step is not cached
        else:
            result = self._stepper.step(self._prev, params, keep_end=True)
            rec = _record(result, t, self.store_per_param, self.store_grads)
            if self._store is not None:
                self._store.add(rec)
            else:
                self._memory.append(rec)
            if self.keep_results:
                self.results.append(result)
        self._prev = params
        self.iteration = t + 1
        return result

    def flush(self) -> None:
        """Merges pending per-iteration files into a chunk (also done every ``chunk_size``)."""
        if self._store is not None:
            self._store.flush()

    def history(self) -> LCAHistory:
        """Every recorded iteration (disk and memory) as an :class:`LCAHistory`."""
        records = self._store.records() if self._store is not None else list(self._memory)
        return history_from_records(records, self.layer_names or (), self._settings["method"])


def load_trajectory(directory: str | os.PathLike) -> LCAHistory:
    """Reads a run stored by :class:`LCARecorder` / :func:`allocate_trajectory`."""
    meta_path = Path(directory) / "meta.json"
    if not meta_path.exists():
        raise ValueError(f"`directory={str(directory)!r}` holds no LCA run (no meta.json).")
    meta = json.loads(meta_path.read_text())
    store = _Store(directory, meta, chunk_size=1 << 30)
    return history_from_records(store.records(), meta["layer_names"], meta["method"])


def allocate_trajectory(
    loss_fn: Callable[[Any, Any], Any],
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
      **kwargs: passed to :class:`LCARecorder` (``method``, ``tol``, ``engines``, ``labels``,
        ``chunk_size``, ``store_per_param``, …).

    Returns:
      The :class:`LCAHistory` of all ``T`` steps.
    """
    n = len(trajectory)
    if n < 2:
        raise ValueError(f"`trajectory` needs at least 2 param snapshots; got {n}.")
    rec = LCARecorder(loss_fn, data, directory=directory, **kwargs)
    first = rec.num_recorded if directory is not None else 0
    first = min(first, n - 1)
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
