"""Forward time of the video models people run now, random bf16 weights at published sizes.

For each model, in one run: the transformer's forward with dense cuDNN SDPA (through the
model's adapter, on the real tokens only), its self-attention share (every attention call timed
in one more forward), and `compact_search.apply` at mean density 0.3 with per-head masks
planted as benchmarks/bench_e2e.py plants them (five kinds cycling over heads and layers),
run by the kernel `backend="auto"` picks. Each timing is 1 warm-up and `--repeats` timed
forwards.

- hunyuanvideo1.5-720p: HunyuanVideo 1.5 (8.3B: 54 dual-stream layers x 16 heads x 128) at its
  720p default, 720x1280 x 121 frames -> grid 31x45x80 = 111,600 video tokens, plus 128 real
  text tokens of the 1,000 the pipeline pads to (no glyph text, no image: masked out);
- wan2.2-a14b-720p: one Wan2.2-A14B expert (the Wan2.1-14B architecture, 40 x 40 x 128) at
  720x1280 x 81 frames -> 21x45x80 = 75,600 tokens; both experts share the architecture;
- skyreels-v2-14b-720p (only when named in --models): SkyReels-V2-T2V-14B-720P, the same
  architecture at 720x1280 x 121 frames -> 31x45x80 = 111,600 tokens.

Usage: python -m benchmarks.bench_models [--models ...] [--repeats 2] [--out DIR]
       python -m benchmarks.bench_models --smoke   (CPU, toy sizes of the same architectures)
Prints a table and appends rows to DIR/models.csv (default benchmarks/results/models.csv; under
$OUT when that is set).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_e2e import HEAD_KINDS, WAN_COMMON, pattern_at_density
from benchmarks.common import RESULTS, append_rows, environment, p20_p50_p80
from compact_search import apply
from compact_search.config import (
    CompactConfig,
    GeometrySpec,
    HeadEntry,
    ModelSpec,
    StepSchedule,
    default_provenance,
)
from compact_search.geometry import Grid, TileShape
from compact_search.models.adapters import get_adapter

DENSITY = 0.3


@dataclass(frozen=True)
class ModelCase:
    """One transformer at one size: how to build it and one forward's inputs."""

    adapter: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.device, torch.dtype], dict]
    grid: Grid
    tile: TileShape
    prefix_tokens: int
    block_size: int = 128


def hunyuan15_case(smoke: bool) -> ModelCase:
    from diffusers import HunyuanVideo15Transformer3DModel

    if smoke:
        sizes = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2)
        widths = dict(text_embed_dim=24, text_embed_2_dim=8, image_embed_dim=8)
        latent, text, real, byt5, image = (3, 6, 10), 12, 5, 4, 3
        rope, channels, tile, block = (4, 6, 6), (8, 4), TileShape(1, 2, 4), 16
    else:  # the 720p text-to-video checkpoint's config
        sizes = dict(num_attention_heads=16, attention_head_dim=128, num_layers=54)
        widths = dict(text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152)
        latent, text, real, byt5, image = (31, 45, 80), 1000, 128, 256, 729
        rope, channels, tile, block = (16, 56, 56), (65, 32), TileShape(3, 8, 16), 128

    def build():
        return HunyuanVideo15Transformer3DModel(
            in_channels=channels[0],
            out_channels=channels[1],
            num_refiner_layers=2,
            patch_size=1,
            patch_size_t=1,
            rope_axes_dim=rope,
            **sizes,
            **widths,
        )

    def inputs(device, dtype):
        gen = torch.Generator(device=device).manual_seed(1)

        def noise(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

        text_mask = torch.zeros(1, text, dtype=torch.long, device=device)
        text_mask[:, :real] = 1
        return {
            "hidden_states": noise(1, channels[0], *latent),
            # The pipeline casts the timestep to the latents' dtype; the embedder needs it so.
            "timestep": torch.tensor([500.0], device=device, dtype=dtype),
            "encoder_hidden_states": noise(1, text, widths["text_embed_dim"]),
            "encoder_attention_mask": text_mask,
            "encoder_hidden_states_2": noise(1, byt5, widths["text_embed_2_dim"]),
            "encoder_attention_mask_2": torch.zeros(1, byt5, dtype=torch.long, device=device),
            "image_embeds": torch.zeros(
                1, image, widths["image_embed_dim"], device=device, dtype=dtype
            ),
            "return_dict": False,
        }

    return ModelCase("hunyuanvideo15", build, inputs, Grid(*latent), tile, real, block)


def wan_expert_case(smoke: bool, family: str = "WanTransformer3DModel", frames: int = 21):
    import diffusers

    if smoke:
        config = {**WAN_COMMON, "attention_head_dim": 16, "text_dim": 24, "freq_dim": 32}
        config |= dict(num_attention_heads=2, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
        latent, text, tile, block = (3, 8, 12), 6, TileShape(1, 2, 4), 16
    else:  # Wan2.2-T2V-A14B's experts: the Wan2.1-14B architecture
        config = dict(num_attention_heads=40, ffn_dim=13824, num_layers=40, **WAN_COMMON)
        latent, text, tile, block = (frames, 90, 160), 512, TileShape(3, 8, 16), 128

    def inputs(device, dtype):
        gen = torch.Generator(device=device).manual_seed(1)
        return {
            "hidden_states": torch.randn(
                1, config["in_channels"], *latent, generator=gen, device=device, dtype=dtype
            ),
            "timestep": torch.tensor([500.0], device=device),
            "encoder_hidden_states": torch.randn(
                1, text, config["text_dim"], generator=gen, device=device, dtype=dtype
            ),
            "return_dict": False,
        }

    f, h, w = latent
    grid = Grid(f, h // 2, w // 2)
    adapter = "wan" if family == "WanTransformer3DModel" else "skyreels-v2"
    model_class = getattr(diffusers, family)
    return ModelCase(adapter, lambda: model_class(**config), inputs, grid, tile, 0, block)


def skyreels_case(smoke: bool) -> ModelCase:
    """SkyReels-V2-T2V-14B-720P at 720x1280 x 121 frames: 31x45x80 = 111,600 tokens."""
    return wan_expert_case(smoke, "SkyReelsV2Transformer3DModel", frames=31)


MODELS = {
    "hunyuanvideo1.5-720p": hunyuan15_case,
    "wan2.2-a14b-720p": wan_expert_case,
    "skyreels-v2-14b-720p": skyreels_case,
}
DEFAULT_MODELS = ("hunyuanvideo1.5-720p", "wan2.2-a14b-720p")


def planted_config(name: str, case: ModelCase, model, target: float) -> CompactConfig:
    """bench_e2e's planted masks (five kinds cycling over heads and layers) at `target`."""
    adapter = get_adapter(case.adapter)
    layers = adapter.num_layers(model)
    heads, head_dim = adapter.attention_shape(model)
    geometry = GeometrySpec(
        case.grid, case.tile, case.block_size, case.prefix_tokens, adapter.prefix_at
    )
    tile_grid = geometry.layout().tile_grid
    cache = {kind: pattern_at_density(kind, tile_grid, target) for kind in HEAD_KINDS}
    entries = tuple(
        tuple(HeadEntry(cache[HEAD_KINDS[(layer + h) % len(HEAD_KINDS)]]) for h in range(heads))
        for layer in range(layers)
    )
    return CompactConfig(
        ModelSpec(name, case.adapter, layers, heads, head_dim),
        geometry,
        StepSchedule(num_steps=50, dense_steps=15, bucket_starts=(15,)),
        (entries,),
        default_provenance(),
    )


class Clock:
    """Milliseconds of a call: CUDA events on a GPU, perf_counter on the CPU (--smoke)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn) -> float:
        if not self.cuda:
            started = time.perf_counter()
            fn()
            return (time.perf_counter() - started) * 1e3
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop)

    def runs(self, fn, repeats: int) -> list[float]:
        fn()  # warm-up: autotuning, caches
        return sorted(self.time(fn) for _ in range(repeats))


def cudnn_attention(cuda: bool):
    """Dense SDPA with cuDNN on a GPU (the fastest dense backend measured here); any on CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attention(layer, q, k, v):
        if not cuda:
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    return attention


def run_model(name: str, smoke: bool, repeats: int, env: dict, log) -> list[dict]:
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.bfloat16  # the smoke run too: dtype mismatches (a float32 timestep) show on CPU
    case = MODELS[name](smoke)
    torch.manual_seed(0)
    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = case.build().eval()
    finally:
        torch.set_default_dtype(previous)
    log(f"{name}: built in {time.perf_counter() - started:.1f} s")
    inputs = case.inputs(device, dtype)
    adapter = get_adapter(case.adapter)
    clock = Clock(device)

    @torch.no_grad()
    def forward():
        return model(**inputs)[0]

    dense_attention = cudnn_attention(device.type == "cuda")
    with adapter.install(model, dense_attention):
        dense_times = clock.runs(forward, repeats)
        dense_out = forward()
        per_call: list[float] = []

        def timed(layer, q, k, v):
            out = []
            per_call.append(clock.time(lambda: out.append(dense_attention(layer, q, k, v))))
            return out[0]

    with adapter.install(model, timed):
        forward()  # warmed up by the dense runs
    dense = statistics.median(dense_times)
    attention_ms = sum(per_call)
    share = attention_ms / dense
    log(f"{name}: dense {dense:.1f} ms, self-attention {attention_ms:.1f} ms ({share:.1%})")

    config = planted_config(name, case, model, DENSITY)
    summary = config.summary()
    handle = apply(model, config, grid=case.grid)
    handle.set_step(49, 50)
    compact_times = clock.runs(forward, repeats)
    compact_out = forward()
    handle.revert()
    compact = statistics.median(compact_times)
    ideal = dense - attention_ms + summary["mean_density"] * attention_ms
    change = float((compact_out.float() - dense_out.float()).norm() / dense_out.float().norm())
    log(
        f"{name}: compact {compact:.1f} ms at density {summary['mean_density']:.3f} "
        f"({dense / compact:.2f}x; ideal {dense / ideal:.2f}x)"
    )
    shared = {
        "model": name,
        "tokens": case.grid.num_tokens,
        "prefix_tokens": case.prefix_tokens,
        "layers": config.model.num_layers,
        "heads": config.model.num_heads,
        "dtype": str(dtype).removeprefix("torch."),
        "attention_ms": round(attention_ms, 2),
        "attention_share": round(share, 4),
        "repeats": repeats,
        "smoke": smoke,
        **env,
    }

    def row(provider, density, cost, times, extra):
        p20, p50, p80 = p20_p50_p80(times)
        return {
            **shared,
            "provider": provider,
            "density": density,
            "cost": cost,
            "p20_ms": round(p20, 2),
            "p50_ms": round(p50, 2),
            "p80_ms": round(p80, 2),
            **extra,
        }

    return [
        row("dense-cudnn", 1.0, 1.0, dense_times, {}),
        row(
            "compact",
            round(summary["mean_density"], 4),
            round(summary["mean_cost"], 4),
            compact_times,
            {
                "speedup_vs_cudnn": round(dense / compact, 3),
                "ideal_ms": round(ideal, 1),
                "ideal_speedup": round(dense / ideal, 3),
                "output_rel_change": round(change, 4),
            },
        ),
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=", ".join(MODELS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes, same code path")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS)
    env = environment()
    rows = []
    for name in args.models.split(","):
        model_rows = run_model(name, args.smoke, args.repeats, env, lambda m: print(m, flush=True))
        append_rows(out / "models.csv", model_rows)
        rows += model_rows
        if not args.smoke:
            torch.cuda.empty_cache()
    print(
        f"\n{'model':22} {'provider':>12} {'density':>8} {'p50 ms':>10} {'attn share':>10} "
        f"{'x cuDNN':>8} {'ideal x':>8}"
    )
    for r in rows:
        print(
            f"{r['model']:22} {r['provider']:>12} {r['density']:>8} {r['p50_ms']:>10} "
            f"{r['attention_share']:>10} {r.get('speedup_vs_cudnn', ''):>8} "
            f"{r.get('ideal_speedup', ''):>8}"
        )
    return rows


if __name__ == "__main__":
    main()
