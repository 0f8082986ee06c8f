"""Sphinx configuration of the optax_layca docs (built offline: no intersphinx, no pandoc).

Build: ``python -m sphinx -W -b html docs docs/_build/html``. The notebooks of
``notebooks/`` are copied to ``docs/notebooks/`` (git-ignored) and rendered by MyST-NB without
being executed (CI executes them with nbmake).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

project = "optax_layca"
author = "the optax_layca authors"
copyright = "2026, the optax_layca authors"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md", "readme_sections.md"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # notebooks are executed by CI (nbmake), not by the docs build
suppress_warnings = ["mystnb.unknown_mime_type"]

autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: NamedTuple members are documented once

html_theme = "sphinx_book_theme"
html_title = "optax_layca"
html_theme_options = {"show_toc_level": 2, "use_download_button": False}
html_static_path: list[str] = []


def _copy_notebooks() -> None:
    """``notebooks/*.ipynb`` -> ``docs/notebooks/`` (only files that changed)."""
    dest = HERE / "notebooks"
    dest.mkdir(exist_ok=True)
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        target = dest / nb.name
        if not target.exists() or target.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, target)


_copy_notebooks()


class CommandLineHelp(SphinxDirective):
    """``{command-line-help}``: the ``--help`` of ``optax-layca`` and of each subcommand."""

    def run(self):
        from optax_layca.app.cli import build_parser

        os.environ["COLUMNS"] = "96"  # argparse wraps to the terminal width
        parser = build_parser()
        out = [nodes.literal_block(text=parser.format_help(), language="text")]
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for sub in subs:
            for name, subparser in sub.choices.items():
                section = nodes.rubric(text=f"optax-layca {name}")
                help_text = subparser.format_help()
                out += [section, nodes.literal_block(text=help_text, language="text")]
        return out


class AutoPublic(SphinxDirective):
    """``{autopublic} module``: autodoc of every public name the module exports (its
    ``__all__``, else every non-underscore name that is not a module), in import order, so
    that renamed or added functions need no edit here. Option ``exclude``: names to skip."""

    required_arguments = 1
    option_spec = {"exclude": lambda text: [n.strip() for n in text.split(",") if n.strip()]}

    def run(self):
        import importlib
        import inspect

        name = self.arguments[0]
        module = importlib.import_module(name)
        exclude = set(self.options.get("exclude", []))
        public = getattr(module, "__all__", None) or [
            k for k, v in vars(module).items() if not k.startswith("_") and not inspect.ismodule(v)
        ]
        lines = []
        for member in public:
            if member in exclude:
                continue
            obj = getattr(module, member)
            kind = (
                "autoclass"
                if inspect.isclass(obj)
                else ("autofunction" if callable(obj) else "autodata")
            )
            lines.append(f".. {kind}:: {name}.{member}")
            if kind == "autoclass":
                lines.append("   :members:")
        # the pages are MyST: autodoc's output is reST only inside eval-rst
        return self.parse_text_to_nodes("\n".join(["```{eval-rst}", *lines, "```"]))


def _optional_pages(app, docname, source):
    """Drops toctree entries of optional pages that this checkout does not have
    (``fidelity.md`` is written separately); a missing entry would be a warning."""
    if docname != "index":
        return
    for page in ("fidelity",):
        if not (HERE / f"{page}.md").exists():
            source[0] = "\n".join(line for line in source[0].split("\n") if line.strip() != page)


_PLURAL_LITERAL = re.compile(r"(``[^`]+``)([A-Za-z])")


def _literal_plurals(app, what, name, obj, options, lines):
    """``LCAResult``s -> ``LCAResult``\\ s: docstrings pluralise inline literals, which reST
    only ends before whitespace or punctuation; an escaped space joins them as written."""
    lines[:] = [_PLURAL_LITERAL.sub(r"\1\\ \2", line) for line in lines]


def setup(app):
    app.add_directive("command-line-help", CommandLineHelp)
    app.add_directive("autopublic", AutoPublic)
    app.connect("source-read", _optional_pages)
    app.connect("autodoc-process-docstring", _literal_plurals)
    return {"parallel_read_safe": True}
