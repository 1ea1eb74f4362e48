"""What a CTA of the Gluon kernels costs besides its tiles (GPU).

    python -m benchmarks.bench_cta_cost                       # 1.3B 480p shape, T 1..256
    python -m benchmarks.bench_cta_cost --tiles 2,8,32 --shape wan2.1-14b-720p
    python -m benchmarks.bench_cta_cost --variants default,rows2,rows4

Every query block row keeps exactly T key blocks (a band, wrapping around), so every CTA of a
kernel has the same work and a launch takes ``waves * (fixed + T * per_tile)`` with ``waves =
CTAs / SMs`` (one CTA an SM: both kernels take the whole register file). A least-squares line
through the times per wave against T gives each kernel's per-tile time (slope) and its fixed
cost a CTA (intercept): launching the CTA, Q's load, filling and draining the pipeline, the
epilogue and its store. ``--variants`` names 8-bit configs of ``bench_fp8.probe_variants`` (V
in one e4m3 term). At low density a row has few tiles, so the fixed cost is a larger share
of the time; this says how large.

Each point is a CUDA graph of ``REPLAYS`` launches timed with events, so host-side launch cost
is not in it. The bf16 Gluon kernel reads the bf16 inputs; the 8-bit one reads the pre-pass's
outputs (made once, not timed). Prints a table and the fit, appends rows to
benchmarks/results/cta_cost.csv and, when OUT is set, writes the log and rows there too.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from benchmarks.bench_fp8 import probe_variants
from benchmarks.common import RESULTS, append_rows
from compact_search.bench import SHAPES, shape_by_name
from compact_search.environment import environment
from compact_search.runtime.kernels.gluon_hopper import GluonConfig, gluon_lut_attention
from compact_search.runtime.kernels.gluon_hopper_fp8 import gluon_fp8_attention
from compact_search.runtime.lut import cached_block_lut
from compact_search.runtime.quantize import quantize_qkv

BLOCK = 128
REPLAYS = 20
DEFAULT_TILES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def band_mask(num_blocks: int, tiles: int, device) -> torch.Tensor:
    """``[1, nb, nb]`` bool: row i keeps key blocks i, i+1, ..., i+T-1 (mod nb)."""
    rows = torch.arange(num_blocks, device=device)[:, None]
    kept = (rows + torch.arange(tiles, device=device)[None, :]) % num_blocks  # [nb, T]
    mask = torch.zeros(num_blocks, num_blocks, dtype=torch.bool, device=device)
    mask.scatter_(1, kept, True)
    return mask[None]


def graph_ms(run, replays: int = REPLAYS, repeats: int = 5) -> float:
    """Median over ``repeats`` of one replay of a graph of ``replays`` calls, per call (ms)."""
    run()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()  # warm up on the capture stream
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(replays):
            run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[len(times) // 2]


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``: (a, b)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    return mean_y - slope * mean_x, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="wan2.1-1.3b-480p", help=", ".join(SHAPES))
    parser.add_argument("--tiles", default=",".join(map(str, DEFAULT_TILES)))
    parser.add_argument("--variants", default="default", help="8-bit configs, comma-separated")
    parser.add_argument("--csv", type=Path, default=RESULTS / "cta_cost.csv")
    args = parser.parse_args()
    offered = {name: v for name, v in probe_variants().items() if v[1] == 1}  # one V term
    variants = args.variants.split(",")
    unknown = [name for name in variants if name not in offered]
    if unknown:
        parser.error(f"unknown --variants {unknown}; one-term configs: {sorted(offered)}")
    shape = shape_by_name(args.shape)
    tile_counts = [int(t) for t in args.tiles.split(",")]
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    env = environment()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    generator = torch.Generator(device="cuda").manual_seed(0)
    size = (1, shape.heads, shape.tokens, shape.head_dim)
    q, k, v = (torch.randn(size, device="cuda", generator=generator).bfloat16() for _ in range(3))
    num_blocks = math.ceil(shape.tokens / BLOCK)
    ctas = num_blocks * shape.heads
    waves = ctas / sms
    log(f"{env['device']}: {shape.name}, {ctas} CTAs over {sms} SMs ({waves:.2f} waves)")
    scale = shape.head_dim**-0.5
    out = torch.empty_like(q)
    rows, per_wave = [], {"bf16": [], **{f"fp8 {name}": [] for name in variants}}
    for tiles in tile_counts:
        lut = cached_block_lut(
            band_mask(num_blocks, tiles, q.device), seq_len=shape.tokens, block_size=BLOCK
        )
        quantized = quantize_qkv(
            q, k, v, block_size=BLOCK, key_lengths=lut.key_lengths, key_order="wgmma"
        )
        runs = {
            "bf16": lambda lut=lut: gluon_lut_attention(
                q, k, v, lut, scale=scale, out=out, config=GluonConfig()
            )
        }
        for name in variants:
            runs[f"fp8 {name}"] = lambda lut=lut, quantized=quantized, name=name: (
                gluon_fp8_attention(quantized, lut, out, scale=scale, config=offered[name][0])
            )
        for kernel, run in runs.items():
            ms = graph_ms(run)
            us_per_wave = 1e3 * ms / waves
            per_wave[kernel].append(us_per_wave)
            rows.append(
                {
                    **env,
                    "shape": shape.name,
                    "kernel": kernel,
                    "tiles_per_row": tiles,
                    "ms": round(ms, 4),
                    "us_per_wave": round(us_per_wave, 3),
                }
            )
            log(f"T {tiles:4d} {kernel}: {ms:.4f} ms, {us_per_wave:.2f} us a wave")
    for kernel, times in per_wave.items():
        fixed, per_tile = fit_line([float(t) for t in tile_counts], times)
        worst = max(
            abs(fixed + per_tile * t - y) / y for t, y in zip(tile_counts, times, strict=True)
        )
        log(
            f"{kernel}: fixed {fixed:.2f} us a CTA, {per_tile:.3f} us a tile "
            f"({fixed / per_tile:.1f} tiles' worth); worst point off the line by {worst:.1%}"
        )
    append_rows(args.csv, rows)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "bench_cta_cost.log").open("a") as handle:
            handle.write("\n".join(lines) + "\n")
        append_rows(out_dir / "cta_cost.csv", rows)


if __name__ == "__main__":
    main()
