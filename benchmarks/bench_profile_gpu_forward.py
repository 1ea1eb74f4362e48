"""End-to-end GPU capture through the Wan adapter: a random-weight Wan2.1-1.3B-architecture
transformer (bf16) at 480p x 81 frames (32,760 tokens), one forward dense vs one forward with
every layer captured (TileMassRecorder, tiles 3x8x8, 3x8x16, 3x16x16).

    python -m benchmarks.bench_profile_gpu_forward [--json PATH]

Overhead per captured layer-step = (captured forward - dense forward) / layers, reported also as
a multiple of one dense cuDNN attention call at the same shape.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from diffusers import WanTransformer3DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from compact_search.geometry import Grid, TileShape
from compact_search.models.wan import install_wan_attention
from compact_search.profiling.capture import TileMassRecorder

GRID = Grid(21, 30, 52)
TILES = (TileShape(3, 8, 8), TileShape(3, 8, 16), TileShape(3, 16, 16))


def cudnn_attention(layer, q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
        ).to(torch.bfloat16).eval()  # fmt: skip
    inputs = {
        "hidden_states": torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16),
        "timestep": torch.tensor([500.0], device="cuda"),
        "encoder_hidden_states": torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16),
        "return_dict": False,
    }
    recorder = TileMassRecorder(GRID, TILES, "start")
    layers = frozenset(range(30))

    def dense_forward():
        with torch.no_grad(), install_wan_attention(model, cudnn_attention):
            return model(**inputs)[0]

    def captured_forward():
        recorder.start_step(layers)
        with torch.no_grad(), install_wan_attention(model, recorder):
            out = model(**inputs)[0]
        return out, recorder.take()

    reference = dense_forward()
    out, masses = captured_forward()
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "output_max_abs_diff_captured_vs_dense": (out - reference).abs().max().item(),
        "layers_captured": len(masses),
        "row_sum_err_max": max(
            (m.sum(-1) - 1).abs().max().item() for per in masses.values() for m in per.values()
        ),
    }
    dense_ms = triton.testing.do_bench(dense_forward, warmup=1, rep=3000)
    captured_ms = triton.testing.do_bench(captured_forward, warmup=1, rep=3000)
    q = torch.randn(1, 12, GRID.num_tokens, 128, device="cuda", dtype=torch.bfloat16)
    attention_ms = triton.testing.do_bench(lambda: cudnn_attention(0, q, q, q))
    per_layer_step = (captured_ms - dense_ms) / 30
    result |= {
        "dense_forward_ms": round(dense_ms, 1),
        "captured_forward_ms": round(captured_ms, 1),
        "dense_cudnn_attention_ms": round(attention_ms, 2),
        "overhead_per_layer_step_ms": round(per_layer_step, 2),
        "overhead_per_layer_step_x_attention": round(per_layer_step / attention_ms, 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
