"""Host-side record of the rotation monitor's figures over training."""

from __future__ import annotations

import functools
import hashlib
import warnings
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
from . import _history_file
from ._angles import cosine_distance_of_angle, layer_angle_kept
from ._monitor import FIGURES, find_monitor_state


def _figures_of(obj: Any) -> tuple[dict[str, dict[str, Any]], Any]:
    """(figures ``{name: {path: array}}``, the monitor state or None) from a state or a dict."""
    obj = unwrap_variables(obj)
    mon = find_monitor_state(obj)
    if mon is not None:
        return {name: dict(getattr(mon, name)) for name in FIGURES}, mon
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

    The authors' curves (``LayerwiseAngleDeviationCurves``) record after the *first* update of
    every epoch and draw record ``k`` at epoch ``k + 1``, after a prepended 0 at epoch 0. For
    the same points, record every step without ``epoch=`` under
    ``every=lambda step: (step - 1) % steps_per_epoch == 0`` and plot
    ``x = 1 + (steps - 1) // steps_per_epoch`` (see ``docs/fidelity.md``).

    Layers whose norm was zero at init (a zero-initialised head or residual branch: their
    figures are 0 by convention, and under Layca or AdaptCopy they never train) are listed in
    :attr:`frozen_layers`, read once at the first record of a monitor state, which then warns
    (``RuntimeWarning``).

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
        self._layering: Layering | None = Layering(is_layer, layer_axis, per_unit)
        # What `save` writes so that a loaded history records on exactly as this one would.
        self._settings = {
            "every": _history_file.encode_setting(every),
            "is_layer": _history_file.encode_setting(self._layering.is_layer),
            "layer_axis": _history_file.encode_setting(self._layering.layer_axis),
            "per_unit": bool(per_unit),
        }
        self._run: str | None = None  # fingerprint of the recorded run's initial layer norms
        self._run_checked = False  # whether this session's monitor state was checked against it
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
        self._frozen: tuple[str, ...] | None = None

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
        if self._steps and step < self._steps[-1]:
            raise ValueError(
                f"`RotationHistory.record(step={step})`: the history already holds step "
                f"{self._steps[-1]}; steps never go back (is this another run?)."
            )
        if epoch is None and not self.should_record(step):
            return False
        figures, monitor = _figures_of(opt_state_or_figures)
        initial = None if monitor is None else dict(monitor.initial_layers)
        if monitor is not None:
            self._check_run(monitor)
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
        elif set(names) != set(self._names) or any(
            set(figures[n]) != set(self._layers) for n in names
        ):  # the order may differ: a dict passed through jax.tree comes back with sorted keys
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

    def _check_run(self, monitor: Any) -> None:
        """At the first record of a monitor state (one small device sync): the run's identity,
        which a loaded history must share, and its zero-norm layers."""
        if self._frozen is not None and self._run_checked:
            return
        run = _run_fingerprint(monitor.initial_layer_norm)
        if self._run is not None and run != self._run:
            raise ValueError(
                "`RotationHistory.record`: this history was recorded from another run (its "
                f"initial layer norms have fingerprint {self._run}, this state's {run}). Start a "
                "new RotationHistory for a new run."
            )
        self._run, self._run_checked = run, True
        if self._frozen is None:
            self._check_frozen(monitor.zero_initial_layer_norm)

    def _check_frozen(self, zero_initial_layer_norm: Mapping[str, Any]) -> None:
        """Reads the monitor's zero-norm flags once (one small device sync) and warns."""
        flags = jax.device_get(dict(zero_initial_layer_norm))
        self._frozen = natural_order(p for p, f in flags.items() if np.any(f))
        if self._frozen:
            warnings.warn(
                f"RotationHistory: layers {list(self._frozen)} had zero norm at init: their "
                "rotation figures are 0 by convention, and under Layca or AdaptCopy (which "
                "keep each layer's initial norm) they never train. Initialise them with "
                "non-zero values or exclude them with `is_layer=`.",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def frozen_layers(self) -> tuple[str, ...]:
        """Layers of zero norm at init (see the class docstring); () if none or unknown."""
        return self._frozen or ()

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
        if self._layering is None:
            raise ValueError(
                "`RotationHistory`: this history was loaded from a file saved with a callable "
                "`is_layer` or `layer_axis`; pass it again to `RotationHistory.load` to record "
                "the per-epoch rotation."
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
        interval; recorded every step, this is the exact per-step angle. A record of the
        initial state (step 0, ``Σθ = 0``), as training loops that record before the first
        update keep, is that origin and is skipped. Feeds :func:`~optax_layca.adapt_copy`.

        Returns:
          ``{layer path: float64 array (steps[-1], ...)}``; row ``t`` is the angle of update
          ``t + 1``.
        """
        cum = self.get("cumulative_angle", layers)
        steps = self.steps
        if len(steps) > 1 and steps[0] == 0:  # the initial state: the origin, Σθ = 0
            steps, cum = steps[1:], {p: c[1:] for p, c in cum.items()}
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
        from .. import __version__

        return {
            "format": _history_file.FORMAT,
            "names": list(self._names),
            "layers": list(self._layers),
            "shapes": {k: list(v) for k, v in self._shapes.items()},
            "frozen_layers": list(self.frozen_layers),
            "settings": self._settings,
            "run": self._run,
            "epoch_ref_layers": [] if self._epoch_ref is None else list(self._epoch_ref),
            "library": f"optax_layca {__version__}",
        }

    def save(self, path: str | Path) -> Path:
        """Writes the history to ``path`` atomically: ``.json`` (lists) or else ``.npz``.

        The file also holds what recording needs to go on where it stopped (the layers at the
        last epoch boundary, the schedule and layer grouping) and the identity of the run, so
        that ``RotationHistory.load(path)`` followed by more records gives the same history as
        one never saved. A process killed while saving leaves the previous file intact.
        """
        self._check_nonempty()
        arrays = self.as_dict()
        if self._epoch_ref is not None:
            ref = jax.device_get(self._epoch_ref)
            arrays.update({f"epoch_ref/{p}": np.asarray(v) for p, v in ref.items()})
        return _history_file.write(Path(path), self._meta(), arrays)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        every: int | Callable[[int], bool] | None = None,
        is_layer: IsLayer = None,
        layer_axis: LayerAxis = None,
    ) -> RotationHistory:
        """Reads a history written by :meth:`save`, checked for completeness.

        Further records continue it exactly (same schedule, per-epoch rotation measured from the
        last saved boundary) and must come from the same run (its initial layer norms). A
        schedule or layer grouping saved as a callable cannot be stored: pass it again here to
        record more (reading needs nothing).
        """
        meta, data = _history_file.read(Path(path))
        saved = meta.get("settings", {})
        hist = cls(**_resume_settings(saved, every, is_layer, layer_axis))
        if saved.get("is_layer") == _history_file.CALLABLE and is_layer is None or (
            saved.get("layer_axis") == _history_file.CALLABLE and layer_axis is None
        ):
            hist._layering = None
        hist._restore(meta, data)
        return hist

    def _restore(self, meta: dict, data: Mapping[str, np.ndarray]) -> None:
        self._names, self._layers = tuple(meta["names"]), tuple(meta["layers"])
        self._shapes = {k: tuple(v) for k, v in meta["shapes"].items()}
        self._frozen = tuple(meta.get("frozen_layers", ()))
        self._run = meta.get("run")
        self._steps = [int(s) for s in data["step"]]
        self._epochs = [float(e) for e in data["epoch"]]
        rows = len(self._steps)
        self._host = np.concatenate(
            [np.asarray(data[k], np.float32).reshape(rows, -1) for k in self._shapes], axis=1
        )
        if "epoch_rotation/epoch" in data:
            self._epoch_ids = [int(e) for e in data["epoch_rotation/epoch"]]
            n = len(self._epoch_ids)
            cols = [np.asarray(data[f"epoch_rotation/{p}"], np.float32) for p in self._layers]
            self._epoch_shapes = {p: c.shape[1:] for p, c in zip(self._layers, cols)}
            self._epoch_host = np.concatenate([c.reshape(n, -1) for c in cols], axis=1)
        if meta.get("epoch_ref_layers"):
            self._epoch_ref = {p: data[f"epoch_ref/{p}"] for p in meta["epoch_ref_layers"]}


def _resume_settings(saved: dict, every: Any, is_layer: Any, layer_axis: Any) -> dict:
    """Constructor arguments of a loaded history: the saved ones unless given again."""
    usable = lambda v: v is not None and v != _history_file.CALLABLE
    if every is None:
        every = saved.get("every", 1)
        if not usable(every):
            every = _missing_schedule
    if is_layer is None and usable(saved.get("is_layer")):
        is_layer = saved["is_layer"]
    if layer_axis is None and usable(saved.get("layer_axis")):
        layer_axis = saved["layer_axis"]
    return dict(every=every, is_layer=is_layer, layer_axis=layer_axis,
                per_unit=bool(saved.get("per_unit", False)))


def _missing_schedule(step: int) -> bool:
    raise ValueError(
        "`RotationHistory.record`: this history was loaded from a file saved with a callable "
        "`every`; pass it again to `RotationHistory.load(path, every=...)` to record more."
    )


def _run_fingerprint(initial_layer_norm: Mapping[str, Any]) -> str:
    """A short hash of a run's initial layer norms (names, shapes and float32 bytes)."""
    norms = jax.device_get(dict(initial_layer_norm))
    h = hashlib.sha256()
    for path in sorted(norms):
        a = np.ascontiguousarray(norms[path], np.float32)
        h.update(f"{path}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _start_copy(x: jax.Array) -> None:
    x.copy_to_host_async()
