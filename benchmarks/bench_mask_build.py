"""How long building a tile mask from a head pattern takes, on one CPU core.

Target (issue 2): a 1,000-tile mask in under 10 ms. Prints a table and appends to
benchmarks/results/mask_build.csv.

    python -m benchmarks.bench_mask_build      # or: make bench-mask
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import RESULTS, append_rows, environment
from compact_search.geometry import Grid
from compact_search.patterns import FrameGroup, HeadPattern, Rect

TILE_GRIDS = {"1000 tiles (10x10x10)": Grid(10, 10, 10), "420 tiles (7x6x10)": Grid(7, 6, 10)}


def patterns(tg: Grid) -> dict[str, HeadPattern]:
    return {
        "local": HeadPattern.local(2, 2, 2),
        "cross": HeadPattern.cross(1, 1, tg),
        "global": HeadPattern.global_(tg),
        "3-group mixed": HeadPattern(
            (
                FrameGroup(0, 2, (Rect(tg.height - 1, 1), Rect(1, tg.width - 1))),
                FrameGroup(2, 5, (Rect(2, 2),)),
                FrameGroup(5, tg.frames),
            )
        ),
    }


def time_ms(fn, repeats: int = 50) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return sorted(out)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    env = environment()
    rows = []
    print(f"{'tile grid':24} {'pattern':14} {'p20 ms':>8} {'p50 ms':>8} {'p80 ms':>8}")
    for grid_name, tg in TILE_GRIDS.items():
        for name, pattern in patterns(tg).items():
            times = time_ms(lambda p=pattern, g=tg: p.tile_mask(g))
            p20, p50, p80 = (times[int(q * (len(times) - 1))] for q in (0.2, 0.5, 0.8))
            print(f"{grid_name:24} {name:14} {p20:8.2f} {p50:8.2f} {p80:8.2f}")
            rows.append(
                {
                    "benchmark": "tile_mask_build",
                    "tile_grid": str(tg),
                    "tiles": tg.num_tokens,
                    "pattern": name,
                    "threads": 1,
                    "p20_ms": round(p20, 3),
                    "p50_ms": round(p50, 3),
                    "p80_ms": round(p80, 3),
                    "mean_ms": round(statistics.fmean(times), 3),
                    **env,
                }
            )
    append_rows(RESULTS / "mask_build.csv", rows)
    print(f"appended {len(rows)} rows to {RESULTS / 'mask_build.csv'}")


if __name__ == "__main__":
    main()
