"""Host-side record of the rotation monitor's figures over training."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._base import unwrap_variables
from .._custom_types import IsLayer, LayerAxis
from .._layers import Layering, kept_shape, natural_order, path_str
from ._angles import cosine_distance_of_angle, layer_angle_kept
from ._monitor import FIGURES, find_monitor_state


def _figures_of(obj: Any) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """(figures ``{name: {path: array}}``, initial layers or None) from a state or a dict."""
    obj = unwrap_variables(obj)
    mon = find_monitor_state(obj)
    if mon is not None:
        return {name: dict(getattr(mon, name)) for name in FIGURES}, dict(mon.initial_layers)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Mapping) for v in obj.values()):
        return {str(k): dict(v) for k, v in obj.items()}, None
    raise ValueError(
        "`RotationHistory.record` needs an optimizer state containing a `track_rotation` state, "
        "or a dict `{figure name: {layer path: array}}`; got "
        f"{type(obj).__name__}."
    )


@functools.partial(jax.jit, static_argnums=(2, 3))
def _epoch_rotation(ref: dict, cur: dict, layering: Layering, layers: tuple[str, ...]):
    """(cosine distances of ``layers`` between ``ref`` and ``cur``, packed; a copy of ``cur``)."""
    out = []
    for path in layers:
        lo = layering.layout(path, cur[path])
        out.append(jnp.ravel(cosine_distance_of_angle(layer_angle_kept(ref[path], cur[path], lo))))
    return jnp.concatenate(out), {k: jnp.copy(v) for k, v in cur.items()}


@jax.jit
def _pack(leaves: list[jax.Array]) -> jax.Array:
    """One float32 vector holding every figure: one buffer per record, one transfer later."""
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])


class RotationHistory:
    """Host-side record of the per-layer rotation figures over training.

    ``record(step, opt_state)`` keeps the figures of the :func:`track_rotation` state found in
    ``opt_state`` as *device* arrays (packed into one vector by a jitted concat, with an
    asynchronous copy to the host started): no device sync per step. They are converted to
    numpy in one batch when read (:meth:`get`, :meth:`as_dict`, :meth:`save`, ...).

    Records are taken when ``every(step)`` is true (an int ``k`` means every ``k`` steps,
    counting from step 0) and always at epoch boundaries (``epoch=`` given). Passing
    ``params=`` at epoch boundaries also records the per-epoch rotation (cosine distance
    between each layer at the previous boundary, or at init for the first one, and now: Carbonnelle &
    De Vleeschouwer, 2019, Fig. 10, row 1).

    ``step`` should be the number of updates applied so far (the monitor's ``rotation_step``).
    The per-epoch rotation keeps one copy of the layers (on device) from boundary to boundary.

    Args:
      every: record schedule, an int ``k > 0`` or ``callable(step) -> bool``.
      is_layer, layer_axis, per_unit: layer grouping, as given to :func:`track_rotation`
        (used only for the per-epoch rotation).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from optax_layca.rotation import track_rotation
      >>> params = {"Dense_0": {"kernel": jnp.ones((3, 2))}, "Dense_1": {"kernel": jnp.ones((2, 1))}}
      >>> tx = track_rotation(optax.sgd(0.1))
      >>> state, hist = tx.init(params), RotationHistory(every=2)
      >>> for step in range(1, 5):
      ...     grads = jax.tree.map(lambda w: jnp.sin(w.size * jnp.arange(w.size) + step
      ...                                          ).reshape(w.shape), params)
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      ...     _ = hist.record(step, state, epoch=1 if step == 4 else None, params=params)
      >>> hist.steps.tolist(), hist.layers
      ([2, 4], ('Dense_0/kernel', 'Dense_1/kernel'))
      >>> hist.get("cosine_distance")["Dense_0/kernel"].shape
      (2,)
    """

    def __init__(
        self,
        every: int | Callable[[int], bool] = 1,
        *,
        is_layer: IsLayer = None,
        layer_axis: LayerAxis = None,
        per_unit: bool = False,
    ):
        if callable(every):
            self._every = every
        elif isinstance(every, (int, np.integer)) and not isinstance(every, bool) and every > 0:
            k = int(every)
            self._every = lambda step: step % k == 0
        else:
            raise ValueError(
                f"`RotationHistory(every=...)` must be an int > 0 or callable(step) -> bool; "
                f"got {every!r}."
            )
        self._layering = Layering(is_layer, layer_axis, per_unit)
        self._names: tuple[str, ...] | None = None
        self._layers: tuple[str, ...] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._steps: list[int] = []
        self._epochs: list[float] = []
        self._pending: list[jax.Array] = []
        self._host = np.zeros((0, 0), np.float32)
        self._epoch_ids: list[int] = []
        self._epoch_pending: list[jax.Array] = []
        self._epoch_host = np.zeros((0, 0), np.float32)
        self._epoch_ref: dict[str, jax.Array] | None = None
        self._epoch_shapes: dict[str, tuple[int, ...]] = {}

    # -- recording

    def should_record(self, step: int) -> bool:
        """Whether ``record(step, ...)`` without ``epoch=`` keeps a record."""
        return bool(self._every(int(step)))

    def record(
        self,
        step: int,
        opt_state_or_figures: Any,
        epoch: int | None = None,
        *,
        params: Any = None,
        extra: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> bool:
        """Records the figures at ``step`` if the schedule says so or ``epoch`` is given.

        Args:
          step: number of updates applied so far.
          opt_state_or_figures: an optimizer state containing a :func:`track_rotation` state
            (also inside ``nnx.Optimizer``), or ``{figure name: {layer path: array}}``.
          epoch: the epoch that just ended (records unconditionally).
          params: current parameters; at epoch boundaries, enables :meth:`per_epoch_rotation`.
          extra: more figures ``{name: {layer path: array}}`` (e.g. ``{"nu_percentiles":
            second_moment_percentiles(opt_state)}``); the same names at every record.

        Returns:
          True if a record was kept.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"`RotationHistory.record(step=...)` must be an int; got {step!r}.")
        if epoch is None and not self.should_record(step):
            return False
        figures, initial = _figures_of(opt_state_or_figures)
        if extra:
            figures.update({str(k): dict(v) for k, v in extra.items()})
        names = tuple(figures)
        layers = tuple(next(iter(figures.values())))
        if self._names is None:
            for name in names:
                if tuple(figures[name]) != layers:
                    raise ValueError(
                        f"Figure {name!r} has layers {sorted(figures[name])}, others have "
                        f"{sorted(layers)}."
                    )
            self._names, self._layers = names, layers
            self._shapes = {
                f"{n}/{p}": tuple(np.shape(figures[n][p])) for n in names for p in layers
            }
        elif names != self._names or any(tuple(figures[n]) != self._layers for n in names):
            raise ValueError(
                "`RotationHistory.record`: figures or layers changed since the first record: "
                f"had {self._names} over {self._layers}, got {names} over "
                f"{tuple(figures[names[0]])}."
            )
        leaves = [figures[n][p] for n in self._names for p in self._layers]
        for (key, shape), x in zip(self._shapes.items(), leaves):
            if tuple(np.shape(x)) != shape:
                raise ValueError(f"Figure {key!r} changed shape: {shape} -> {np.shape(x)}.")
        packed = _pack(leaves)
        _start_copy(packed)
        self._pending.append(packed)
        self._steps.append(int(step))
        self._epochs.append(float("nan") if epoch is None else float(epoch))
        if epoch is not None and params is not None:
            self._record_epoch(int(epoch), unwrap_variables(params), initial)
        return True

    def _record_epoch(self, epoch: int, params: Any, initial: dict | None) -> None:
        current = {}
        for p, x in jtu.tree_flatten_with_path(params)[0]:
            lo = self._layering.layout(path_str(p), x)
            if lo.path in self._layers:
                current[lo.path] = x
        missing = [p for p in self._layers if p not in current]
        if missing:
            raise ValueError(
                f"`RotationHistory.record(params=...)` lacks the recorded layers {missing}."
            )
        ref = self._epoch_ref if self._epoch_ref is not None else initial
        if ref is None:
            raise ValueError(
                "`RotationHistory`: the first epoch boundary needs the initial layers: record a "
                "state containing `track_rotation`."
            )
        if not self._epoch_shapes:
            self._epoch_shapes = {
                p: kept_shape(self._layering.layout(p, current[p]), np.shape(current[p]))
                for p in self._layers
            }
        vec, self._epoch_ref = _epoch_rotation(ref, current, self._layering, self._layers)
        _start_copy(vec)
        self._epoch_pending.append(vec)
        self._epoch_ids.append(epoch)

    # -- reading

    def _sync(self) -> None:
        if self._pending:
            new = np.stack(jax.device_get(self._pending)).astype(np.float32)
            self._host = new if self._host.size == 0 else np.concatenate([self._host, new])
            self._pending = []
        if self._epoch_pending:
            new = np.stack(jax.device_get(self._epoch_pending)).astype(np.float32)
            host = self._epoch_host
            self._epoch_host = new if host.size == 0 else np.concatenate([host, new])
            self._epoch_pending = []

    def __len__(self) -> int:
        return len(self._steps)

    def _check_nonempty(self) -> None:
        if not self._steps:
            raise ValueError("The rotation history is empty: call `record(step, opt_state)` first.")

    @property
    def steps(self) -> np.ndarray:
        """Steps of the records (int64)."""
        self._check_nonempty()
        return np.asarray(self._steps, np.int64)

    @property
    def epochs(self) -> np.ndarray:
        """Epoch of each record (float; NaN for records not at an epoch boundary)."""
        self._check_nonempty()
        return np.asarray(self._epochs, np.float64)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the recorded figures."""
        self._check_nonempty()
        return self._names

    @property
    def layers(self) -> tuple[str, ...]:
        """Recorded layer paths, in natural (≈ forward) order."""
        self._check_nonempty()
        return natural_order(self._layers)

    def get(self, name: str, layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``{layer path: array (num_records, *figure shape)}`` of figure ``name``.

        Args:
          name: one of :attr:`names` (e.g. ``"cosine_distance"``).
          layers: subset of layer paths (default all, in natural order).
        """
        self._check_nonempty()
        if name not in self._names:
            raise ValueError(f"Unknown figure {name!r}; recorded figures are {list(self._names)}.")
        layers = self._check_layers(layers)
        self._sync()
        return {p: self._column(self._host, name, p, len(self._steps)) for p in layers}

    def _check_layers(self, layers: Sequence[str] | None) -> tuple[str, ...]:
        if layers is None:
            return self.layers
        if isinstance(layers, str):
            layers = [layers]
        unknown = [p for p in layers if p not in self._layers]
        if unknown:
            raise ValueError(
                f"Unknown layer(s) {unknown}; the history has layers {list(self.layers)}."
            )
        return tuple(layers)

    def _offsets(self) -> dict[str, tuple[int, int]]:
        out, start = {}, 0
        for key, shape in self._shapes.items():
            n = int(np.prod(shape, dtype=np.int64))
            out[key] = (start, start + n)
            start += n
        return out

    def _column(self, host: np.ndarray, name: str, path: str, rows: int) -> np.ndarray:
        a, b = self._offsets()[f"{name}/{path}"]
        return host[:, a:b].reshape((rows, *self._shapes[f"{name}/{path}"]))

    def per_epoch_rotation(
        self, layers: Sequence[str] | None = None
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Cosine distance between each layer's weights at the start and end of every epoch.

        Returns ``(epochs, {layer path: array (num_epochs, ...)})``. Needs ``params=`` passed
        to :meth:`record` at epoch boundaries.
        """
        self._check_nonempty()
        if not self._epoch_ids:
            raise ValueError(
                "No per-epoch rotation recorded: call `record(step, state, epoch=e, "
                "params=params)` at the end of each epoch."
            )
        layers = self._check_layers(layers)
        self._sync()
        out, start = {}, 0
        offsets = {}
        for p in self._layers:
            n = int(np.prod(self._epoch_shapes[p], dtype=np.int64))
            offsets[p] = (start, start + n)
            start += n
        for p in layers:
            a, b = offsets[p]
            out[p] = self._epoch_host[:, a:b].reshape(
                (len(self._epoch_ids), *self._epoch_shapes[p])
            )
        return np.asarray(self._epoch_ids, np.int64), out

    def step_angles(self, layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Per-step rotation angle of every step ``1 … steps[-1]``, from the records.

        Between two records the mean step angle ``(Σθ(t2) - Σθ(t1)) / (t2 - t1)`` (from
        ``cumulative_angle``, with ``Σθ = 0`` at step 0) is repeated for each step of the
        interval; recorded every step, this is the exact per-step angle. Feeds
        :func:`~optax_layca.adapt_copy`.

        Returns:
          ``{layer path: float64 array (steps[-1], ...)}``; row ``t`` is the angle of update
          ``t + 1``.
        """
        cum = self.get("cumulative_angle", layers)
        steps = self.steps
        if np.any(np.diff(steps) <= 0) or steps[0] <= 0:
            raise ValueError(
                "`step_angles` needs records at strictly increasing steps > 0; got "
                f"{steps.tolist()[:10]}."
            )
        lengths = np.diff(np.concatenate([[0], steps]))
        out = {}
        for p, c in cum.items():
            c = np.asarray(c, np.float64)
            prev = np.concatenate([np.zeros((1, *c.shape[1:])), c[:-1]])
            mean = (c - prev) / lengths.reshape((-1,) + (1,) * (c.ndim - 1))
            out[p] = np.repeat(mean, lengths, axis=0)
        return out

    # -- export

    def as_dict(self) -> dict[str, np.ndarray]:
        """Flat ``{key: numpy array}``: ``"step"``, ``"epoch"``, ``"<figure>/<layer path>"``
        (rows = records) and, if recorded, ``"epoch_rotation/epoch"`` and
        ``"epoch_rotation/<layer path>"``."""
        self._check_nonempty()
        out = {"step": self.steps, "epoch": self.epochs}
        for name in self._names:
            for p, v in self.get(name).items():
                out[f"{name}/{p}"] = v
        if self._epoch_ids:
            epochs, rot = self.per_epoch_rotation()
            out["epoch_rotation/epoch"] = epochs
            out.update({f"epoch_rotation/{p}": v for p, v in rot.items()})
        return out

    def _meta(self) -> dict:
        return {
            "format": "optax_layca.RotationHistory/1",
            "names": list(self._names),
            "layers": list(self._layers),
            "shapes": {k: list(v) for k, v in self._shapes.items()},
        }

    def save(self, path: str | Path) -> Path:
        """Writes the history to ``path``: ``.json`` (lists) or anything else as ``.npz``."""
        path = Path(path)
        data = self.as_dict()
        meta = self._meta()
        if path.suffix == ".json":
            payload = {"meta": meta, "data": {k: np.asarray(v).tolist() for k, v in data.items()}}
            path.write_text(json.dumps(payload, allow_nan=True))
        else:
            np.savez(path, __meta__=np.asarray(json.dumps(meta)), **data)
            if path.suffix != ".npz":
                path = path.with_name(path.name + ".npz")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RotationHistory:
        """Reads a history written by :meth:`save` (further records can be appended)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"No rotation history at {str(path)!r}.")
        if path.suffix == ".json":
            payload = json.loads(path.read_text())
            meta, data = payload["meta"], {k: np.asarray(v) for k, v in payload["data"].items()}
        else:
            with np.load(path) as z:
                meta = json.loads(str(z["__meta__"]))
                data = {k: z[k] for k in z.files if k != "__meta__"}
        if meta.get("format") != "optax_layca.RotationHistory/1":
            raise ValueError(f"{str(path)!r} is not a saved RotationHistory.")
        hist = cls()
        hist._names = tuple(meta["names"])
        hist._layers = tuple(meta["layers"])
        hist._shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
        hist._steps = [int(s) for s in data["step"]]
        hist._epochs = [float(e) for e in data["epoch"]]
        rows = len(hist._steps)
        hist._host = np.concatenate(
            [
                np.asarray(data[f"{n}/{p}"], np.float32).reshape(rows, -1)
                for n in hist._names
                for p in hist._layers
            ],
            axis=1,
        )
        if "epoch_rotation/epoch" in data:
            hist._epoch_ids = [int(e) for e in data["epoch_rotation/epoch"]]
            n = len(hist._epoch_ids)
            hist._epoch_shapes = {
                p: tuple(np.shape(data[f"epoch_rotation/{p}"])[1:]) for p in hist._layers
            }
            hist._epoch_host = np.concatenate(
                [
                    np.asarray(data[f"epoch_rotation/{p}"], np.float32).reshape(n, -1)
                    for p in hist._layers
                ],
                axis=1,
            )
        return hist


def _start_copy(x: jax.Array) -> None:
    x.copy_to_host_async()
