"""What the benchmark scripts share: the results folder, the facts a row carries, the CSV append."""

from __future__ import annotations

from pathlib import Path

from compact_search.environment import append_rows, environment, git_sha

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "append_rows", "environment", "git_sha", "p20_p50_p80"]


def p20_p50_p80(sorted_times: list[float]) -> tuple[float, float, float]:
    """The 20th, 50th and 80th percentile of ascending timings (nearest rank)."""
    last = len(sorted_times) - 1
    return tuple(sorted_times[round(q * last)] for q in (0.2, 0.5, 0.8))
