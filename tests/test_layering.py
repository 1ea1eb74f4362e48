"""The import graph runs one way: stages above, the adapter registry and its models below.

Read with `ast` (every import statement, also those inside functions), so nothing is imported.
The built-in model is a plug-in of the registry: profiling and evaluate never name it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "compact_search"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every compact_search name `path` imports: modules, and module.name for `from m import
    name` (relative imports resolved against the module's package)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "compact_search"}


def sources(*where: str) -> list[Path]:
    paths = []
    for name in where:
        target = PACKAGE / name
        paths += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert paths, where
    return paths


def importers_of(prefix: str, *where: str) -> list[str]:
    return [
        f"{module_name(path)} imports {name}"
        for path in sources(*where)
        for name in sorted(imported_modules(path))
        if name == prefix or name.startswith(prefix + ".")
    ]


def test_profiling_and_evaluate_never_import_the_built_in_model():
    assert importers_of("compact_search.models.tiny", "profiling", "evaluate.py") == []


def test_profiling_and_evaluate_never_name_the_built_in_model():
    named = [
        f"{module_name(path)}:{node.lineno}"
        for path in sources("profiling", "evaluate.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and ("builtin:tiny" in node.value or "models.tiny" in node.value)
    ]
    assert named == []


@pytest.mark.parametrize(
    "upper",
    ["profiling", "search", "export", "check", "evaluate", "demo", "bench", "runtime"],
)
def test_models_never_import_the_stages_above_them(upper):
    assert importers_of(f"compact_search.{upper}", "models") == []


@pytest.mark.parametrize("upper", ["profiling", "search"])
def test_runtime_never_imports_profiling_or_search(upper):
    assert importers_of(f"compact_search.{upper}", "runtime") == []


ROOT = "compact_search"


def unit_of(name: str) -> str:
    """The node of the import graph that `name` lies in: a subpackage or top-level module of
    compact_search, or the package itself (its `__init__`, with the names it exports such as
    `__version__` and `sparse_attention`)."""
    parts = name.split(".")
    if len(parts) >= 2 and (
        (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file()
    ):
        return f"{ROOT}.{parts[1]}"
    return ROOT


def import_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sources("."):
        source = unit_of(module_name(path))
        for name in imported_modules(path):
            target = unit_of(name)
            if target != source:
                edges.setdefault(source, set()).add(target)
    return edges


def test_the_package_facade_sits_above_everything_in_it():
    """`compact_search/__init__.py` re-exports the public API; nothing inside imports it back
    (the version string lives in `_version.py` for that)."""
    importers = sorted(source for source, targets in import_edges().items() if ROOT in targets)
    assert importers == []


def test_no_cycles_between_subpackages_and_modules():
    """Nodes are the subpackages and top-level modules of compact_search and the package's own
    `__init__`; an edge is any import, also one inside a function."""
    edges = import_edges()

    state: dict[str, str] = {}

    def visit(current: str, trail: list[str]) -> None:
        state[current] = "open"
        for target in sorted(edges.get(current, ())):
            if state.get(target) == "open":
                cycle = trail[trail.index(target) :] + [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, trail + [target])
        state[current] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
