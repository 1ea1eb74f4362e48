"""Benchmark the Triton block-sparse kernel on a GPU; see docs/kernel.md.

Checks the kernel at real size, then times cuDNN SDPA dense, FlashAttention-2 SDPA dense,
FlexAttention (identical block masks, built at block level) and the kernel on the same random
bf16 inputs. Appends rows to a CSV, draws the speed-up PNG and prints a table.

    PYTHONPATH=. python benchmarks/bench_kernel.py --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from compact_search.bench import (
    DEFAULT_DENSITIES,
    PROVIDERS,
    SHAPES,
    append_csv,
    parse_float_list,
    plot_speedups,
    read_csv,
    rows_table,
    run_kernel_benchmark,
    shape_by_name,
    sweep_kernel_configs,
)
from compact_search.runtime.triton_attention import kernel_config

# name -> config for --sweep; a name starting with "pointers" runs without tensor descriptors.
SWEEP_CONFIGS = {
    "BM128-BN64-w4-s3": kernel_config(128, 64, 4, 3),
    "pointers-BM128-BN64-w4-s3": kernel_config(128, 64, 4, 3),
    "BM128-BN64-w4-s2": kernel_config(128, 64, 4, 2),
    "BM128-BN64-w4-s4": kernel_config(128, 64, 4, 4),
    "BM128-BN64-w8-s3": kernel_config(128, 64, 8, 3),
    "BM128-BN128-w8-s2": kernel_config(128, 128, 8, 2),
    "BM128-BN128-w8-s3": kernel_config(128, 128, 8, 3),
    "BM64-BN64-w4-s3": kernel_config(64, 64, 4, 3),
    "BM64-BN128-w4-s3": kernel_config(64, 128, 4, 3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shape names")
    parser.add_argument(
        "--densities", default=",".join(map(str, DEFAULT_DENSITIES)), help="comma-separated"
    )
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--plot-only",
        type=Path,
        help="redraw the PNG from this CSV (e.g. rows merged from several runs) and exit",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="time fixed kernel configs on the first shape instead"
    )
    parser.add_argument(
        "--configs", help="with --sweep: comma-separated names from SWEEP_CONFIGS (default all)"
    )
    args = parser.parse_args()

    console = Console(width=140)
    if args.plot_only:
        rows = read_csv(args.plot_only)
        plot_speedups(rows, args.out_dir / "kernel_speedup.png")
        console.print(rows_table(rows))
        return
    if args.sweep:
        sweep_kernel_configs(
            shape_by_name(args.shapes.split(",")[0]),
            parse_float_list(args.densities, "--densities"),
            {n: SWEEP_CONFIGS[n] for n in args.configs.split(",")}
            if args.configs
            else SWEEP_CONFIGS,
            block_size=args.block_size,
            log=lambda line: console.print(line, highlight=False),
        )
        return
    rows = run_kernel_benchmark(
        [shape_by_name(name) for name in args.shapes.split(",")],
        parse_float_list(args.densities, "--densities"),
        providers=args.providers.split(","),
        block_size=args.block_size,
        log=lambda line: console.print(line, highlight=False),
    )
    append_csv(rows, args.out_dir / "kernel.csv")
    plot_speedups(rows, args.out_dir / "kernel_speedup.png")
    console.print(rows_table(rows))


if __name__ == "__main__":
    main()
