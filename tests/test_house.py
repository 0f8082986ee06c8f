"""House rules checked on the source: one-way imports, short functions, citations by authors.

The package's wings import one way: ``_base``/``_layers`` ← control ← measure (``rotation``,
``lca``) ← ``plot`` ← ``app``; the package ``__init__`` modules only re-export. These checks
parse the source (no import), so they are fast and see lazy imports inside functions too.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "optax_layca"

# Rank of each top-level module or subpackage: a module may import only ranks <= its own.
RANK = {
    "_custom_types": 0,
    "_base": 0,
    "_io": 0,
    "_layers": 1,
    "_multipliers": 2,
    "_layca": 3,
    "_optimizers": 4,
    "_adapt_copy": 5,
    "data": 6,
    "rotation": 6,
    "lca": 6,
    "metrics": 7,
    "models": 6,
    "plot": 7,
    "app": 8,
}
MAX_BODY_LINES = 60


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        yield path, rel.parts, ast.parse(path.read_text(), str(path))


def _imported_top(parts: tuple[str, ...], node: ast.ImportFrom) -> list[str]:
    """Top-level package modules named by a relative or absolute ``from`` import."""
    if node.level == 0:
        mod = node.module or ""
        if not mod.startswith("optax_layca"):
            return []
        rest = mod.split(".")[1:]
        return [rest[0]] if rest else [a.name for a in node.names]
    base = list(parts[:-1])[: len(parts) - node.level]
    full = base + (node.module.split(".") if node.module else [])
    return [full[0]] if full else [a.name for a in node.names]


def test_imports_run_one_way():
    back = []
    for path, parts, tree in _modules():
        if parts[-1] in ("__init__", "__main__") and len(parts) == 1:
            continue  # the package root re-exports every wing
        me = RANK[parts[0]]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for top in _imported_top(parts, node):
                    if top in RANK and RANK[top] > me and top != parts[0]:
                        back.append(f"{path.relative_to(PKG)} imports {top}")
    assert not back, "imports against the layering: " + "; ".join(back)


def _is_module(path: pathlib.Path, node: ast.ImportFrom, name: str) -> bool:
    base = path.parent
    for _ in range(node.level - 1):
        base = base.parent
    if node.level == 0:
        base = PKG.parent
    for part in (node.module or "").split(".") if node.module else ():
        base = base / part
    return (base / f"{name}.py").exists() or (base / name / "__init__.py").exists()


def test_no_private_name_imported_across_modules():
    bad = []
    for path, _, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__"):
                    # a private *module* is fine (``from .. import _io``): the rule is about
                    # private functions and classes reached from another module
                    if _is_module(path, node, name):
                        continue
                    bad.append(f"{path.relative_to(PKG)}: {name} from {node.module}")
    assert not bad, "private names imported across modules: " + "; ".join(bad)


def test_function_bodies_are_short():
    long = []
    for path, _, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                body = body[1:]
            if body:
                n = body[-1].end_lineno - body[0].lineno + 1
                if n > MAX_BODY_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"function bodies over {MAX_BODY_LINES} lines: " + "; ".join(long)


@pytest.mark.parametrize(
    "pattern, why",
    [
        (r"\b[Ss]eed 00\d\b", "cite papers by authors, year and figure, not seed file names"),
        (r"\b[Ii]ssue \d+\b", "the package says nothing about issues"),
    ],
)
def test_source_text(pattern, why):
    hits = [
        f"{path.relative_to(PKG)}:{i}"
        for path, _, _ in _modules()
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(pattern, line)
    ]
    assert not hits, f"{why}: {hits}"
