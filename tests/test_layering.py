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


def unit_of(name: str) -> str | None:
    """The subpackage or top-level module of compact_search that `name` lies in, if any."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    if (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file():
        return f"compact_search.{parts[1]}"
    return None  # a name the package's __init__ exports, e.g. __version__


def test_no_cycles_between_subpackages_and_modules():
    """Nodes are the subpackages and top-level modules of compact_search; the package's own
    __init__ is a facade over them and is left out."""
    edges: dict[str, set[str]] = {}
    for path in sources("."):
        source = unit_of(module_name(path))
        for name in imported_modules(path):
            target = unit_of(name)
            if source is not None and target not in (None, source):
                edges.setdefault(source, set()).add(target)

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
