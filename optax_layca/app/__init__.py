"""The ``optax-layca`` command line: the library's main job, built on its own instruments.

* :mod:`.cli`: argument parsing only (``--help`` never imports jax);
* :mod:`._train`: the one training loop (vmapped groups of runs, measured by
  ``track_rotation`` + ``RotationHistory`` and ``lca.Evaluator``);
* :mod:`._commands`: ``demo``, ``sweep`` and ``lca`` on that loop;
* :mod:`._experiments`: ``reproduce``, one module per paper experiment (how to add one: its
  docstring);
* :mod:`._report` and :mod:`._figures`: atomic records with the run's identity, Markdown
  reports, figure layouts over :mod:`optax_layca.plot`.
"""
