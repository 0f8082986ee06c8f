"""Atomic files: every record the package writes exists complete or not at all.

A file is written to a temporary name in its own directory, flushed and fsynced, then moved
onto its name with ``os.replace`` (atomic on POSIX and Windows) and the directory is fsynced,
so a process killed mid-write, or a full disk, leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def fsync_dir(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Writes ``path`` through ``write(binary_file)``: temp file, flush, fsync, ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> None:
    """``obj`` as JSON, atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, **dumps_kwargs).encode()))


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` as an uncompressed ``.npz``, atomically (never a pickle)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))
