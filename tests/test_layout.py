"""The layout rules a maintainer relies on, checked so they stay true.

docs/architecture.md states them: the import direction between the layers, one module
per concept (none past 600 lines), no reaching into another module's private names, the
package list in pyproject.toml, and the module names the architecture page itself cites.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Directories that are not part of the source tree.
SKIP = {".git", ".ci", "build", "dist", "sectorfsm.egg-info", "__pycache__", ".pytest_cache"}
MAX_LINES = 600
#: Underscored names that are public API of the standard library.
STDLIB_PUBLIC = {"_exit", "_asdict", "_replace", "_fields", "_make", "_getframe"}
#: Layer -> the layers of ours it may import.
ALLOWED = {
    "fsm": set(),
    "sched": {"fsm"},
    "sealing": {"fsm", "sched"},
    "statecharts": {"sealing"},
    "simulate": {"fsm", "sched", "sealing"},
    "cli": {"fsm", "sched", "sealing", "statecharts", "simulate"},
}


def _sources() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if not SKIP.intersection(rel.parts):
            yield path


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_passes_600_lines() -> None:
    long = {_rel(p): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"modules past {MAX_LINES} lines: split them by concept"


def _layer(path: Path) -> str | None:
    rel = path.relative_to(ROOT).parts
    return rel[0] if len(rel) > 1 and rel[0] in ALLOWED else None


def _imported_layers(path: Path, tree: ast.Module) -> Iterator[tuple[int, str]]:
    package = path.relative_to(ROOT).parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = [*base, *(node.module or "").split(".")]
                parts = [p for p in parts if p]
                if not parts:  # `from .. import x` at the root: x is the layer
                    for alias in node.names:
                        yield node.lineno, alias.name
                    continue
                yield node.lineno, parts[0]
            elif node.module and node.module.startswith("sectorfsm."):
                yield node.lineno, node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sectorfsm."):
                    yield node.lineno, alias.name.split(".")[1]


def test_layers_import_only_downwards() -> None:
    bad = []
    for path in _sources():
        layer = _layer(path)
        if layer is None:
            continue
        for line, other in _imported_layers(path, _tree(path)):
            if other in ALLOWED and other != layer and other not in ALLOWED[layer]:
                bad.append(f"{_rel(path)}:{line}: {layer}/ imports {other}/")
    assert bad == []


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [
        f"{_rel(path)}:{node.lineno}: from {node.module} import {alias.name}"
        for path in _sources()
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if _private(alias.name)
    ]
    assert bad == []


def _defined_privates(tree: ast.Module) -> set[str]:
    """Private names a module defines itself: its own attributes, functions and globals."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if _private(n)}


def test_no_module_reaches_into_another_modules_privates() -> None:
    """`obj._name` is allowed only for a `_name` the module defines itself."""
    bad = []
    for path in _sources():
        if _layer(path) is None and path.parts[-2] != "bench":
            continue  # tests may look inside what they test
        tree = _tree(path)
        own = _defined_privates(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and node.attr not in own
                and node.attr not in STDLIB_PUBLIC
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                bad.append(f"{_rel(path)}:{node.lineno}: {ast.unparse(node)}")
    assert bad == []


def test_pyproject_lists_every_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {"sectorfsm"} | {
        "sectorfsm." + ".".join(p.parent.relative_to(ROOT).parts)
        for p in ROOT.rglob("__init__.py")
        if p.parent != ROOT and not SKIP.intersection(p.relative_to(ROOT).parts)
    }
    assert listed == found


def test_architecture_page_names_only_modules_that_exist() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    # (the repository root is the package, so `sectorfsm/x.py` is `x.py` here)
    named = {
        n.removeprefix("sectorfsm/") for n in re.findall(r"`([a-z_]+(?:/[a-z_]+)*\.py)\b", text)
    }
    assert named, "the architecture page names no module"
    sources = {p.name for p in _sources()}
    missing = sorted(n for n in named if not ((ROOT / n).is_file() if "/" in n else n in sources))
    assert missing == []


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_every_public_function_says_what_it_does(layer: str) -> None:
    """Each public function, method and class of the package has a docstring."""
    bare = [
        f"{_rel(path)}:{node.lineno}: {node.name}"
        for path in sorted((ROOT / layer).rglob("*.py"))
        for node in _public_defs(_tree(path).body)
        if ast.get_docstring(node) is None and not _overload_or_property_setter(node)
    ]
    assert bare == []


def _public_defs(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Module-level functions and classes, and the methods of those classes (not closures)."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name.startswith("_"):
                continue
            yield node
            if isinstance(node, ast.ClassDef):
                yield from _public_defs(node.body)


def _overload_or_property_setter(node: ast.AST) -> bool:
    decorators = getattr(node, "decorator_list", [])
    return any(
        (isinstance(d, ast.Name) and d.id == "overload")
        or (isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter"))
        for d in decorators
    )
