"""CPU figure for `compact-search profile`: the built-in model's default profile, end to end.

    taskset -c 0,1 python -m benchmarks.bench_profile_cpu [--threads 2] [--profile tiny]

Runs profiles/<profile>.toml into a temporary folder with torch limited to --threads threads,
then times one captured layer call (dense SDPA vs SDPA + tile mass for every candidate tile) at
the model's shape. Appends a row to benchmarks/results/profile_cpu.csv and prints JSON. The machine
load average and the process's CPU seconds are recorded with the row: other processes on the same
cores inflate the wall time, and CPU seconds / threads estimates it on idle, dedicated cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, append_rows, git_sha
from compact_search.profiling import load_profile, load_settings, run_profile
from compact_search.profiling.settings import resolve_profile_path
from compact_search.profiling.tile_mass import multi_tile_mass


def _median_s(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--csv", type=Path, default=RESULTS / "profile_cpu.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(resolve_profile_path(args.profile))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = run_profile(settings, Path(tmp) / "profile", device="cpu", progress=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        profile = load_profile(Path(tmp) / "profile")
        disk = sum(p.stat().st_size for p in (Path(tmp) / "profile").rglob("*") if p.is_file())
    load_after = os.getloadavg()[0]

    # One captured layer call at the model's shape: batch 2 (guidance), fp32.
    gen = torch.Generator().manual_seed(0)
    shape = (2, profile.num_heads, profile.grid.num_tokens, profile.head_dim)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    dense_s = _median_s(lambda: F.scaled_dot_product_attention(q, k, v))
    capture_s = _median_s(
        lambda: (
            F.scaled_dot_product_attention(q, k, v),
            multi_tile_mass(q, k, profile.grid, profile.tiles),
        )
    )
    row = {
        "profile": args.profile,
        "threads": args.threads,
        "seconds": round(seconds, 1),
        # CPU seconds of all threads over `threads`: the wall time on idle, dedicated cores.
        "cpu_seconds": round(cpu_seconds, 1),
        "idle_cores_estimate_s": round(cpu_seconds / args.threads, 1),
        "layer_steps": result.captured_units,
        "prompts": len(profile.prompts),
        "captured_steps": len(profile.steps),
        "num_steps": profile.num_steps,
        "disk_mb": round(disk / 1e6, 1),
        "dense_layer_call_ms": round(dense_s * 1e3, 1),
        "capture_layer_call_ms": round(capture_s * 1e3, 1),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(load_after, 2),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(row, indent=2))
    append_rows(args.csv, [row])


if __name__ == "__main__":
    main()
