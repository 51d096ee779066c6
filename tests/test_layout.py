"""The package's layout, checked: imports only run down the layers, the library never imports the
paper's workloads, and no module grows past a size a reader takes in at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "lightning_tracetrain"
# Each part may import the parts of lower levels and its own modules, never a higher level.
LEVELS = {
    "_version": 0,
    "exceptions": 0,
    "console": 1,
    "batch": 1,
    "functional": 1,
    "trainer": 1,
    "trace": 2,
    "singleclass": 2,
    "recording": 3,
    "baselines": 3,
    "explain": 4,
    "lightning_cli": 4,
    "quanda": 5,  # the optional quanda adapter: never imported by the rest of the package
    "workloads": 5,
    "commands": 6,
    "__main__": 7,
    "__init__": 7,
}
MAX_LINES = 350


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _part(path: Path) -> str:
    """The top-level part of the package a file belongs to (``trace`` for ``trace/reader.py``)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _is_module(dotted: str) -> bool:
    where = PACKAGE.joinpath(*dotted.split(".")[1:])
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every module of this package the file imports, inside functions too.

    ``from a.b import c`` imports ``a.b.c`` when that is a module, else it takes ``c`` from ``a.b``.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE.name:
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                found.append((node.lineno, dotted if _is_module(dotted) else node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == PACKAGE.name]
    return found


def test_every_part_has_a_level():
    assert {_part(p) for p in _modules()} == set(LEVELS)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_down_the_layers_only(path):
    here = _part(path)
    own_package = ".".join((PACKAGE.name, *path.relative_to(PACKAGE).parent.parts))
    for line, module in _imports(path):
        parts = module.split(".")
        target = parts[1] if len(parts) > 1 else "__init__"  # the package root imports every part
        where = f"{path.relative_to(PACKAGE)}:{line} imports {module}"
        if target == here:
            # within a part: never through the part's own __init__ (it imports the modules that import it)
            assert path.name == "__init__.py" or module != own_package, where
            continue
        assert LEVELS[target] < LEVELS[here], f"{where}, a level {LEVELS[target]} part from level {LEVELS[here]}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it by concept"


def test_the_library_never_imports_the_workloads():
    library = [p for p in _modules() if LEVELS[_part(p)] < LEVELS["workloads"]]
    for path in library:
        for line, module in _imports(path):
            assert not module.startswith(f"{PACKAGE.name}.workloads"), f"{path.relative_to(PACKAGE)}:{line}"
