"""Different optimizers in one vmapped group: the run's ``method`` hyperparameter picks one.

A :class:`~optax_layca.app._train.Group` compiles one program for all its runs and vmaps it
over their hyperparameters. Compiling is what a short experiment pays most for (seconds per
group on a CPU), so runs of *different* optimizers (Adam, RMSprop, Adagrad, SGD; Layca on
different base directions) are put in one group: every optimizer of the list computes its
update and :func:`switch` keeps the one of the run's ``method``. The others' states advance
but never touch the parameters, so each run is exactly the run of its own optimizer (the
selection is an exact ``jnp.select``); the cost is the extra element-wise work of the unused
optimizers, small beside a forward and backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["METHOD", "switch", "switched"]

METHOD = "method"  # the hyperparameter holding the index of a run's optimizer


def switch(transforms: Sequence[Any], index: Any):
    """The updates of ``transforms[index]``; ``index`` may be traced (one per vmapped run).

    Every transform's state is kept and advanced (so any may be chosen), the chosen one's
    updates are returned exactly. An index outside ``[0, len(transforms))`` gives zero
    updates (``jnp.select``'s default): the parameters stay put, visibly.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> tx = switch([optax.sgd(1.0), optax.sgd(10.0)], jnp.int32(1))
      >>> u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
      >>> u.tolist()
      [-10.0, -10.0]
    """
    import jax
    import jax.numpy as jnp
    import optax

    transforms = [optax.with_extra_args_support(t) for t in transforms]
    if not transforms:
        raise ValueError("`switch(transforms=...)` needs at least one transform.")

    def init_fn(params):
        return tuple(t.init(params) for t in transforms)

    def update_fn(updates, state, params=None, **extra_args):
        outs = [t.update(updates, s, params, **extra_args) for t, s in zip(transforms, state)]
        which = [index == i for i in range(len(transforms))]
        chosen = jax.tree.map(lambda *us: jnp.select(which, us), *(u for u, _ in outs))
        return chosen, tuple(s for _, s in outs)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def switched(builds: Sequence[Callable[[Any, Mapping[str, Any]], Any]]):
    """A group ``build(task, hp)`` running ``builds[hp["method"]]`` (every run of the group
    carries the hyperparameters of every build; unused ones are ignored)."""

    def build(task: Any, hp: Mapping[str, Any]):
        return switch([b(task, hp) for b in builds], hp[METHOD])

    return build
