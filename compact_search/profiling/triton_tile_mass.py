"""Tile mass on the GPU in Triton: two passes over q and k in tile-slot order, no [N, N] tensor.

Layers, top to bottom: the ``@triton.jit`` kernels -> ``_launch_*`` (block sizes, grids) ->
``triton_tile_mass_sums`` (what ``tile_mass.py`` dispatches to on CUDA) and
``triton_log_sum_exp`` (pass 1 alone, for benchmarks that compare normalisers).

Tokens are first permuted into tile slots (``geometry.TileLayout`` with 64-slot blocks): every tile
is contiguous and padded to whole 64-slot blocks, so a key block of ``BLOCK_N = 64`` slots lies in
exactly one key tile and a query block (64 or 128 slots, autotuned) covers whole 64-slot groups
of one query tile each. Then

1. ``_log_sum_exp_kernel``: the softmax normaliser of every query over all real keys (online max
   and sum, log2 units). Skipped when the caller already has it, e.g. from the dense attention
   call the profiler makes anyway (cuDNN returns it for free).
2. ``_tile_mass_kernel``: for every query block and key block, the probabilities
   ``exp2(s - lse)`` summed over the block's keys and over each 64-query group: one number per
   (query group, key block). Padded keys are masked; padded queries carry ``lse = +inf`` and so
   contribute exact zeros.

Summing those numbers per (query tile, key tile) gives the per-tile probability sums; dividing by
the real query tokens of each tile gives the tile mass. Pass 2 costs one QK^T product and one
exponential per score: about half a dense attention call's arithmetic.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from compact_search.geometry import Grid, TileLayout, TileShape
from compact_search.runtime.kernels.common import LOG2_E, autotune_enabled, interpreting

# Key blocks are 64 slots and tiles are padded to whole key blocks; query probabilities are summed
# per 64-slot group, which never straddles two tiles.
SLOT_BLOCK = 64
BLOCK_N = SLOT_BLOCK
QUERY_GROUP = SLOT_BLOCK
MAX_BLOCK_M = 128

# Query block (a multiple of QUERY_GROUP, at most MAX_BLOCK_M), warps, stages. The first config is
# the one used without autotuning.
KERNEL_CONFIGS = [
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3),
]


def _launch_options(config: triton.Config) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


def tile_mass_kernel_supports(q: torch.Tensor) -> bool:
    """Whether the Triton path serves q: a CUDA tensor with a head dim tl.dot takes (a power of
    two, 16 to 256). CPU tensors take the torch path even under TRITON_INTERPRET=1: the tests
    call `triton_tile_mass_sums` directly for that."""
    head_dim = q.shape[-1]
    power_of_two = 16 <= head_dim <= 256 and (head_dim & (head_dim - 1)) == 0
    return power_of_two and q.is_cuda


@triton.jit
def _log_sum_exp_kernel(
    q_ptr,
    k_ptr,
    key_lengths_ptr,
    lse_ptr,
    num_slots,
    num_key_blocks,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid ``(num_slots // BLOCK_M, B * H)``; q, k ``[B*H, num_slots, D]`` contiguous;
    lse ``[B*H, num_slots]`` fp32 in log2 units of the scaled scores."""
    q_block = tl.program_id(0)
    batch_head = tl.program_id(1).to(tl.int64)
    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.arange(0, HEAD_DIM)  # [D]
    head_base = batch_head * num_slots * HEAD_DIM
    q = tl.load(q_ptr + head_base + rows[:, None] * HEAD_DIM + cols[None, :])  # [BM, D]
    if COMPUTE_IN_FP32:
        q = q.to(tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [BM]
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
    key_offsets = tl.arange(0, BLOCK_N)  # [BN]
    # Key block 0 always holds a real key (tile 0 is never empty), so row_max is finite after it
    # and fully padded blocks later add exp2(-inf) = 0 cleanly.
    for key_block in range(0, num_key_blocks):
        key_rows = key_block * BLOCK_N + key_offsets  # [BN]
        k = tl.load(k_ptr + head_base + key_rows[:, None] * HEAD_DIM + cols[None, :])  # [BN, D]
        if COMPUTE_IN_FP32:
            k = k.to(tl.float32)
        key_length = tl.load(key_lengths_ptr + key_block)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
        scores = tl.where(key_offsets[None, :] < key_length, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))  # [BM]
        row_sum = row_sum * tl.math.exp2(row_max - new_max) + tl.sum(
            tl.math.exp2(scores - new_max[:, None]), 1
        )
        row_max = new_max
    tl.store(lse_ptr + batch_head * num_slots + rows, row_max + tl.math.log2(row_sum))


@triton.jit
def _tile_mass_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    key_lengths_ptr,
    out_ptr,
    num_slots,
    num_key_blocks,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QUERY_GROUP: tl.constexpr,
    COMPUTE_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid ``(num_slots // BLOCK_M, B * H)``; out ``[B*H, num_slots // QUERY_GROUP,
    num_key_blocks]`` fp32: probability summed over each query group and key block."""
    q_block = tl.program_id(0)
    batch_head = tl.program_id(1).to(tl.int64)
    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.arange(0, HEAD_DIM)  # [D]
    head_base = batch_head * num_slots * HEAD_DIM
    q = tl.load(q_ptr + head_base + rows[:, None] * HEAD_DIM + cols[None, :])  # [BM, D]
    if COMPUTE_IN_FP32:
        q = q.to(tl.float32)
    lse = tl.load(lse_ptr + batch_head * num_slots + rows)  # [BM], +inf on padded queries
    GROUPS: tl.constexpr = BLOCK_M // QUERY_GROUP
    groups = q_block * GROUPS + tl.arange(0, GROUPS)  # [G]
    out_rows = out_ptr + (batch_head * (num_slots // QUERY_GROUP) + groups) * num_key_blocks
    key_offsets = tl.arange(0, BLOCK_N)  # [BN]
    for key_block in range(0, num_key_blocks):
        key_rows = key_block * BLOCK_N + key_offsets  # [BN]
        k = tl.load(k_ptr + head_base + key_rows[:, None] * HEAD_DIM + cols[None, :])  # [BN, D]
        if COMPUTE_IN_FP32:
            k = k.to(tl.float32)
        key_length = tl.load(key_lengths_ptr + key_block)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BM, BN]
        probs = tl.math.exp2(scores - lse[:, None])  # [BM, BN]
        probs = tl.where(key_offsets[None, :] < key_length, probs, 0.0)
        row_mass = tl.sum(probs, 1)  # [BM]
        group_mass = tl.sum(tl.reshape(row_mass, [GROUPS, QUERY_GROUP]), 1)  # [G]
        tl.store(out_rows + key_block, group_mass)


_log_sum_exp_tuned = triton.autotune(configs=KERNEL_CONFIGS, key=["num_slots", "HEAD_DIM"])(
    _log_sum_exp_kernel
)
_tile_mass_tuned = triton.autotune(configs=KERNEL_CONFIGS, key=["num_slots", "HEAD_DIM"])(
    _tile_mass_kernel
)


def _dot_precision(x: torch.Tensor) -> str:
    """fp32 inputs get full-precision products (TF32 would cost ~1e-3 relative error)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=32)
def slot_layout(grid: Grid, tile: TileShape) -> TileLayout:
    """The 64-slot-block layout the kernels run on (video tokens only)."""
    return TileLayout(grid, tile, block_size=SLOT_BLOCK)


def _to_slots(x: torch.Tensor, layout: TileLayout) -> torch.Tensor:
    """[B, H, N, D] model order -> [B*H, P, D] contiguous slot order, P a multiple of 128."""
    b, h, _, d = x.shape
    padded = math.ceil(layout.padded_len / MAX_BLOCK_M) * MAX_BLOCK_M
    out = x.new_zeros((b * h, padded, d))
    index = _slot_index(layout, x.device)
    out.index_copy_(1, index, x.reshape(b * h, -1, d))
    return out


@functools.lru_cache(maxsize=32)
def _slot_index(layout: TileLayout, device: torch.device) -> torch.Tensor:
    """[N] int64 slot of every video token, on `device` (cached: built once per capture run)."""
    return layout.token_to_slot.to(device)


@functools.lru_cache(maxsize=32)
def _key_lengths(layout: TileLayout, num_slots: int, device: torch.device) -> torch.Tensor:
    """[num_slots // 64] int32 real keys at the start of every key block (0 past the layout)."""
    lengths = torch.zeros(num_slots // SLOT_BLOCK, dtype=torch.int32)
    lengths[: layout.num_blocks] = layout.block_lengths
    return lengths.to(device)


def _constants(q_slots: torch.Tensor) -> dict:
    """Compile-time constants both kernels share."""
    return {
        "HEAD_DIM": q_slots.shape[-1],
        "BLOCK_N": BLOCK_N,
        "COMPUTE_IN_FP32": interpreting() or q_slots.dtype == torch.float32,
        "DOT_PRECISION": _dot_precision(q_slots),
    }


def _launch(tuned, plain, num_slots: int, bh: int, args: tuple, constants: dict) -> None:
    """Launch over (query blocks, batch x heads): autotuned, or the first config directly."""
    if autotune_enabled():
        tuned[lambda meta: (num_slots // meta["BLOCK_M"], bh)](*args, **constants)
        return
    config = KERNEL_CONFIGS[0]
    plain[(num_slots // config.kwargs["BLOCK_M"], bh)](
        *args, **constants, **config.kwargs, **_launch_options(config)
    )


def _launch_log_sum_exp(
    q_slots: torch.Tensor, k_slots: torch.Tensor, key_lengths: torch.Tensor, qk_scale: float
) -> torch.Tensor:
    bh, num_slots, _ = q_slots.shape
    lse = torch.empty((bh, num_slots), dtype=torch.float32, device=q_slots.device)
    args = (q_slots, k_slots, key_lengths, lse, num_slots, num_slots // BLOCK_N, qk_scale)
    constants = _constants(q_slots)
    _launch(_log_sum_exp_tuned, _log_sum_exp_kernel, num_slots, bh, args, constants)
    return lse


def _launch_tile_mass(
    q_slots: torch.Tensor,
    k_slots: torch.Tensor,
    lse: torch.Tensor,
    key_lengths: torch.Tensor,
    qk_scale: float,
) -> torch.Tensor:
    bh, num_slots, _ = q_slots.shape
    num_key_blocks = num_slots // BLOCK_N
    out = torch.empty(
        (bh, num_slots // QUERY_GROUP, num_key_blocks), dtype=torch.float32, device=q_slots.device
    )
    args = (q_slots, k_slots, lse, key_lengths, out, num_slots, num_key_blocks, qk_scale)
    constants = {**_constants(q_slots), "QUERY_GROUP": QUERY_GROUP}
    _launch(_tile_mass_tuned, _tile_mass_kernel, num_slots, bh, args, constants)
    return out


def _slot_inputs(
    q: torch.Tensor, k: torch.Tensor, layout: TileLayout
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k in slot order [B*H, P, D] (fp64 as fp32) and the real keys per key block."""
    if q.dtype == torch.float64:
        q, k = q.float(), k.float()
    q_slots, k_slots = _to_slots(q, layout), _to_slots(k, layout)  # [B*H, P, D]
    return q_slots, k_slots, _key_lengths(layout, q_slots.shape[1], q.device)


def triton_log_sum_exp(
    q: torch.Tensor, k: torch.Tensor, grid: Grid, tile: TileShape, *, scale: float
) -> torch.Tensor:
    """Pass 1 alone: every query's log-sum-exp over all keys, [B, H, N] fp32, in model order.

    q, k [B, H, N, D] video tokens in model order; the natural log of the scaled scores, as SDPA
    kernels return it. ``triton_tile_mass_sums`` computes this when it is not given one; ``tile``
    fixes the slot layout it runs on (the result does not depend on it beyond rounding).
    """
    b, h, n, _ = q.shape
    layout = slot_layout(grid, tile)
    q_slots, k_slots, key_lengths = _slot_inputs(q, k, layout)
    lse = _launch_log_sum_exp(q_slots, k_slots, key_lengths, scale * LOG2_E)  # [B*H, P], log2
    return lse[:, _slot_index(layout, q.device)].view(b, h, n) / LOG2_E


def triton_tile_mass_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Grid,
    tile: TileShape,
    *,
    scale: float,
    log_sum_exp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Probability sums per (query tile, key tile), summed over the batch: [H, nt, nt] fp32.

    q, k [B, H, N, D] video tokens in model order. ``log_sum_exp`` [B, H, N] (natural log of the
    scaled scores, e.g. from the dense attention call) skips pass 1 when given.
    """
    b, h, n, d = q.shape
    layout = slot_layout(grid, tile)
    q_slots, k_slots, key_lengths = _slot_inputs(q, k, layout)
    num_slots = q_slots.shape[1]
    qk_scale = scale * LOG2_E
    valid_slots = torch.zeros(num_slots, dtype=torch.bool, device=q.device)  # [P]
    valid_slots[_slot_index(layout, q.device)] = True
    if log_sum_exp is None:
        lse = _launch_log_sum_exp(q_slots, k_slots, key_lengths, qk_scale)
    else:
        lse = torch.empty((b * h, num_slots), dtype=torch.float32, device=q.device)
        lse[:, _slot_index(layout, q.device)] = log_sum_exp.reshape(b * h, n).float() * LOG2_E
    # Padded query slots: lse = +inf makes every probability of theirs an exact 0.
    lse = lse.masked_fill(~valid_slots, float("inf"))
    block_sums = _launch_tile_mass(q_slots, k_slots, lse, key_lengths, qk_scale)
    nt = layout.num_tiles
    groups_per_tile = layout.tile_slots // QUERY_GROUP
    blocks_per_tile = layout.tile_slots // BLOCK_N
    tile_part = block_sums.view(b, h, -1, num_slots // BLOCK_N)[
        :, :, : nt * groups_per_tile, : nt * blocks_per_tile
    ]  # [B, H, nt * gpt, nt * bpt]; slots past the layout (block rounding) dropped
    return tile_part.reshape(b, h, nt, groups_per_tile, nt, blocks_per_tile).sum((0, 3, 5))
