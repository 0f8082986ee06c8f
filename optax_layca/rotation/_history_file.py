"""The file of a :class:`~optax_layca.rotation.RotationHistory`: written atomically, verified on
read.

A history file (``.npz``, or ``.json`` with the same content as lists) holds the records
(``step``, ``epoch``, ``<figure>/<layer>``), the per-epoch rotation
(``epoch_rotation/epoch``, ``epoch_rotation/<layer>``), what recording needs to go on exactly
where it stopped (the layers at the last epoch boundary, ``epoch_ref/<layer>``; the record
schedule and the layer grouping, when they are not callables) and the identity of the run
that wrote it (a fingerprint of the monitor's initial layer norms). Reading checks that every
array is there with the shape the metadata says, and names the file and what is wrong
otherwise: a truncated or foreign file never comes back as numpy's or zipfile's own error.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import _io

FORMAT = "optax_layca.RotationHistory/2"
READABLE = ("optax_layca.RotationHistory/1", FORMAT)
CALLABLE = "<callable>"  # a setting that cannot be saved: it must be given again to `load`


def encode_setting(value: Any) -> Any:
    """A JSON-able form of ``every``/``is_layer``/``layer_axis``/``per_unit``."""
    if callable(value):
        return CALLABLE
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) for v in value):
        return {str(k): int(v) for k, v in value}  # a Layering's sorted mapping items
    if isinstance(value, (tuple, list)):
        return [str(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return value


def write(path: Path, meta: dict, arrays: Mapping[str, np.ndarray]) -> Path:
    """Writes ``meta`` and ``arrays`` atomically; returns the path written (``.npz`` added)."""
    if path.suffix == ".json":
        payload = {"meta": meta, "data": {k: np.asarray(v).tolist() for k, v in arrays.items()}}
        _io.write_json(path, payload, allow_nan=True)
        return path
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    _io.write_npz(path, {"__meta__": np.asarray(json.dumps(meta)), **arrays})
    return path


def _load_raw(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    if path.suffix == ".json":
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict) or not {"meta", "data"} <= set(payload):
            raise ValueError("it lacks the 'meta' and 'data' entries of a saved history")
        return payload["meta"], {k: np.asarray(v) for k, v in payload["data"].items()}
    # Opened here, not by np.load (it leaks its handle on an empty file), and checked to be a
    # zip first (np.load takes anything else for a pickle and answers with its allow_pickle hint).
    with open(path, "rb") as f:
        if not zipfile.is_zipfile(f):
            raise ValueError("it is not an .npz (zip) archive")
        f.seek(0)
        meta, data = _read_npz(f)
    return meta, data


def _read_npz(f: Any) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(f, allow_pickle=False) as z:
        if "__meta__" not in z.files:
            raise ValueError("it has no '__meta__' entry")
        arrays = {}
        for k in z.files:
            try:
                arrays[k] = z[k]
            except ValueError:  # numpy's "Object arrays cannot be loaded" (a pickle: never read)
                raise ValueError(f"its entry {k!r} holds Python objects, not numbers") from None
        meta = json.loads(str(arrays.pop("__meta__")))
        return meta, arrays


def read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a history file, checked for completeness (see the module doc)."""
    if not path.exists():
        raise FileNotFoundError(f"No rotation history at {str(path)!r}.")
    try:
        meta, data = _load_raw(path)
        found = meta.get("format") if isinstance(meta, dict) else meta
        if found not in READABLE:
            raise ValueError(f"its format is {found!r}, not one of {READABLE}")
        check_complete(meta, data)
    # NotImplementedError/RuntimeError: zipfile's answers to flag bits a damaged byte can set
    except (
        OSError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        zipfile.BadZipFile,
        zlib.error,
        NotImplementedError,
        RuntimeError,
    ) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(
            f"{str(path)!r} is not a complete saved RotationHistory: {e}. (Files are written "
            "atomically, so this one was damaged or written by something else.)"
        ) from None
    return meta, data


def _expect(data: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> None:
    if key not in data:
        raise ValueError(f"array {key!r} is missing")
    if tuple(np.shape(data[key])) != shape:
        raise ValueError(f"array {key!r} has shape {np.shape(data[key])}, expected {shape}")


def check_complete(meta: dict, data: Mapping[str, np.ndarray]) -> None:
    """Raises a ValueError naming the first missing or misshapen array."""
    for field in ("names", "layers", "shapes"):
        if field not in meta:
            raise ValueError(f"its metadata has no {field!r}")
    rows = len(np.ravel(data["step"])) if "step" in data else -1
    _expect(data, "step", (rows,))
    _expect(data, "epoch", (rows,))
    for name in meta["names"]:
        for layer in meta["layers"]:
            key = f"{name}/{layer}"
            _expect(data, key, (rows, *meta["shapes"][key]))
    if "epoch_rotation/epoch" in data:
        n = len(np.ravel(data["epoch_rotation/epoch"]))
        for layer in meta["layers"]:
            key = f"epoch_rotation/{layer}"
            if key not in data or np.shape(data[key])[:1] != (n,):
                raise ValueError(f"array {key!r} is missing or has not {n} rows")
    for layer in meta.get("epoch_ref_layers", ()):
        if f"epoch_ref/{layer}" not in data:
            raise ValueError(f"array 'epoch_ref/{layer}' is missing")
