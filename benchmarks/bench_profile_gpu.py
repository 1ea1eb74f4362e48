"""GPU figures for `compact-search profile` at the Wan2.1-1.3B 480p attention shape.

One run: (1) correctness of the Triton tile mass against the chunked torch path at full size,
(2) timings with the dense cuDNN attention call in the same process. Writes a JSON summary and
appends rows to benchmarks/results/profile_gpu.csv (or --csv).

    python -m benchmarks.bench_profile_gpu [--csv PATH] [--json PATH]

Overhead per captured layer-step = (dense attention returning its log-sum-exp + tile mass for
every candidate tile, from q and k, pooled) - (plain dense cuDNN attention), over the latter.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import RESULTS, append_rows, git_sha
from compact_search.geometry import Grid, TileShape
from compact_search.profiling.dense import dense_attention_with_log_sum_exp
from compact_search.profiling.tile_mass import (
    base_tile_of,
    multi_tile_mass,
    sums_to_mass,
    torch_tile_mass_sums,
)
from compact_search.profiling.triton_tile_mass import (
    LOG2_E,
    _key_lengths,  # TODO(lead): public name
    _launch_log_sum_exp,  # TODO(lead): public name
    _to_slots,  # TODO(lead): public name
    slot_layout,
    triton_tile_mass_sums,
)

GRID = Grid(21, 30, 52)  # Wan2.1 480p x 81 frames
HEADS, HEAD_DIM = 12, 128
TILES = [TileShape(3, 8, 8), TileShape(3, 8, 16), TileShape(3, 16, 16)]


def median_ms(fn, reps: int = 20) -> tuple[float, float, float]:
    p20, p50, p80 = triton.testing.do_bench(fn, rep=reps * 30, quantiles=[0.2, 0.5, 0.8])
    return p20, p50, p80


def structured_qk(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q/k/v plus a shared low-rank positional component, so attention is peaked (local),
    not uniform: a harder test of the normaliser than white noise."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = GRID.num_tokens
    shape = (1, HEADS, n, HEAD_DIM)
    pos = torch.randn((1, HEADS, n, HEAD_DIM), generator=gen, device="cuda")
    smooth = F.avg_pool1d(pos.reshape(HEADS, n, HEAD_DIM).transpose(1, 2), 9, 1, 4)
    smooth = smooth.transpose(1, 2).reshape(shape) * 6.0
    q = (torch.randn(shape, generator=gen, device="cuda") + smooth).bfloat16()
    k = (torch.randn(shape, generator=gen, device="cuda") + smooth).bfloat16()
    v = torch.randn(shape, generator=gen, device="cuda").bfloat16()
    return q, k, v


def triton_pass1_log_sum_exp(
    q: torch.Tensor, k: torch.Tensor, grid: Grid, tile: TileShape, scale: float
) -> torch.Tensor:
    """The tile-mass kernel's own first pass: log-sum-exp [B, H, N] (natural log), token order.

    TODO(lead): public name. profiling.triton_tile_mass has no public function returning the
    pass-1 log-sum-exp alone, so this reaches for its slot layout and launcher.
    """
    batch, heads = q.shape[:2]
    layout = slot_layout(grid, tile)
    q_slots, k_slots = _to_slots(q, layout), _to_slots(k, layout)
    key_lengths = _key_lengths(layout, q_slots.shape[1], q.device)
    lse = _launch_log_sum_exp(q_slots, k_slots, key_lengths, scale * LOG2_E)  # log2 units
    return lse[:, layout.token_to_slot.to(q.device)].view(batch, heads, -1) / LOG2_E


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=RESULTS / "profile_gpu.csv")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    q, k, v = structured_qk()
    scale = HEAD_DIM**-0.5
    base = base_tile_of(TILES)
    result: dict[str, object] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": f"B1-H{HEADS}-N{GRID.num_tokens}-D{HEAD_DIM}-bf16",
        "grid": str(GRID),
        "tiles": [str(t) for t in TILES],
        "base_tile": str(base),
    }

    # (1) correctness at full size: Triton (own normaliser, and cuDNN's) vs torch fp32 chunks.
    reference = sums_to_mass(torch_tile_mass_sums(q, k, GRID, base, scale=scale), GRID, base, 1)
    own = sums_to_mass(triton_tile_mass_sums(q, k, GRID, base, scale=scale), GRID, base, 1)
    result["max_abs_err_triton_vs_torch"] = (own - reference).abs().max().item()
    result["max_row_sum_err_triton"] = (own.sum(-1) - 1).abs().max().item()
    own_lse = triton_pass1_log_sum_exp(q, k, GRID, base, scale)
    exact_lse = torch.logsumexp(
        torch.einsum("bhqd,bhkd->bhqk", q[:, :, :2048].float(), k.float()) * scale, -1
    )
    result["max_lse_err_pass1_vs_exact_first2048"] = (
        (own_lse[:, :, :2048] - exact_lse).abs().max().item()
    )
    for name, op in (
        (
            "cudnn",
            lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, False, False, scale=scale
            ),
        ),
        (
            "flash",
            lambda: torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, False, False, scale=scale
            ),
        ),
    ):
        try:
            lse = op()[1]
            result[f"{name}_lse_shape"] = list(lse.shape)
            lse = lse.reshape(1, HEADS, -1)[:, :, : GRID.num_tokens].float()
            result[f"max_lse_err_{name}_vs_pass1"] = (lse - own_lse).abs().max().item()
        except RuntimeError as exc:
            result[f"{name}_lse_error"] = str(exc).splitlines()[0][:200]
    _, fused_lse = dense_attention_with_log_sum_exp(q, k, v, scale=scale)
    result["fused_lse_available"] = fused_lse is not None
    if fused_lse is not None:
        given = sums_to_mass(
            triton_tile_mass_sums(q, k, GRID, base, scale=scale, log_sum_exp=fused_lse),
            GRID,
            base,
            1,
        )
        result["max_abs_err_triton_given_lse_vs_torch"] = (given - reference).abs().max().item()
        result["max_row_sum_err_triton_given_lse"] = (given.sum(-1) - 1).abs().max().item()
    del reference

    # (2) timings
    def dense_cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def dense_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def capture_given_lse():
        out, lse = dense_attention_with_log_sum_exp(q, k, v, scale=scale)
        return out, multi_tile_mass(q, k, GRID, TILES, scale=scale, log_sum_exp=lse)

    def capture_two_pass():
        out = dense_cudnn()
        return out, multi_tile_mass(q, k, GRID, TILES, scale=scale)

    def tile_mass_pass2_only():
        return triton_tile_mass_sums(q, k, GRID, base, scale=scale, log_sum_exp=fused_lse)

    timings = {
        "dense_cudnn": dense_cudnn,
        "dense_flash2": dense_flash,
        "dense_with_lse": lambda: dense_attention_with_log_sum_exp(q, k, v, scale=scale),
        "tile_mass_pass2_base": tile_mass_pass2_only,
        "capture_given_lse": capture_given_lse,
        "capture_two_pass": capture_two_pass,
    }
    rows = []
    for name, fn in timings.items():
        if name == "tile_mass_pass2_base" and fused_lse is None:
            continue
        fn()
        torch.cuda.synchronize()
        p20, p50, p80 = median_ms(fn)
        result[f"{name}_ms"] = round(p50, 3)
        rows.append((name, p20, p50, p80))
    torch.cuda.synchronize()
    reps = 3
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        torch_tile_mass_sums(q, k, GRID, base, scale=scale)
    end.record()
    torch.cuda.synchronize()
    result["torch_chunked_base_ms"] = round(start.elapsed_time(end) / reps, 3)
    dense = result["dense_cudnn_ms"]
    result["overhead_given_lse_x_dense"] = round(
        (result["capture_given_lse_ms"] - dense) / dense, 3
    )
    result["overhead_two_pass_x_dense"] = round((result["capture_two_pass_ms"] - dense) / dense, 3)
    print(json.dumps(result, indent=2))
    sha, date = git_sha(), datetime.date.today().isoformat()
    append_rows(
        args.csv,
        [
            {
                "kernel": "profile-capture",
                "provider": name,
                "shape": result["shape"],
                "tiles": " ".join(result["tiles"]),
                "p20_ms": f"{p20:.3f}",
                "p50_ms": f"{p50:.3f}",
                "p80_ms": f"{p80:.3f}",
                "gpu": result["gpu"],
                "torch": torch.__version__,
                "triton": triton.__version__,
                "git_sha": sha,
                "date": date,
            }
            for name, p20, p50, p80 in rows
        ],
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
