"""What a lookup-table sidecar would save when a 14B-sized config is loaded, on CPU.

A Wan2.1-14B config (40 layers x 40 heads, 720p x 81 frames = grid 21x45x80, tile 3x8x16, block
128, every head a planted pattern family from `compact_search.search.synthetic`, drawn anew per
step bucket, windows widened 2x to a mean density near 0.3) is built in code and saved. Then,
timed on this CPU:

- parsing the config JSON (`load_config`);
- building every (bucket, layer) block mask from it (`CompactConfig.block_masks`): `apply` needs
  these with or without a sidecar, since `sparse_attention` takes the block mask;
- building every lookup table from those masks (`build_block_lut`): the part a sidecar of
  precomputed tables would replace;
- writing such a sidecar (safetensors, the tables of every (bucket, layer)) and loading it back
  (`safetensors.torch.load_file` and a copy of every tensor, warm page cache: its best case).

With CUDA present the lookup tables are also built on the GPU, as the runtime builds them there.
Run as `python -m benchmarks.bench_config_load [--buckets 3] [--layers N]`; prints the numbers
and appends a row to benchmarks/results/config_load.csv.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import RESULTS, append_rows, environment
from compact_search.config import (
    CompactConfig,
    GeometrySpec,
    HeadEntry,
    ModelSpec,
    StepSchedule,
    default_provenance,
    load_config,
    save_config,
)
from compact_search.geometry import DEFAULT_BLOCK_SIZE, Grid, TileShape
from compact_search.runtime.lut import build_block_lut
from compact_search.search.synthetic import SyntheticProfile, planted_pattern

GRID = Grid(21, 45, 80)  # Wan2.1 720p x 81 frames
TILE = TileShape(3, 8, 16)  # 384 tokens = 3 blocks of 128; tile grid 7x6x5
LAYERS, HEADS, HEAD_DIM, STEPS, DENSE_STEPS = 40, 40, 128, 50, 10


def wan14b_config(num_buckets: int, num_layers: int, window_scale: float) -> CompactConfig:
    """Per-head planted patterns (kind and window scale drawn per bucket, layer and head)."""
    geometry = GeometrySpec(GRID, TILE, DEFAULT_BLOCK_SIZE)
    tile_grid = geometry.layout().tile_grid
    span = (STEPS - DENSE_STEPS) // num_buckets
    schedule = StepSchedule(
        STEPS, DENSE_STEPS, tuple(DENSE_STEPS + b * span for b in range(num_buckets))
    )
    buckets = []
    for bucket in range(num_buckets):
        kinds = SyntheticProfile(
            GRID, (TILE,), num_layers, HEADS, STEPS, (STEPS - 1,), seed=bucket
        ).head_kinds  # [layer][head] -> (kind, scale)
        entries = [
            tuple(
                HeadEntry(planted_pattern(kind, tile_grid, scale * window_scale))
                for kind, scale in layer
            )
            for layer in kinds
        ]
        buckets.append(tuple(entries))
    model = ModelSpec("Wan2.1-T2V-14B (planted patterns)", "wan", num_layers, HEADS, HEAD_DIM)
    return CompactConfig(model, geometry, schedule, tuple(buckets), default_provenance())


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def write_sidecar(path: Path, pairs: list, luts: list, lengths: torch.Tensor) -> None:
    """The tables of every (bucket, layer) in one safetensors file, as the sidecar held them."""
    tables = {"key_lengths": lengths.contiguous()}
    for (b, layer), lut in zip(pairs, luts, strict=True):
        for name in ("kv_block_ids", "full_counts", "total_counts", "q_block_order"):
            tables[f"b{b}.l{layer}.{name}"] = getattr(lut, name).contiguous()
    save_file(tables, str(path))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buckets", type=int, default=2, help="step buckets (2 or 3)")
    parser.add_argument("--layers", type=int, default=LAYERS, help="layers (40 for the 14B)")
    parser.add_argument(
        "--window-scale", type=float, default=2.0, help="widen planted windows (2: density ~0.3)"
    )
    args = parser.parse_args()

    config = wan14b_config(args.buckets, args.layers, args.window_scale)
    layout = config.layout()
    pairs = [(b, layer) for b in range(args.buckets) for layer in range(args.layers)]
    lengths = layout.key_block_lengths()
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "wan14b.json"
        save_config(config, config_path)
        parse_s, config = seconds(lambda: load_config(config_path))

        masks_s, masks = seconds(lambda: [config.block_masks(b, layer) for b, layer in pairs])

        def build_luts(device: str) -> list:
            luts = [
                build_block_lut(
                    mask.to(device),
                    seq_len=layout.padded_len,
                    block_size=layout.block_size,
                    key_block_lengths=lengths.to(device),
                )
                for mask in masks
            ]
            if device == "cuda":
                torch.cuda.synchronize()
            return luts

        luts_s, luts = seconds(lambda: build_luts("cpu"))
        luts_cuda_s = None
        if torch.cuda.is_available():
            build_luts("cuda")  # first use of the device
            luts_cuda_s, _ = seconds(lambda: build_luts("cuda"))

        sidecar = Path(folder) / "wan14b.luts.safetensors"
        write_s, _ = seconds(lambda: write_sidecar(sidecar, pairs, luts, lengths))
        luts.clear()  # free them before the load holds its own copy
        # load_file maps the file lazily: copying every tensor reads each byte, as a move to
        # the GPU would.
        load_s, loaded = seconds(
            lambda: {name: t.clone() for name, t in load_file(str(sidecar)).items()}
        )
        sidecar_mb = sidecar.stat().st_size / 2**20
        config_mb = config_path.stat().st_size / 2**20
        del loaded

    density = sum(float(m.float().mean()) for m in masks) / len(masks)
    env = environment()
    row = {
        "benchmark": "config_load",
        "model": "wan2.1-14b-shape",
        "grid": str(GRID),
        "tile": str(TILE),
        "block_size": layout.block_size,
        "buckets": args.buckets,
        "window_scale": args.window_scale,
        "layers": args.layers,
        "heads": HEADS,
        "num_blocks": layout.num_blocks,
        "mean_block_density": round(density, 4),
        "config_mb": round(config_mb, 2),
        "parse_s": round(parse_s, 3),
        "block_masks_s": round(masks_s, 3),
        "luts_cpu_s": round(luts_s, 3),
        "luts_cuda_s": "" if luts_cuda_s is None else round(luts_cuda_s, 3),
        "sidecar_mb": round(sidecar_mb, 1),
        "sidecar_write_s": round(write_s, 3),
        "sidecar_load_s": round(load_s, 3),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": env["torch"],
        "git_sha": env["git_sha"],
        "date": env["date"],
    }
    print(
        f"{config.model.name}: {args.buckets} buckets x {args.layers} layers x {HEADS} heads, "
        f"{layout.num_blocks} blocks of {layout.block_size}, mean block density {density:.3f}"
    )
    print(f"config JSON {config_mb:.1f} MB, parse {parse_s:.2f} s")
    print(f"block masks from the config (needed with or without a sidecar): {masks_s:.2f} s")
    print(f"lookup tables from the masks, CPU: {luts_s:.2f} s")
    if luts_cuda_s is not None:
        print(f"lookup tables from the masks, CUDA: {luts_cuda_s:.3f} s")
    print(f"sidecar {sidecar_mb:.0f} MB: write {write_s:.2f} s, load {load_s:.2f} s (warm cache)")
    print(f"on {row['cpu']}, {row['threads']} threads, torch {row['torch']}, sha {row['git_sha']}")
    append_rows(RESULTS / "config_load.csv", [row])
    print(f"row appended to {RESULTS / 'config_load.csv'}")


if __name__ == "__main__":
    main()
