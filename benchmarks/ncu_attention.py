"""Launch the Gluon attention kernels a fixed number of times, for Nsight Compute to profile.

    ncu --clock-control none --set full -k regex:gluon --launch-skip 2 --launch-count 1 \\
        -o fp8 python -m benchmarks.ncu_attention --kernels fp8
    python -m benchmarks.ncu_attention --kernels fp8,bf16 --shape wan2.1-1.3b-480p --density 1
    python -m benchmarks.ncu_attention --kernels fp8 --fp8-options stages=3,pingpong=1

On the random inputs and per-head block masks of ``benchmarks.bench_fp8`` (B 1, head dim 128),
each kernel named by ``--kernels`` runs ``--launches`` times with an explicit config (no
autotuning, so every launch is the same kernel): ``fp8`` is the 8-bit Gluon kernel on inputs the
pre-pass quantized once beforehand (the pre-pass is not launched again; ``--fp8-options`` sets
``GluonFP8Config`` options, integers or 0/1 switches), ``bf16`` the bf16 Gluon kernel,
``prepass`` the 8-bit pre-pass (``quantize_qkv``: its statistics and quantization kernels and
its torch glue). Without a profiler around it, it prints each one's median time over its
launches, so the run also checks that the timed configs are the ones profiled.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import cuda_event_ms
from compact_search.bench import head_block_masks, shape_by_name
from compact_search.runtime.kernels.gluon_hopper import GluonConfig, gluon_lut_attention
from compact_search.runtime.kernels.gluon_hopper_fp8 import GluonFP8Config, gluon_fp8_attention
from compact_search.runtime.lut import cached_block_lut
from compact_search.runtime.quantize import quantize_qkv

BLOCK = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="fp8,bf16", help="comma-separated: fp8, bf16, prepass")
    parser.add_argument("--shape", default="wan2.1-1.3b-480p")
    parser.add_argument("--density", type=float, default=1.0, help="target block density")
    parser.add_argument("--launches", type=int, default=4)
    parser.add_argument(
        "--fp8-options", default="", help="GluonFP8Config options, e.g. stages=3,pingpong=1"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_attention needs a CUDA GPU")
    kernels = args.kernels.split(",")
    if unknown := sorted(set(kernels) - {"fp8", "bf16", "prepass"}):
        parser.error(f"unknown --kernels {unknown}; choose from fp8, bf16, prepass")
    try:
        options = dict(item.split("=") for item in args.fp8_options.split(",") if item)
        fp8_config = GluonFP8Config(**{name: int(value) for name, value in options.items()})
    except (TypeError, ValueError) as exc:
        parser.error(f"--fp8-options: {exc}")
    shape = shape_by_name(args.shape)
    generator = torch.Generator(device="cuda").manual_seed(0)
    size = (1, shape.heads, shape.tokens, shape.head_dim)
    q, k, v = (
        torch.randn(size, device="cuda", dtype=torch.bfloat16, generator=generator)
        for _ in range(3)
    )
    block_mask = head_block_masks(shape, args.density, BLOCK)[0].cuda()
    lut = cached_block_lut(block_mask, seq_len=shape.tokens, block_size=BLOCK)
    out = torch.empty_like(q)
    scale = shape.head_dim**-0.5
    runs = {}

    def prepass():
        return quantize_qkv(
            q, k, v, block_size=BLOCK, key_lengths=lut.key_lengths, key_order="wgmma"
        )

    runs["prepass"] = prepass
    if "fp8" in kernels:
        quantized = prepass()
        runs["fp8"] = lambda: gluon_fp8_attention(
            quantized, lut, out, scale=scale, config=fp8_config
        )
    if "bf16" in kernels:
        runs["bf16"] = lambda: gluon_lut_attention(
            q, k, v, lut, block_size=BLOCK, scale=scale, out=out, config=GluonConfig()
        )
    density = block_mask.float().mean().item()
    for name in kernels:
        ms = statistics.median(cuda_event_ms(runs[name], args.launches))
        tflops = 4 * shape.tokens**2 * shape.head_dim * shape.heads * density / ms / 1e9
        rate = "" if name == "prepass" else f", {tflops:.1f} TFLOP/s"
        print(f"{shape.name} density {density:.3f} {name}: {ms:.3f} ms{rate}")


if __name__ == "__main__":
    main()
