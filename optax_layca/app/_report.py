"""Writing what ``optax-layca`` produces: JSON records, Markdown reports, figures, histories.

Every file is written atomically (a temporary file in the same folder, flushed and fsynced,
then ``os.replace``): a reader, or a run killed half-way, sees the previous file or the
complete new one, never a truncated one. Every record carries the identity of the run that
wrote it (:func:`run_identity`). Several experiments share one ``report.md``: each owns a
section between markers, replaced in place under an exclusive lock (:func:`merge_report_section`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .. import _io

__all__ = [
    "OutputError",
    "check_writable",
    "file_digest",
    "md_table",
    "merge_report_section",
    "read_json",
    "run_identity",
    "save_figure",
    "save_history",
    "to_json",
    "write_json",
    "write_text",
]

JSON_FORMAT = "optax_layca.app/2"


class OutputError(OSError):
    """An output folder or file cannot be written (reported as one line by the command)."""


def write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    _io.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def to_json(x: Any, digits: int = 7) -> Any:
    """JSON-ready copy of ``x``: numpy to lists, floats rounded to ``digits`` significant
    digits, non-finite floats to None (JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): to_json(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v, digits) for v in x]
    if isinstance(x, np.ndarray):
        return to_json(x.tolist(), digits)
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return float(f"{x:.{digits}g}") if math.isfinite(x) else None
    return x


def write_json(path: str, obj: Mapping[str, Any]) -> None:
    """Writes ``obj`` (through :func:`to_json`) to ``path`` atomically, with a ``complete``
    marker that :func:`read_json` checks."""
    text = json.dumps({**to_json(obj), "complete": True}, indent=1, allow_nan=False)
    write_text(path, text + "\n")


def read_json(path: str) -> dict[str, Any]:
    """Reads a file written by :func:`write_json`; refuses one without its ``complete``
    marker or of another format."""
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if obj.get("complete") is not True or obj.get("identity", {}).get("format") != JSON_FORMAT:
        raise ValueError(f"{path} is not a complete optax-layca record ({JSON_FORMAT}).")
    return obj


def save_figure(fig: Any, path: str, dpi: int = 110) -> str:
    """Saves a matplotlib figure atomically, closes it, returns the file name."""
    import matplotlib.pyplot as plt

    fmt = os.path.splitext(path)[1].lstrip(".") or None
    try:
        _io.atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return os.path.basename(path)


def save_history(history: Any, path: str) -> dict[str, str]:
    """Saves a :class:`~optax_layca.rotation.RotationHistory` atomically (``.npz``); returns
    ``{"file": relative name, "blake2b": digest}`` for the record that refers to it."""
    history.save(path)  # atomic itself
    return {"file": os.path.basename(path), "blake2b": file_digest(path)}


def file_digest(path: str) -> str:
    """blake2b (16 bytes, hex) of a file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_writable(out: str) -> None:
    """Creates ``out`` and writes (then removes) a probe file in it, so that an unusable
    output folder fails before any training. Raises :class:`OutputError`."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {out!r}: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"output folder {out!r} is not writable: {e.strerror or e}") from None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    out = {"optax_layca": __version__}
    for pkg in ("jax", "jaxlib", "optax", "flax", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            out[pkg] = "absent"
    return out


def run_identity(command: str, config: Any, task: Any, **extra: Any) -> dict[str, Any]:
    """What identifies the run behind a record: command, configuration, seed, library
    versions and the dataset's fingerprint (so two records can be compared, or refused)."""
    data = task.data
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {
        "format": JSON_FORMAT,
        "command": command,
        "config": cfg,
        "seed": cfg.get("seed"),
        "versions": _versions(),
        "dataset": {
            "name": data.name,
            "fingerprint": data.fingerprint(),
            "train": len(data.x_train),
            "test": len(data.x_test),
            "input_shape": list(data.input_shape),
            "num_classes": int(data.num_classes),
        },
        "layers": list(task.order),
        "steps_per_epoch": task.steps_per_epoch,
        **extra,
    }


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


_BEGIN, _END = "<!-- optax-layca section: {} -->", "<!-- end of section: {} -->"


def _sections(text: str) -> dict[str, str]:
    pattern = re.compile(
        r"<!-- optax-layca section: (?P<name>[\w.-]+) -->\n(?P<body>.*?)"
        r"<!-- end of section: (?P=name) -->\n?",
        re.S,
    )
    return {m["name"]: m["body"] for m in pattern.finditer(text)}


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    folder, name = os.path.split(path)
    with open(os.path.join(folder, f".{name}.lock"), "a") as lock:  # hidden, kept: no race
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge_report_section(
    path: str,
    name: str,
    body: str,
    *,
    title: str,
    order: Callable[[str], Any] | None = None,
) -> None:
    """Puts ``body`` as section ``name`` of the Markdown report ``path``; keeps the others.

    The read-modify-write runs under an exclusive lock (``.report.md.lock`` beside it) and
    the file is replaced atomically, so experiments run one after another, or at once, all
    end up in the report. Sections are sorted with ``order(name)`` (default: by name).
    """
    with _locked(path):
        try:
            with open(path, encoding="utf-8") as f:
                sections = _sections(f.read())
        except FileNotFoundError:
            sections = {}
        sections[name] = body.rstrip("\n") + "\n"
        parts = [f"# {title}", ""]
        for key in sorted(sections, key=order or (lambda k: k)):
            parts += [_BEGIN.format(key), sections[key].rstrip("\n"), _END.format(key), ""]
        write_text(path, "\n".join(parts))
