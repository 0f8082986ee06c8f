r"""Layer rotation: angles, metrics, an optax monitor and a host-side history.

A layer (see :func:`optax_layca.layer_paths`) is one weight tensor, flattened. Its *rotation*
is the angle between two of its values; the papers' "layer-wise angle deviation curves" plot
the cosine distance ``1 - cos(w_t, w⁰)`` to the initial weights (Carbonnelle & De
Vleeschouwer, 2019, §3.1), and the rotation rate between steps ``t1 < t2`` is
``angle(w_t1, w_t2) / (t2 - t1)``.

One concept per module: :mod:`._angles` (accurate angle maths), :mod:`._metrics` (offline
per-layer metrics and the layer-wise convergence rate), :mod:`._monitor` (the in-jit
:func:`track_rotation` transform) and :mod:`._history` (:class:`RotationHistory`, collected on
the host without a device sync per step). ``optax_layca.plot`` draws them::

    tx = track_rotation(optax.adam(1e-3))          # or chain(layca(0.01), track_rotation())
    hist = RotationHistory(every=10)
    for step in range(1, num_steps + 1):
        params, opt_state = train_step(params, opt_state, batch)
        end = step % steps_per_epoch == 0
        hist.record(step, opt_state, epoch=step // steps_per_epoch if end else None,
                    params=params if end else None)
    hist.save("rotation.npz")
    plot.rotation_curves_figure(hist)

Warmup (Carbonnelle & De Vleeschouwer, extended version, 2019, §5.3: start at a 10× smaller
rate and increase linearly over ``N`` steps) is one line of optax schedules:

  >>> import optax
  >>> lr, n = 0.3, 100
  >>> warmup = optax.join_schedules(
  ...     [optax.linear_schedule(lr / 10, lr, n), optax.constant_schedule(lr)], [n])
  >>> [round(float(warmup(t)), 4) for t in (0, 50, 100, 500)]
  [0.03, 0.165, 0.3, 0.3]
"""

from ._angles import angle as angle
from ._angles import cosine_distance as cosine_distance
from ._estimators import mean_batch_gradient_norms as mean_batch_gradient_norms
from ._history import RotationHistory as RotationHistory
from ._metrics import layer_angle as layer_angle
from ._metrics import layer_convergence_rate as layer_convergence_rate
from ._metrics import layer_norms as layer_norms
from ._metrics import layer_rotation as layer_rotation
from ._metrics import rotation_rate as rotation_rate
from ._metrics import second_moment_percentiles as second_moment_percentiles
from ._monitor import FIGURES as FIGURES
from ._monitor import TrackRotationState as TrackRotationState
from ._monitor import track_rotation as track_rotation
