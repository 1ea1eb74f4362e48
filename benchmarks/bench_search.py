"""Benchmark `optimize` on a synthetic Wan2.1-14B-sized problem (CPU only).

Default problem: 40 layers x 40 heads, 720p x 81 frames (latent grid 21x45x80), three candidate
tile shapes of 280-360 tiles, 6 captured steps x 2 prompts, 2 step buckets (3,200 bucket-heads).
Reports the wall time of the whole search and its parts, the per-head solve times, and Optuna's
per-trial overhead; appends one row to benchmarks/results/search.csv.

    .venv/bin/python -m benchmarks.bench_search             # the full problem
    .venv/bin/python -m benchmarks.bench_search --layers 4  # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import tempfile
import time

import numpy as np
import optuna

from benchmarks.common import RESULTS, append_rows, git_sha
from compact_search.search import SearchConfig, optimize_profile
from compact_search.search.offsets import recall_tables
from compact_search.search.shards import geometry_of
from compact_search.search.solver import LayerSolver
from compact_search.search.synthetic import SyntheticProfile

SEARCH_CSV = RESULTS / "search.csv"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def per_head_times(profile: SyntheticProfile, config: SearchConfig) -> dict[str, float]:
    """CPU ms per head for one layer: tables, trial solve, final solve with fronts (finest
    groups, as the default search), exact solver (3 groups; column exact_ms_per_head)."""
    geometry = geometry_of(profile, profile.tiles[0], config.block_size)
    mass = profile.sample_tile_mass(0, geometry.tile)  # [S, H, nq, nk]
    started = time.process_time()
    tables = np.ascontiguousarray(np.moveaxis(recall_tables(mass, geometry.tile_grid), 0, 1))
    table_ms = (time.process_time() - started) * 1e3 / profile.num_heads
    # the default search's finest frame groups: one per temporal tile distance
    solver = LayerSolver(geometry.cost_model, tuple(range(1, geometry.tile_grid.frames)))
    # the exact solver only at 3 groups: its front merge grows combinatorially with groups
    three_groups = LayerSolver(geometry.cost_model, (1, 3))
    out = {"tables_ms_per_head": table_ms}
    for name, run in (
        ("trial_ms_per_head", lambda: solver.head_costs(tables, config.solver_config())),
        ("final_ms_per_head", lambda: solver.solve(tables, config.solver_config(front=True))),
        (
            "exact_ms_per_head",
            lambda: three_groups.solve(tables, config.solver_config(), exact=True),
        ),
    ):
        run()  # warm caches
        started = time.process_time()
        run()
        out[name] = (time.process_time() - started) * 1e3 / profile.num_heads
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--buckets", type=int, default=2)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    profile = SyntheticProfile(
        grid=(21, 45, 80),
        tiles=[(3, 8, 10), (4, 8, 8), (3, 9, 10)],
        num_layers=args.layers,
        num_heads=args.heads,
        num_steps=50,
        steps=(4, 12, 20, 28, 36, 44),
        num_prompts=2,
    )
    config = SearchConfig(n_trials=args.trials, workers=args.workers, num_buckets=args.buckets)
    heads = per_head_times(profile, config)
    with tempfile.TemporaryDirectory() as run_dir:
        cpu_before = cpu_seconds()
        started = time.perf_counter()
        result = optimize_profile(profile, run_dir, config)
        wall = time.perf_counter() - started
        cpu = cpu_seconds() - cpu_before
    timings = result.study["timings"]
    trials_run = max(1, timings["trials_run"])
    trial_seconds = timings["trials"] / trials_run
    optuna_overhead_ms = (timings["trials"] - timings["objective"]) * 1e3 / trials_run
    row = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_sha(),
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "layers": args.layers,
        "heads": args.heads,
        "buckets": args.buckets,
        "tiles": " ".join(str(t) for t in profile.tiles),
        "samples": len(profile.steps) * len(profile.prompts),
        "trials": args.trials,
        "wall_s": round(wall, 1),
        # CPU seconds of this process and its workers: on a shared machine wall time includes
        # waiting for cores; cpu_s / workers is what dedicated cores would take.
        "cpu_s": round(cpu, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "tables_s": round(timings["tables"], 1),
        "trials_s": round(timings["trials"], 1),
        "per_trial_s": round(trial_seconds, 2),
        "optuna_overhead_ms": round(optuna_overhead_ms, 1),
        "final_s": round(timings["final"], 1),
        "report_s": round(wall - result.study["seconds"], 1),
        **{k: round(v, 3) for k, v in heads.items()},
        "objective": round(result.objective, 4),
        "mean_cost": round(float(np.mean([h.cost for h in result.heads])), 4),
        "greedy_cost": round(float(np.mean([h.greedy_cost for h in result.heads])), 4),
        "mean_density": round(float(np.mean([h.density for h in result.heads])), 4),
        "tile": "x".join(map(str, result.tile)),
        "dense_steps": result.dense_steps,
    }
    append_rows(SEARCH_CSV, [row])
    for key, value in row.items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
