"""Benchmark the Triton block-sparse kernel on a GPU; see docs/kernel.md.

Checks the kernel at real size, then times cuDNN SDPA dense, FlashAttention-2 SDPA dense,
FlexAttention (identical block masks, built at block level) and the kernel on the same random
bf16 inputs. Appends rows to a CSV, draws the speed-up PNG and prints a table: what
`compact-search bench` does, plus --block-size, a launch-config sweep (--sweep) and redrawing
the plot from a CSV (--plot-only).

    python -m benchmarks.bench_kernel --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from rich.console import Console

from compact_search.bench import (
    DEFAULT_DENSITIES,
    PROVIDERS,
    SHAPES,
    BenchShape,
    csv_rows,
    dense_sdpa,
    head_block_masks,
    parse_float_list,
    plot_speedups,
    relative_error,
    rows_table,
    run_kernel_benchmark,
    shape_by_name,
    time_call,
)
from compact_search.environment import append_rows

# TODO(lead): public names (a launch config and the kernel entry point that takes one).
from compact_search.runtime.triton_attention import kernel_config, triton_sparse_attention

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


def sweep_kernel_configs(
    shape: BenchShape,
    densities: Iterable[float],
    configs: dict[str, object],
    *,
    block_size: int = 128,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[dict[str, object]]:
    """Time the kernel under each named launch config (no autotuning), with cuDNN for scale.

    A config that fails to compile or run is logged and skipped; every output is compared with
    the first config's. Returns rows with config, density, p20/p50/p80 ms and share of ideal.
    """
    generator = torch.Generator(device="cuda").manual_seed(seed)
    size = (1, shape.heads, shape.tokens, shape.head_dim)
    q, k, v = (
        torch.randn(size, device="cuda", dtype=torch.bfloat16, generator=generator)
        for _ in range(3)
    )
    cudnn = dense_sdpa("CUDNN_ATTENTION")
    cudnn_ms = time_call(lambda: cudnn(q, k, v)).p50_ms
    log(f"{shape.name} cudnn dense: {cudnn_ms:.2f} ms")
    rows = []
    for target in densities:
        block_mask = head_block_masks(shape, target, block_size)[0].cuda()
        density = block_mask.float().mean().item()
        expected = None
        for name, config in configs.items():
            use_tma = not name.startswith("pointers")

            def run(config=config, use_tma=use_tma, m=block_mask):
                return triton_sparse_attention(
                    q, k, v, m, block_size=block_size, config=config, use_tma=use_tma
                )

            try:
                out = run()
                torch.cuda.synchronize()
            except Exception as exc:  # a config the compiler rejects is a result, not a crash
                log(f"{name} density {density:.3f}: failed: {type(exc).__name__}: {exc}"[:300])
                continue
            expected = out if expected is None else expected
            error = relative_error(out, expected)
            timing = time_call(run)
            share = cudnn_ms * density / timing.p50_ms
            log(
                f"{name} density {density:.3f}: {timing.p50_ms:.3f} ms, share of ideal "
                f"{share:.3f}, rel err vs first {error:.1e}"
            )
            rows.append(
                {"config": name, "density": density, **vars(timing), "share_of_ideal": share}
            )
    return rows


def read_kernel_csv(path: Path) -> list[dict[str, object]]:
    """Rows of a kernel CSV, numbers parsed back to floats (empty cells stay "")."""

    def parse(value: str) -> object:
        try:
            return float(value)
        except ValueError:
            return value

    with path.open(newline="") as handle:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(handle)]


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
        rows = read_kernel_csv(args.plot_only)
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
    append_rows(args.out_dir / "kernel.csv", csv_rows(rows))
    plot_speedups(rows, args.out_dir / "kernel_speedup.png")
    console.print(rows_table(rows))


if __name__ == "__main__":
    main()
