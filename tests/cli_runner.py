"""Drive the CLI in-process, as a test would from a shell, and read its exit code."""

import pytest

import cli


def run(*args) -> int:
    """`compact-search ARGS...` through `cli.main`; returns the exit code it ends with."""
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args])
    return info.value.code
