"""Shared test setup.

The Triton interpreter must be chosen before triton is imported anywhere: kernel tests run on CPU
under TRITON_INTERPRET=1 (the Makefile sets it too). GPU tests carry the `gpu` marker and skip
without CUDA.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The GPU machine's image has no optuna (a hard dependency here): its modules hold no GPU tests,
# so `pytest -m gpu` there skips collecting them instead of stopping on the import error.
collect_ignore = (
    ["test_search_solver.py", "test_search_study.py"]
    if importlib.util.find_spec("optuna") is None
    else []
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; CI and this machine have none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
