"""End-to-end forward time of diffusers Wan transformers (random bf16 weights) on a GPU.

For each shape, in one run: dense forward with cuDNN SDPA and with FlashAttention-2 SDPA, the
self-attention share of the dense forward, and `compact_search.apply` at mean densities 0.2-0.5
with per-head masks from the pattern family (planted kinds cycling over heads and layers), with
the Triton kernel and with FlexAttention through the same processor. Also: the ideal
(non-attention time + density x dense attention time) and the runtime's own work (token
permutation into and out of the tile layout) as a share of the compact forward.

Usage: python -m benchmarks.bench_e2e [--shapes wan1.3b-480p,wan14b-720p] [--out DIR]
Appends to benchmarks/results/e2e.csv (or DIR/e2e.csv) and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, append_rows, cuda_event_ms, environment, p20_p50_p80
from compact_search import apply, sparse_attention
from compact_search.config import (
    CompactConfig,
    GeometrySpec,
    HeadEntry,
    ModelSpec,
    StepSchedule,
    default_provenance,
)
from compact_search.geometry import Grid, TileShape
from compact_search.models.wan import install_wan_attention
from compact_search.patterns import FrameGroup, HeadPattern, Rect, density
from compact_search.runtime.attention import selected_kernel

WAN_COMMON = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
SHAPES = {
    # Wan2.1-T2V-1.3B at 480p x 81 frames: latent 21 x 60 x 104 -> 21 x 30 x 52 tokens
    "wan1.3b-480p": dict(
        model=dict(num_attention_heads=12, ffn_dim=8960, num_layers=30, **WAN_COMMON),
        latent=(21, 60, 104),
        tile=(2, 16, 4),
        repeats=5,
    ),
    # Wan2.1-T2V-14B at 720p x 81 frames: latent 21 x 90 x 160 -> 21 x 45 x 80 tokens
    "wan14b-720p": dict(
        model=dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, **WAN_COMMON),
        latent=(21, 90, 160),
        tile=(3, 8, 16),
        repeats=3,
    ),
}
DENSITIES = (0.2, 0.3, 0.4, 0.5)
FLEX_DENSITIES = (0.3,)


HEAD_KINDS = ("local", "cross", "temporal", "decaying", "peaking")


def head_pattern(kind: str, tile_grid: Grid, scale: float) -> HeadPattern:
    """A pattern of one kind; `scale` in [0, 1] grows its windows from minimal to full."""
    ft, ht, wt = tile_grid.as_tuple()

    def size(limit: int, fraction: float = 1.0) -> int:
        return max(0, min(limit - 1, round(scale * fraction * (limit - 1))))

    if kind == "local":
        return HeadPattern.local(size(ft), size(ht), size(wt))
    if kind == "cross":
        return HeadPattern.cross(size(ft), size(min(ht, wt), 0.5), tile_grid)
    if kind == "temporal":  # whole frames, near in time
        return HeadPattern.global_(tile_grid, frames=size(ft))
    if kind == "decaying":  # wide on near frames, narrower further away
        near = max(1, size(ft, 0.3))
        return HeadPattern(
            (
                FrameGroup(0, near, (Rect(size(ht), size(wt)),)),
                FrameGroup(near, ft, (Rect(size(ht, 0.4), size(wt, 0.4)),)),
            )
        )
    if kind == "peaking":  # nothing on the nearest frames, a window further away
        gap = max(1, round(0.3 * ft))
        return HeadPattern((FrameGroup(0, gap), FrameGroup(gap, ft, (Rect(size(ht), size(wt)),))))
    raise ValueError(kind)


def pattern_at_density(kind: str, tile_grid: Grid, target: float) -> HeadPattern:
    """Bisect the kind's scale until its density is closest to target."""
    best = None
    low, high = 0.0, 1.0
    for _ in range(16):
        mid = (low + high) / 2
        pattern = head_pattern(kind, tile_grid, mid)
        value = float(density(pattern.tile_mask(tile_grid)))
        if best is None or abs(value - target) < abs(best[0] - target):
            best = (value, pattern)
        low, high = (mid, high) if value < target else (low, mid)
    return best[1]


def random_config(name, layers, heads, grid, tile, target) -> CompactConfig:
    geometry = GeometrySpec(grid, tile, block_size=128)
    tile_grid = geometry.layout().tile_grid
    cache = {kind: pattern_at_density(kind, tile_grid, target) for kind in HEAD_KINDS}
    layer_entries = []
    for layer in range(layers):
        row = tuple(
            HeadEntry(cache[HEAD_KINDS[(layer + h) % len(HEAD_KINDS)]]) for h in range(heads)
        )
        layer_entries.append(row)
    return CompactConfig(
        ModelSpec(name, "wan", layers, heads, 128),
        geometry,
        StepSchedule(num_steps=50, dense_steps=15, bucket_starts=(15,)),
        (tuple(layer_entries),),
        default_provenance(),
    )


def cuda_ms(fn, repeats: int) -> list[float]:
    fn()  # warm-up: compilation, autotuning, caches
    return sorted(cuda_event_ms(fn, repeats))


def sdpa_with(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def attention(layer, q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return attention


def timed_attention(inner, totals: list[float]):
    def attention(layer, q, k, v):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = inner(layer, q, k, v)
        stop.record()
        torch.cuda.synchronize()
        totals.append(start.elapsed_time(stop))
        return out

    return attention


def run_shape(name: str, spec: dict, env: dict, log) -> list[dict]:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    from diffusers import WanTransformer3DModel

    build_start = time.perf_counter()
    with torch.device("cuda"):
        model = WanTransformer3DModel(**spec["model"]).eval()
    torch.set_default_dtype(previous)
    log(f"{name}: built in {time.perf_counter() - build_start:.1f} s")
    f, h, w = spec["latent"]
    gen = torch.Generator(device="cuda").manual_seed(1)
    latents = torch.randn(1, 16, f, h, w, generator=gen, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 512, 4096, generator=gen, device="cuda", dtype=torch.bfloat16)
    timestep = torch.tensor([500.0], device="cuda")
    grid = Grid(f, h // 2, w // 2)
    layers, heads = spec["model"]["num_layers"], spec["model"]["num_attention_heads"]

    @torch.no_grad()
    def forward():
        return model(latents, timestep, text, return_dict=False)[0]

    rows, results = [], {}

    def record(provider, target, cost, times, extra=None):
        p20, p50, p80 = p20_p50_p80(times)
        results[(provider, target)] = p50
        rows.append(
            {
                "shape": name,
                "tokens": grid.num_tokens,
                "layers": layers,
                "heads": heads,
                "provider": provider,
                "density": target,
                "cost": cost,
                "p20_ms": round(p20, 2),
                "p50_ms": round(p50, 2),
                "p80_ms": round(p80, 2),
                **(extra or {}),
                **env,
            }
        )
        log(f"{name} {provider:>12} density {target}: {p50:9.1f} ms")

    for provider, backend in (("dense-cudnn", "CUDNN_ATTENTION"), ("dense-fa2", "FLASH_ATTENTION")):
        with install_wan_attention(model, sdpa_with(backend)):
            record(provider, 1.0, 1.0, cuda_ms(forward, spec["repeats"]))
    attention_ms: list[float] = []
    with install_wan_attention(model, timed_attention(sdpa_with("CUDNN_ATTENTION"), attention_ms)):
        forward()
        attention_ms.clear()
        forward()
    dense_attention = sum(attention_ms)
    dense = results[("dense-cudnn", 1.0)]
    share = dense_attention / dense
    log(f"{name}: self-attention {dense_attention:.1f} ms of {dense:.1f} ms ({share:.1%})")

    reference_out = None
    for target in DENSITIES:
        config = random_config(name, layers, heads, grid, TileShape(*spec["tile"]), target)
        summary = config.summary()
        ideal = dense - dense_attention + summary["mean_density"] * dense_attention
        for backend in ("triton", "flex"):
            if backend == "flex" and target not in FLEX_DENSITIES:
                continue
            handle = apply(model, config, grid=grid, backend=backend)
            handle.set_step(49, 50)
            times = cuda_ms(forward, spec["repeats"])
            out = forward()
            handle.revert()
            check = ""
            if target == FLEX_DENSITIES[0]:
                if reference_out is None:
                    reference_out = out.float()
                else:  # flex vs triton on the same masks: both sparse, must agree
                    check = float((out.float() - reference_out).norm() / reference_out.norm())
                    log(f"{name}: flex vs triton forward rel. error {check:.2e}")
            record(
                f"compact-{backend}",
                round(summary["mean_density"], 4),
                round(summary["mean_cost"], 4),
                times,
                {
                    "ideal_ms": round(ideal, 1),
                    "speedup_vs_cudnn": round(dense / statistics.median(times), 3),
                    "speedup_vs_fa2": round(
                        results[("dense-fa2", 1.0)] / statistics.median(times), 3
                    ),
                    "ideal_speedup": round(dense / ideal, 3),
                    "attention_share": round(share, 4),
                    "check_rel_error": check,
                },
            )

    # The runtime's own work per layer (permutations in and out, mask lookup, step logic): one
    # layer's attention through the handle minus the kernel alone on pre-permuted inputs.
    config = random_config(name, layers, heads, grid, TileShape(*spec["tile"]), 0.3)
    layout = config.layout()
    handle = apply(model, config, grid=grid, backend="triton")
    handle.set_step(49, 50)
    qkv = [
        torch.randn(1, grid.num_tokens, heads, 128, device="cuda", dtype=torch.bfloat16).transpose(
            1, 2
        )
        for _ in range(3)
    ]  # [B, H, N, D] views of [B, N, H, D], as the processor passes them
    slots = [layout.to_slots(t) for t in qkv]
    masks = handle.block_masks(0, 0, torch.device("cuda"))
    lengths = handle.key_block_lengths(torch.device("cuda"), prefix_tokens=0)  # Wan: no text
    through_handle = statistics.median(cuda_ms(lambda: handle.attention(0, *qkv), 20))
    kernel_alone = statistics.median(
        cuda_ms(
            lambda: sparse_attention(
                *slots,
                masks,
                block_size=layout.block_size,
                backend="triton",
                key_block_lengths=lengths,
            ),
            20,
        )
    )
    log(f"{name}: kernel {selected_kernel(*slots, block_size=layout.block_size, backend='triton')}")
    handle.revert()
    per_layer = through_handle - kernel_alone
    compact = results[("compact-triton", round(config.summary()["mean_density"], 4))]
    log(
        f"{name}: runtime work {per_layer:.3f} ms/layer (attention through the handle "
        f"{through_handle:.2f} ms, kernel alone {kernel_alone:.2f} ms) = "
        f"{per_layer * layers / compact:.2%} of the compact forward at the same density"
    )
    for row in rows:
        row["runtime_overhead_ms_per_layer"] = round(per_layer, 4)
        row["runtime_overhead_share"] = round(per_layer * layers / compact, 4)

    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    env = environment()
    all_rows = []

    def log(message: str) -> None:
        print(message, flush=True)

    for name in args.shapes.split(","):
        rows = run_shape(name, SHAPES[name], env, log)
        append_rows(args.out / "e2e.csv", rows)
        all_rows += rows
    print(
        f"\n{'shape':14} {'provider':>15} {'density':>8} {'cost':>6} {'p50 ms':>9} "
        f"{'x cuDNN':>8} {'x FA2':>6} {'ideal x':>8}"
    )
    for r in all_rows:
        print(
            f"{r['shape']:14} {r['provider']:>15} {r['density']:>8} {r['cost']:>6} "
            f"{r['p50_ms']:>9} {r.get('speedup_vs_cudnn', ''):>8} {r.get('speedup_vs_fa2', ''):>6} "
            f"{r.get('ideal_speedup', ''):>8}"
        )


if __name__ == "__main__":
    main()
