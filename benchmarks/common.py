"""What the benchmark scripts share: the results folder, the facts a row carries, the CSV append."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from compact_search.environment import append_rows, environment, git_sha

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "append_rows", "cuda_event_ms", "environment", "git_sha", "p20_p50_p80"]


def p20_p50_p80(sorted_times: list[float]) -> tuple[float, float, float]:
    """The 20th, 50th and 80th percentile of ascending timings (nearest rank)."""
    last = len(sorted_times) - 1
    return tuple(sorted_times[round(q * last)] for q in (0.2, 0.5, 0.8))


def cuda_event_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn``, each between two CUDA events and synchronized
    after it, in call order (exactly ``repeats`` launches, as a profiler's launch count needs)."""
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return times
