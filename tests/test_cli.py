"""The command line as a user meets it: a real subprocess, exit codes, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=600,
    )


def test_help_lists_working_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("profile", "optimize", "export", "check", "evaluate", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize(
    "args",
    [("nosuch",), ("check",), ("demo", "--seed", "x")],
    ids=["unknown-command", "missing-option", "bad-value"],
)
def test_usage_errors_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_demo_block_size_must_suit_the_kernel():
    result = run_cli("demo", "--block-size", "24")
    assert result.returncode == 2
    assert "--block-size must be a power of two >= 16, got 24" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_files_give_one_line_and_debug_gives_the_traceback(tmp_path):
    truncated = tmp_path / "config.json"
    truncated.write_text('{"format": "compact-search/config", "vers')
    result = run_cli("check", "--config", str(truncated), "--profile", str(tmp_path))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not valid JSON" in lines[0] and str(truncated) in lines[0]
    debug = run_cli("--debug", "check", "--config", str(truncated), "--profile", str(tmp_path))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_error_lines_keep_square_brackets(tmp_path):
    """rich markup must not eat bracketed text such as "run[extra]" in messages."""
    folder = tmp_path / "run[extra]"
    folder.mkdir()
    truncated = folder / "config.json"
    truncated.write_text('{"format": "compact-search/config", "vers')
    result = run_cli("check", "--config", str(truncated), "--profile", str(tmp_path))
    assert result.returncode == 2
    assert str(truncated) in " ".join(result.stderr.split())
