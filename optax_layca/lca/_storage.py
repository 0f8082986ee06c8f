"""Crash-safe, verifiable storage of an LCA run (one directory per run).

Layout:

* ``manifest.json`` — the run's identity, written once: the parameters (leaf names, shapes,
  dtypes, a hash of the initial values), the data (example count, shapes, dtypes, a content
  hash, with labels), the loss options (engines, classes, batch size, BatchNorm mode) and the
  integration settings (method, tol, max splits). ``run_id`` is a hash of that identity; every
  record file carries it.
* ``pending/it_XXXXXXXX.npz`` — one file per iteration, written as soon as it is computed;
  every ``chunk_size`` iterations they are merged into ``chunk_AAAAAAAA_BBBBBBBB.npz``
  (iterations ``A … B−1``) and only then deleted.
* ``progress.json`` — how many iterations are stored, rewritten after each record (so a
  deleted last chunk is noticed).
* ``LOCK`` — the writer's pid, host and a random token: one writer at a time.

Every file is written atomically (temp file in the same directory, flush, fsync,
``os.replace``, fsync of the directory), so a file exists complete or not at all. Each record
also stores a hash of the parameters before and after its step: consecutive records must
chain, which ties every chunk to one trajectory.

Chosen over Orbax: a record is small host-side numpy (never sharded), an ``.npz`` needs numpy
only to read, and a crash leaves whole files.

Readers (:func:`read_run`) never modify the directory: no lock, no cleanup, no merging; they
tolerate a live writer (a pending file merged away while listing is re-read) and verify
completeness: a missing, overlapping, renamed, truncated or foreign file raises
:class:`LCAStorageError` naming the file and what is wrong.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import socket
import time
import warnings
import weakref
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .. import _io
from .._io import write_npz

FORMAT = "optax_layca.lca/2"
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
LOCK = "LOCK"
CHUNK = re.compile(r"chunk_(\d{8})_(\d{8})\.npz$")
PENDING = re.compile(r"it_(\d{8})\.npz$")
HEADER_KEYS = ("iteration", "run_id", "params_before", "params_after")
SCALARS = (
    "total",
    "loss_change",
    "loss_before",
    "loss_after",
    "error",
    "noise_floor",
    "num_splits",
    "converged",
)
RECORD_KEYS = HEADER_KEYS + ("per_leaf",) + SCALARS


class LCAStorageError(ValueError):
    """An LCA run directory is incomplete, corrupt, locked or belongs to another run."""


# ----------------------------------------------------------------------------- writing


def write_json(path: Path, obj: Any) -> None:
    _io.write_json(path, obj, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------- reading


def read_json(path: Path, what: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise LCAStorageError(f"Cannot read {what} {str(path)!r}: {err}.") from err
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise LCAStorageError(
            f"{what} {str(path)!r} is not valid JSON (corrupt or truncated): {err}."
        ) from err
    if not isinstance(obj, dict):
        raise LCAStorageError(f"{what} {str(path)!r} holds a {type(obj).__name__}, not an object.")
    return obj


def _read_open_npz(f: Any, path: Path, keys: tuple[str, ...] | None) -> dict[str, np.ndarray]:
    if keys is None:  # a full read checks every entry's CRC-32 (np.load may stop short)
        with zipfile.ZipFile(f) as zf:
            bad = zf.testzip()
        if bad is not None:
            raise LCAStorageError(
                f"Record file {str(path)!r} is corrupt: entry {bad!r} fails its CRC-32 check."
            )
        f.seek(0)
    with np.load(f, allow_pickle=False) as z:
        names = set(z.files)
        missing = [k for k in (keys or RECORD_KEYS) if k not in names]
        if missing:
            raise LCAStorageError(
                f"Record file {str(path)!r} lacks the entries {missing} (not an LCA record)."
            )
        return {k: z[k] for k in (keys or z.files)}


def read_npz(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of one record file (all, or only ``keys``), or a clear error naming it."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise LCAStorageError(f"Record file {str(path)!r} is empty (0 bytes).")
            return _read_open_npz(f, path, keys)
    except (FileNotFoundError, LCAStorageError):
        raise
    # NotImplementedError/RuntimeError: zipfile's answers to flag bits a damaged byte can set
    # (an unsupported compression, "encrypted")
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        ValueError,
        OSError,
        KeyError,
        NotImplementedError,
        RuntimeError,
    ) as err:
        raise LCAStorageError(
            f"Record file {str(path)!r} is not a complete .npz archive (truncated or corrupt): "
            f"{type(err).__name__}: {err}."
        ) from err


# ----------------------------------------------------------------------------- lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Lock:
    """``directory/LOCK`` held by this process; a stale lock of a dead local process is
    taken over with a warning, any other held lock refuses."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK
        self.token = secrets.token_hex(8)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token}
        for _ in range(10):
            if self._try_create():
                return
            self._take_over_if_stale()
        raise LCAStorageError(f"Could not acquire {str(self.path)!r} (contended).")

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({**self.owner, "since": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over_if_stale(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return  # released meanwhile: retry
        except (ValueError, KeyError, TypeError, OSError):
            owner, pid, host = None, -1, socket.gethostname()  # half-written by a killed writer
        if host != socket.gethostname() or (pid >= 0 and _alive(pid)):
            raise LCAStorageError(
                f"{str(self.path.parent)!r} is being written by another LCA recorder (pid {pid} "
                f"on {host}); one writer at a time. If that process is gone, delete "
                f"{str(self.path)!r}."
            )
        stale = self.path.with_name(f"{LOCK}.stale.{os.getpid()}")
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return  # another process took it over first
        stale.unlink()
        warnings.warn(
            f"Took over the stale lock of {str(self.path.parent)!r} (writer pid {pid} on {host} "
            "is gone: killed or crashed).",
            RuntimeWarning,
            stacklevel=4,
        )

    def release(self) -> None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- identity


def run_id(identity: dict) -> str:
    return hashlib.blake2b(
        json.dumps(identity, sort_keys=True).encode(), digest_size=16
    ).hexdigest()


def identity_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two identities differ.

    Examples:
      >>> identity_diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 0})
      ['b.c', 'd']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += identity_diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        raise LCAStorageError(f"`directory={str(directory)!r}` holds no LCA run (no {MANIFEST}).")
    m = read_json(path, "LCA manifest")
    if m.get("format") != FORMAT:
        raise LCAStorageError(
            f"{str(path)!r} has format {m.get('format')!r}; this version reads {FORMAT!r}."
        )
    if not isinstance(m.get("identity"), dict) or m.get("run_id") != run_id(m["identity"]):
        raise LCAStorageError(f"{str(path)!r} is corrupt: its run_id does not match its identity.")
    return m


# ----------------------------------------------------------------------------- records


def _listing(directory: Path) -> tuple[list[tuple[int, int, Path]], dict[int, Path]]:
    """Pending files first, then chunks: a concurrent merge (chunk written, then pending
    deleted) can then only make an iteration appear twice, never vanish."""
    pend = directory / "pending"
    pending = {}
    if pend.is_dir():
        for p in pend.iterdir():
            if m := PENDING.match(p.name):
                pending[int(m[1])] = p
    chunks = sorted(
        (int(m[1]), int(m[2]), p) for p in directory.iterdir() if (m := CHUNK.match(p.name))
    )
    return chunks, pending


def _check_header(path: Path, arrays: dict, expected: np.ndarray, rid: str) -> None:
    its = np.atleast_1d(np.asarray(arrays["iteration"]))
    if its.shape != expected.shape or not np.array_equal(its, expected):
        raise LCAStorageError(
            f"Record file {str(path)!r} holds iterations {its.tolist()[:8]}… but its name "
            f"says {expected.tolist()[:8]}… (renamed or swapped file)."
        )
    ids = np.atleast_1d(np.asarray(arrays["run_id"]))
    if not np.all(ids == rid):
        raise LCAStorageError(
            f"Record file {str(path)!r} belongs to another run (run_id {ids[0]}, manifest "
            f"{rid}): the manifest or the file was replaced."
        )


def _check_shapes(path: Path, arrays: dict, rows: int | None, num_leaves: int) -> None:
    """Every entry has one row per iteration (chunks); per-leaf entries have ``K`` columns."""
    for k, v in arrays.items():
        v = np.asarray(v)
        if rows is not None and v.shape[:1] != (rows,):
            raise LCAStorageError(
                f"Record file {str(path)!r}: entry {k!r} has shape {v.shape}, expected {rows} rows."
            )
        if k.endswith("per_leaf") and v.shape[-1:] != (num_leaves,):
            raise LCAStorageError(
                f"Record file {str(path)!r}: entry {k!r} has {v.shape[-1:]} leaves, the run "
                f"{num_leaves}."
            )


def _rows(arrays: dict, n: int) -> list[dict]:
    return [{k: np.asarray(v)[i] for k, v in arrays.items()} for i in range(n)]


def scan_records(directory: Path, manifest: dict, keys: tuple[str, ...] | None) -> dict[int, tuple]:
    """``{iteration: (record, path)}`` of every stored iteration (only ``keys`` of each;
    all with None), each file verified against its name, its shapes and the run id."""
    rid = manifest["run_id"]
    num_leaves = len(manifest["identity"]["params"]["leaf_names"])
    if keys is not None:
        keys = tuple(dict.fromkeys(HEADER_KEYS + tuple(keys)))
    chunks, pending = _listing(directory)
    out: dict[int, tuple] = {}
    for a, b, path in chunks:
        if b <= a:
            raise LCAStorageError(f"Chunk file {str(path)!r} has an empty range {a}…{b - 1}.")
        arrays = read_npz(path, keys)
        _check_header(path, arrays, np.arange(a, b), rid)
        _check_shapes(path, arrays, b - a, num_leaves)
        for t, rec in zip(range(a, b), _rows(arrays, b - a)):
            if t in out:
                raise LCAStorageError(
                    f"Chunk files {str(out[t][1])!r} and {str(path)!r} both hold iteration {t}."
                )
            out[t] = (rec, path)
    for t, path in sorted(pending.items()):
        arrays = read_npz(path, keys)  # FileNotFoundError: merged meanwhile (caller retries)
        _check_header(path, arrays, np.asarray([t]), rid)
        _check_shapes(path, arrays, None, num_leaves)
        rec = _rows({k: np.asarray(v)[None] for k, v in arrays.items()}, 1)[0]
        if t in out:  # left over by a crash between a merge and the deletion: must agree
            if str(out[t][0]["params_after"]) != str(rec["params_after"]):
                raise LCAStorageError(
                    f"{str(path)!r} and {str(out[t][1])!r} disagree on iteration {t}."
                )
            continue
        out[t] = (rec, path)
    return out


def read_progress(directory: Path, manifest: dict) -> int:
    """Iterations the writer has declared stored (0 without a progress file)."""
    path = directory / PROGRESS
    try:
        progress = read_json(path, "LCA progress file")
    except FileNotFoundError:
        return 0
    if progress.get("run_id") != manifest["run_id"]:
        raise LCAStorageError(f"{str(path)!r} belongs to another run.")
    try:
        return int(progress["num_recorded"])
    except (KeyError, TypeError, ValueError) as err:
        raise LCAStorageError(f"{str(path)!r} is malformed: {err!r}.") from err


def check_complete(directory: Path, found: dict[int, tuple], manifest: dict, recorded: int) -> int:
    """Iterations ``0 … n−1`` present (``n >= recorded``), each record chained to the
    previous one; returns ``n``."""
    n = len(found)
    missing = sorted(set(range(n)) - set(found))
    if missing:
        t = missing[0]
        after = [str(p) for s, (_, p) in sorted(found.items()) if s > t][:1]
        raise LCAStorageError(
            f"{str(directory)!r} lacks iteration {t} (a deleted or renamed record file"
            + (f"; next file {after[0]!r})." if after else ").")
        )
    if n < recorded:
        raise LCAStorageError(
            f"{str(directory)!r} holds iterations 0…{n - 1} but {PROGRESS} says {recorded} "
            f"were recorded: the record file(s) of iterations {n}…{recorded - 1} are missing."
        )
    prev = manifest["identity"]["params"].get("init_hash")
    for t in range(n):
        rec, path = found[t]
        if prev is not None and str(rec["params_before"]) != prev:
            raise LCAStorageError(
                f"Iteration {t} in {str(path)!r} does not start where iteration {t - 1} ended "
                "(its parameters differ): files of different trajectories are mixed."
            )
        prev = str(rec["params_after"])
    return n


def read_run(directory: str | os.PathLike, keys: tuple[str, ...] | None = None):
    """``(manifest, records)`` of a run directory, read-only and verified.

    A live writer may merge pending files while they are listed; the listing is then read
    again (a few times) — never a partial view, never a modification.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    for attempt in range(20):
        try:
            recorded = read_progress(directory, manifest)  # before listing: a lower bound
            found = scan_records(directory, manifest, keys)
            n = check_complete(directory, found, manifest, recorded)
            return manifest, [found[t][0] for t in range(n)]
        except FileNotFoundError as err:
            if err.errno != errno.ENOENT or attempt == 19:
                raise LCAStorageError(
                    f"Files of {str(directory)!r} keep vanishing: {err}."
                ) from err
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- writer


class Store:
    """The single writer of a run directory (holds its :class:`Lock` until :meth:`close`)."""

    def __init__(self, directory: str | os.PathLike, chunk_size: int):
        self.dir = Path(directory)
        (self.dir / "pending").mkdir(parents=True, exist_ok=True)
        self.chunk_size = chunk_size
        self.lock = Lock(self.dir)
        self._finalizer = weakref.finalize(self, self.lock.release)
        self.manifest: dict | None = None
        self.index: dict[int, dict] = {}  # iteration -> header (hashes, loss_after)
        self.pending: dict[int, Path] = {}
        try:
            if (self.dir / MANIFEST).exists():
                self.manifest = read_manifest(self.dir)
                self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        for tmp in [*self.dir.glob("*.tmp"), *(self.dir / "pending").glob("*.tmp")]:
            tmp.unlink()  # half-written by a crashed writer (only the lock holder may clean)
        found = scan_records(self.dir, self.manifest, ("loss_after",))
        check_complete(self.dir, found, self.manifest, read_progress(self.dir, self.manifest))
        self.index = {t: rec for t, (rec, _) in found.items()}
        for t, path in _listing(self.dir)[1].items():
            if found[t][1] != path:
                path.unlink()  # merged into a chunk just before a crash (verified equal)
            else:
                self.pending[t] = path

    @property
    def num_recorded(self) -> int:
        return len(self.index)

    def create(self, identity: dict, info: dict) -> None:
        self.manifest = {"format": FORMAT, "run_id": run_id(identity), "identity": identity}
        write_json(self.dir / MANIFEST, {**self.manifest, "info": info})
        self._write_progress()

    def _write_progress(self) -> None:
        write_json(
            self.dir / PROGRESS,
            {"run_id": self.manifest["run_id"], "num_recorded": self.num_recorded},
        )

    def add(self, record: dict[str, np.ndarray]) -> None:
        t = int(record["iteration"])
        path = self.dir / "pending" / f"it_{t:08d}.npz"
        write_npz(path, {**record, "run_id": np.asarray(self.manifest["run_id"])})
        self.pending[t] = path
        self.index[t] = {k: record[k] for k in ("params_before", "params_after", "loss_after")}
        self._write_progress()
        if len(self.pending) >= self.chunk_size:
            self.flush()

    def flush(self) -> None:
        """Merges the pending records into one chunk file, then deletes them."""
        if not self.pending:
            return
        its = sorted(self.pending)
        if its != list(range(its[0], its[-1] + 1)):
            raise LCAStorageError(f"Pending iterations {its} of {str(self.dir)!r} have a gap.")
        recs = [read_npz(self.pending[t]) for t in its]
        arrays = {k: np.stack([np.asarray(r[k]) for r in recs]) for k in recs[0]}
        write_npz(self.dir / f"chunk_{its[0]:08d}_{its[-1] + 1:08d}.npz", arrays)
        for t in its:
            self.pending.pop(t).unlink()

    def close(self) -> None:
        """Releases the lock (also done when the store is garbage-collected or at exit)."""
        self._finalizer()
