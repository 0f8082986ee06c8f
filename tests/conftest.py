"""Shared test set-up: the one table of every transform and alias under the common contract.

Like optax's ``_MAIN_OPTIMIZERS_UNDER_TEST`` (``optax/contrib/_common_test.py``): every entry
of :data:`TRANSFORMS` goes through every check of ``tests/test_contract.py`` (and the
property tests of ``tests/test_properties.py``). A new transform gets a row here, not a new
set of tests. Models, data and the numpy references live in ``tests/_utils.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")
# notebooks/05_paper_gallery runs one quick experiment here (tests/test_reproduce_* run them all)
os.environ.setdefault("OPTAX_LAYCA_GALLERY", "phase-lag")
# JAX's persistent compilation cache, shared by the xdist workers and every subprocess (CLI,
# notebooks, benchmarks, multi-device runs): tests rebuild the same optimizers and models many
# times, and identical programs then compile once (measured: tests/test_properties.py 85 s ->
# 43 s from an empty cache). Keyed by the program text and the jax version, so always safe.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from _utils import init_mlp  # noqa: E402

import optax_layca as ol  # noqa: E402

SIZES = (4, 5, 3)
"""The contract problem: a two-layer MLP-shaped tree (kernels are layers, biases are not)."""
LAYERS = ("Dense_0/kernel", "Dense_1/kernel")
STEPS = 150
SCHEDULE = optax.exponential_decay(0.3, transition_steps=15, decay_rate=0.5)
"""Rates decaying to ~3e-4 after 150 steps: total rotation Σ arctan(η) ≈ 6 rad, then the last
steps are small enough to settle on the target (a constant Layca rate rotates by arctan(η)
every step and would circle it)."""


def adapt_copy_table() -> dict[str, np.ndarray]:
    """Per-step angles ``arctan(SCHEDULE(t))`` for every layer: AdaptCopy as a decaying Layca."""
    angles = np.arctan(np.asarray([float(SCHEDULE(t)) for t in range(STEPS)]))
    return {path: angles for path in LAYERS}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the table.

    Attributes:
      name: test id.
      factory: the public constructor (what ``optax.inject_hyperparams`` wraps).
      kwargs: its arguments.
      wrap: applied to the constructed transform (a monitor, a chain), or None.
      needs_params: ``update`` raises without ``params``.
      converges: the contract problem is an optimisation it should solve (False for single
        operations, which are not optimizers).
      strict: runs under ``jax.numpy_dtype_promotion("strict")`` (False where an optax part,
        e.g. ``scale_by_adam``'s bias correction, does not).
      checks_init: ``update`` compares the tree with the one seen at ``init`` (stateful
        transforms of ours; plain optax chains such as ``sgd_amom`` do not).
      mask_out: leaves left out by the ``optax.masked`` check (AdaptCopy's table names every
        layer, so only a bias can go).
      norm_keeping: every layer keeps its initial norm (Layca's op 4).
      maps_params: the state's params-like trees are shaped like params, so
        ``optax.tree.map_params`` applies (not so for ``track_rotation``'s ``{layer path:
        figure}`` dicts).
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict[str, Any]
    wrap: Callable[[Any], optax.GradientTransformation] | None = None
    needs_params: bool = True
    converges: bool = True
    strict: bool = True
    checks_init: bool = True
    mask_out: tuple[str, ...] = ("Dense_1/kernel", "Dense_1/bias")
    norm_keeping: bool = False
    maps_params: bool = True

    def make(self, **overrides: Any) -> optax.GradientTransformation:
        tx = self.factory(**{**self.kwargs, **overrides})
        return self.wrap(tx) if self.wrap is not None else tx

    def injected(self) -> optax.GradientTransformation:
        tx = optax.inject_hyperparams(self.factory)(**self.kwargs)
        return self.wrap(tx) if self.wrap is not None else tx


def _last(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.chain(tx, ol.track_rotation())


_OPS = dict(converges=False)
# The convergence problem needs the biases to move, so the aliases train them with the base
# direction (`non_layer="base"`); the authors' defaults (biases frozen under Layca, normalised
# under LARS) go through every other check in their own rows.
_TRAIN_BIASES = {"non_layer": "base"}
TRANSFORMS = [
    Entry("layca_sgd", ol.layca, {"learning_rate": SCHEDULE, **_TRAIN_BIASES}, norm_keeping=True),
    Entry("layca_adam", ol.layca, {"learning_rate": SCHEDULE, "base": optax.scale_by_adam(),
                                   "alpha": 0.1, **_TRAIN_BIASES}, strict=False,
          norm_keeping=True),
    Entry("layca_sgd_chained", ol.layca, {"learning_rate": SCHEDULE, "fused": False,
                                          **_TRAIN_BIASES}, norm_keeping=True),
    Entry("layca_adam_chained", ol.layca, {"learning_rate": SCHEDULE, "fused": False,
                                           "base": optax.scale_by_adam(), "alpha": -0.1,
                                           **_TRAIN_BIASES},
          strict=False, norm_keeping=True),
    Entry("layca_authors_defaults", ol.layca, {"learning_rate": SCHEDULE, "alpha": 0.1},
          norm_keeping=True, converges=False),
    Entry("scale_by_layca", ol.scale_by_layca, {"learning_rate": SCHEDULE, "alpha": 0.1,
                                                **_TRAIN_BIASES}, norm_keeping=True),
    # A norm that shrank regrows by at most δ‖w⁰‖ per step: δ = 1e-2 lets it reach the target.
    Entry("lars", ol.lars, {"learning_rate": SCHEDULE, "alpha": 0.1, "max_norm_increase": 1e-2,
                            **_TRAIN_BIASES}),
    Entry("lars_authors_defaults", ol.lars, {"learning_rate": SCHEDULE, "alpha": 0.1},
          converges=False),
    Entry("sgd_amom", ol.sgd_amom, {"learning_rate": SCHEDULE, "momentum": 0.5},
          needs_params=False, checks_init=False),
    Entry("adapt_copy", functools.partial(ol.adapt_copy, adapt_copy_table()),
          {"non_layer_learning_rate": SCHEDULE}, mask_out=("Dense_1/bias",), norm_keeping=True),
    Entry("project_orthogonal", ol.project_orthogonal, {}, checks_init=False, **_OPS),
    Entry("scale_to_weight_norm", ol.scale_to_weight_norm, {}, checks_init=False, **_OPS),
    Entry("scale_by_layer_multipliers", ol.scale_by_layer_multipliers, {"alpha": 0.5},
          needs_params=False, **_OPS),
    Entry("project_to_initial_norm", ol.project_to_initial_norm, {}, norm_keeping=True, **_OPS),
    Entry("cap_norm_increase", ol.cap_norm_increase, {"max_increase": 1e-3}, **_OPS),
    Entry("track_rotation(adam)", optax.adam, {"learning_rate": SCHEDULE},
          wrap=ol.track_rotation, strict=False, maps_params=False),
    Entry("chain(layca, track_rotation)", ol.layca, {"learning_rate": SCHEDULE, **_TRAIN_BIASES},
          wrap=_last, norm_keeping=True, maps_params=False),
]
TRANSFORM_IDS = [e.name for e in TRANSFORMS]


@pytest.fixture(params=TRANSFORMS, ids=TRANSFORM_IDS)
def entry(request) -> Entry:
    """Each row of :data:`TRANSFORMS` in turn."""
    return request.param


@pytest.fixture(scope="session")
def mlp_params() -> dict:
    """The contract problem's params (float32 numpy, ``Dense_i/{kernel,bias}``)."""
    return init_mlp(SIZES, seed=0)


def pytest_collection_modifyitems(config, items):
    """Notebooks (collected by nbmake) are end-to-end runs: ``slow``, like the tests marked
    ``@pytest.mark.slow``."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
