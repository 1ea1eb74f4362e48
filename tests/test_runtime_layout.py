"""The runtime's import rules, read from the source with `ast` (nothing is imported to check them).

- Kernel modules (`runtime/kernels/*.py` but `common` and `gluon_common`) never import each
  other: what they share lives in `kernels/common.py` (plain facts, no triton) and
  `kernels/gluon_common.py` (what the two Gluon kernels share), which import no kernel either.
  Only the chooser (`runtime/attention.py`) picks one.
- Nothing under `runtime/` imports `compact_search.profiling` or `compact_search.search`
  (runtime sits below them), not even inside a function.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "compact_search"
RUNTIME = PACKAGE / "runtime"
KERNELS = RUNTIME / "kernels"
KERNEL_PACKAGE = "compact_search.runtime.kernels"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import statement anywhere in `source` (the text of `module`) names,
    relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            # `from package import module` names a module too
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imported_modules(path: Path) -> set[str]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def kernel_modules() -> list[Path]:
    shared = ("__init__.py", "common.py", "gluon_common.py")
    return sorted(p for p in KERNELS.glob("*.py") if p.name not in shared)


def test_the_kernels_are_where_the_docs_say():
    assert [p.stem for p in kernel_modules()] == [
        "flex",
        "gluon_hopper",
        "gluon_hopper_fp8",
        "reference",
        "reference_fp8",
        "triton_portable",
        "triton_portable_fp8",
    ]


def test_every_kernel_module_is_one_the_chooser_names():
    from compact_search.runtime.attention import EIGHT_BIT_TWINS, KERNELS

    named = {entry.module for entry in KERNELS.values()}
    assert named == {module_name(p) for p in kernel_modules()}
    for precision, twins in EIGHT_BIT_TWINS.items():
        assert all(KERNELS[twin].module.endswith("_fp8") for twin in twins.values()), precision


@pytest.mark.parametrize(
    "path",
    [*kernel_modules(), KERNELS / "common.py", KERNELS / "gluon_common.py"],
    ids=lambda p: p.stem,
)
def test_kernel_modules_never_import_each_other(path: Path):
    kernels = {module_name(p) for p in kernel_modules()}
    own = module_name(path)
    assert not (imported_modules(path) & (kernels - {own}))


@pytest.mark.parametrize(
    "path", sorted(RUNTIME.rglob("*.py")), ids=lambda p: str(p.relative_to(RUNTIME))
)
def test_runtime_never_imports_profiling_or_search(path: Path):
    above = ("compact_search.profiling", "compact_search.search")
    bad = [
        m
        for m in imported_modules(path)
        if m in above or m.startswith(tuple(a + "." for a in above))
    ]
    assert not bad, f"{path.name} imports {bad}"


def test_the_import_reader_sees_lazy_and_relative_imports():
    """The checks above would pass vacuously if the reader missed imports inside functions."""
    source = "def f():\n    from .reference import masked_reference\n    from .. import apply\n"
    names = imports_in(source + "import torch.nn\n", f"{KERNEL_PACKAGE}.fake")
    assert {f"{KERNEL_PACKAGE}.reference", "compact_search.runtime.apply", "torch.nn"} <= names
    flex = imported_modules(KERNELS / "flex.py")
    assert "torch.nn.attention.flex_attention" in flex  # imported inside a function


def test_every_registered_kernel_takes_the_chooser_and_the_operator_arguments():
    from compact_search.runtime.attention import KERNELS as REGISTERED
    from compact_search.runtime.attention import kernel_function

    for name in REGISTERED:
        try:
            run = kernel_function(name)
        except ValueError:  # a Triton without the Gluon Hopper API
            assert name == "triton-gluon"
            continue
        parameters = inspect.signature(run).parameters
        assert list(parameters)[:4] == ["q", "k", "v", "block_mask"], name
        for keyword in ("block_size", "scale", "key_block_lengths"):
            assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY, (name, keyword)
        from_tables = inspect.signature(kernel_function(name, from_tables=True)).parameters
        assert list(from_tables)[:4] == ["q", "k", "v", "lut"], name
        for keyword in ("block_size", "scale"):
            assert from_tables[keyword].kind is inspect.Parameter.KEYWORD_ONLY, (name, keyword)
