"""What the benchmark scripts share: the results folder, the facts a row carries, the CSV append."""

from __future__ import annotations

from pathlib import Path

from compact_search.environment import append_rows, environment, git_sha

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "append_rows", "environment", "git_sha"]
