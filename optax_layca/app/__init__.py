"""The ``optax-layca`` command line: the library's main job, built on its own instruments."""
