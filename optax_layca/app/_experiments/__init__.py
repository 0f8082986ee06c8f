"""The paper experiments of ``optax-layca reproduce``: one small module per experiment.

``optax-layca reproduce NAME [--quick] [--seed S] [--out DIR]`` runs experiment ``NAME`` and
writes, under ``DIR``:

* ``NAME.png``: the paper's figure (same panels, axes and colouring);
* ``NAME.json``: every number plotted, the run's identity (configuration, seed, library
  versions, dataset fingerprint) and the verdict;
* ``NAME_runs/<run>.rotation.npz``: the :class:`~optax_layca.rotation.RotationHistory` of each
  run (``RotationHistory.load`` reads it back; its digest is in ``NAME.json``);
* its own section of ``report.md`` (merged in place, so several experiments share a report):
  the paper's claim, quoted and cited, what stands in for the paper's data and scale, what this
  run measured, and the verdict: ``agrees``, ``does not reproduce at this scale`` or
  ``inconclusive``, computed from the numbers by rules fixed in advance (never tuned to pass).

``optax-layca reproduce --list`` lists them with their paper references.

How to add an experiment
========================

1. Create ``optax_layca/app/_experiments/_<name>.py``. Import jax, optax and the library
   *inside* functions (``reproduce --list`` must stay fast). Use the shared pieces:

   * :func:`optax_layca.app._train.setup` / :class:`~optax_layca.app._train.TrainConfig`
     (data, model, initialisation, forward layer order), :class:`~optax_layca.app._train.Run`
     and :class:`~optax_layca.app._train.Group` (runs sharing an optimizer structure train
     together, vmapped), the builders ``sgd``, ``adam``, ``layca_sgd``, ``layca_adam``,
     ``lars_sgd``, and :func:`~optax_layca.app._train.train` (the one training loop);
   * :mod:`._common`: :func:`._common.train_runs` (setup + train + per-run summaries),
     :func:`._common.history_curves` (plotted numbers for the JSON), the verdict helpers
     (:func:`._common.compare_accuracies`, :func:`._common.compare_layers`,
     :func:`._common.rank_trend`, :func:`._common.combine`) and :func:`._common.panels`;
   * figures only through :mod:`optax_layca.plot` (``ax=`` to place panels).

2. Write three functions:

   * ``run(config: ExperimentConfig) -> dict``: trains (``config.quick``: ≤ 30 s on 2 CPU
     cores, ideally ~10 s; default ≤ 3 min) and returns a dict with ``"identity"``
     (from :func:`._common.train_runs`), ``"histories"`` (``{run key: RotationHistory}``,
     saved by the runner, not put in the JSON) and every number the figure draws;
   * ``figure(results) -> matplotlib.figure.Figure``: the paper's figure from that dict alone;
   * ``verdict(results) -> (status, text)``: ``status`` one of :data:`STATUSES`, ``text`` the
     measured numbers against the claim, in a sentence or two.

3. Register it at the bottom of the module (``Experiment(name, reference, claim, stand_in,
   run, figure, verdict)``) and import the module in :func:`registry` below::

      EXPERIMENT = register(Experiment(
          "my-experiment", CARBONNELLE_2019.at("Fig. 5"),
          "the paper's sentence, quoted word for word",
          "MNIST-1D, 6-layer MLP, 30 epochs stand in for CIFAR-10, VGG-25, 100 epochs",
          run, figure, verdict,
      ))

   The experiments sort by paper and first figure number (``reproduce --list``).

4. Add ``tests/test_reproduce_<name>.py`` running ``reproduce <name> --quick`` through
   :func:`optax_layca.app.cli.main`: files written, the figure's panels, finite numbers, and
   the paper's finding only where it holds robustly at quick scale.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "AGREES",
    "CARBONNELLE_2019",
    "CARBONNELLE_EXTENDED_2019",
    "INCONCLUSIVE",
    "NOT_REPRODUCED",
    "STATUSES",
    "Experiment",
    "ExperimentConfig",
    "Reference",
    "get",
    "register",
    "registry",
]

AGREES = "agrees"
NOT_REPRODUCED = "does not reproduce at this scale"
INCONCLUSIVE = "inconclusive"
STATUSES = (AGREES, NOT_REPRODUCED, INCONCLUSIVE)


@dataclasses.dataclass(frozen=True)
class Reference:
    """Where a claim comes from: authors, year, title, and the figure or table."""

    authors: str
    year: int
    where: str
    title: str = (
        "An experimental study of layer-level training speed and its impact on generalization"
    )

    def cite(self) -> str:
        """``"Authors, year, *short title*, where"`` (the same authors published two of the
        papers in 2019: the title tells them apart)."""
        return f"{self.authors}, {self.year}, *{self.short_title}*, {self.where}"

    @property
    def short_title(self) -> str:
        """The title up to its colon, or its first six words."""
        head = self.title.split(":")[0]
        words = head.split()
        return head if len(words) <= 6 else " ".join(words[:6]) + "…"

    def at(self, where: str) -> Reference:
        """The same paper, another figure or table."""
        return dataclasses.replace(self, where=where)


CARBONNELLE_2019 = Reference("Carbonnelle & De Vleeschouwer", 2019, "")
"""Carbonnelle & De Vleeschouwer, `An experimental study of layer-level training speed and
its impact on generalization`, 2019 (use ``CARBONNELLE_2019.at("Fig. 2a")``)."""
CARBONNELLE_EXTENDED_2019 = Reference(
    "Carbonnelle & De Vleeschouwer",
    2019,
    "",
    title="Layer rotation: a surprisingly powerful indicator of generalization in deep networks?",
)
"""The extended version of :data:`CARBONNELLE_2019` (warmup, AdaptCopy, features)."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """How ``reproduce`` runs an experiment: ``quick`` (≤ 30 s), the seed, the output folder
    and whether to show progress bars."""

    quick: bool = False
    seed: int = 0
    out: str = "optax_layca_out"
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A registered experiment (see the module docstring for the contract of each field)."""

    name: str
    reference: Reference
    claim: str
    stand_in: str
    run: Callable[[ExperimentConfig], dict[str, Any]]
    figure: Callable[[dict[str, Any]], Any]
    verdict: Callable[[dict[str, Any]], tuple[str, str]]


_REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Adds ``experiment`` to the registry (its name must be new)."""
    if experiment.name in _REGISTRY:
        raise ValueError(f"Experiment {experiment.name!r} is registered twice.")
    _REGISTRY[experiment.name] = experiment
    return experiment


def _paper_order(exp: Experiment) -> tuple:
    """Experiments sort by paper (authors, year, title), then by their first figure number."""
    ref = exp.reference
    fig = re.search(r"Fig\. (\d+)", ref.where)
    return ref.authors, ref.year, ref.title, int(fig[1]) if fig else 10**6, exp.name


def registry() -> dict[str, Experiment]:
    """Every experiment, by name, in the papers' order (imports their modules once)."""
    from . import (  # noqa: F401  (importing registers)
        _adapt_copy,
        _adaptive,
        _class_specialisation,
        _convergence_bias,
        _features,
        _lars,
        _lca_layers,
        _lca_table,
        _one_layer,
        _phase_lag,
        _rotation_grid,
        _synchronisation,
        _warmup,
        _weight_decay,
    )

    return {e.name: e for e in sorted(_REGISTRY.values(), key=_paper_order)}


def get(name: str) -> Experiment:
    """The experiment ``name``; a ``KeyError`` listing the valid names otherwise."""
    experiments = registry()
    if name not in experiments:
        raise KeyError(f"unknown experiment {name!r}; choose from {', '.join(experiments)}")
    return experiments[name]
