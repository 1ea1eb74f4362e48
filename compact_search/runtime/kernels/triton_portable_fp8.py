"""Portable 8-bit block-sparse attention in ``tl``: the CI path (Triton interpreter), GPUs with
FP8 tensor cores but no Gluon kernel (compute capability 8.9, 10.x, 12.x) and the cross-check for
the Hopper kernel.

Reads what ``runtime/quantize.quantize_qkv`` wrote and the same lookup tables as the bf16
kernels. One program computes one query block (BLOCK_SIZE rows, one mask block) of one (batch,
head) and walks its kept key blocks in lookup-table order, one key block per tile:

    S = Q8 K8^T                                   (INT8 x INT8 -> int32, exact)
    t = S * (q_scale_i * (k_scale_j * qk_scale))   (fp32; -inf for padded keys)
    m_new = max(m, max_j t);  p = exp2(t - (m_new - log2 448))     (p in (0, 448])
    l = l * exp2(m - m_new) + sum_j p             (P before rounding; the Gluon kernel sums the
                                                   rounded P on its tensor cores)
    acc = acc * exp2(m - m_new) + e4m3(p) V8       (FP8 x FP8, a fresh fp32 sum per tile;
                                                   with V in two terms, + e4m3(p) V8_low)
    out = acc / l * v_scale + v_mean

With INT8 V (``QuantizedQKV.v_format`` "int8", ``INT8_PV``) P is rounded to INT8 against the
tile's own row max ``t``, ``p8 = rne(127 exp2(t_ij - t))``, and the tile's exact int32
``p8 V8`` and integer row sum join the running sums with the weight ``exp2(t - m_new)``:
``acc = acc * exp2(m - m_new) + (p8 V8) * exp2(t - m_new)``, as the emulation and the Gluon
kernel compute it.

The fresh per-tile sum added to the running accumulator in fp32 is the "two-level" accumulation
the Hopper kernel also does by default. Under the interpreter ``EMULATE_ROUNDING`` rounds P with
``round_to_e4m3`` (the interpreter's own fp32 -> fp8 cast is wrong for inexact values); on a GPU
the hardware conversion does the same rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compact_search.runtime.kernels.common import LOG2_E, interpreting
from compact_search.runtime.lut import BlockLUT
from compact_search.runtime.quantize import (
    LOG2_INT8_P_SCALE_C,
    LOG2_P_SCALE_C,
    RESCALE_THRESHOLD_C,
    QuantizedQKV,
    quantize_qkv,
    round_half_even,
    round_to_e4m3,
    runtime_v_terms,
)

__all__ = [
    "portable_fp8_attention",
    "portable_fp8_lut_attention",
    "portable_fp8_supports",
]


@triton.jit
def _fp8_block_sparse_attention_kernel(
    q8_ptr,
    q_scale_ptr,
    k8_ptr,
    k_scale_ptr,
    v8_ptr,
    v_scale_ptr,
    v_mean_ptr,
    o_ptr,
    kv_block_ids_ptr,
    total_counts_ptr,
    key_lengths_ptr,
    q_block_order_ptr,
    stride_ob,
    stride_oh,
    stride_on,
    num_heads,
    mask_heads,
    num_blocks,
    lut_width,
    seq_len,
    padded_len,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    EMULATE_ROUNDING: tl.constexpr,
    V_TERMS: tl.constexpr = 1,
    INT8_PV: tl.constexpr = False,
):
    """Grid ``(nb, B * H)``; q8/k8 ``[B*H, Np, D]``, v8 ``[B*H, V_TERMS * D, Np]`` (a second term
    of V: another P V product into the tile's sum; int8 with ``INT8_PV``), o ``[B, H, N, D]``."""
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    row_index = (head % mask_heads) * num_blocks
    q_block = tl.load(q_block_order_ptr + row_index + tl.program_id(0))
    row_index += q_block
    total_count = tl.load(total_counts_ptr + row_index)
    block_ids_ptr = kv_block_ids_ptr + row_index.to(tl.int64) * lut_width

    offsets = tl.arange(0, BLOCK_SIZE)  # [BS]
    cols = tl.arange(0, HEAD_DIM)  # [D]
    token_base = batch_head.to(tl.int64) * padded_len
    q_rows = token_base + q_block * BLOCK_SIZE + offsets  # [BS]
    q8 = tl.load(q8_ptr + q_rows[:, None] * HEAD_DIM + cols[None, :])  # [BS, D] int8
    q_scale = tl.load(q_scale_ptr + q_rows)  # [BS]
    channels = batch_head.to(tl.int64) * HEAD_DIM + cols  # [D], into [B*H, D]
    v_rows = (batch_head.to(tl.int64) * (V_TERMS * HEAD_DIM) + cols) * padded_len  # [D]

    row_max = tl.full([BLOCK_SIZE], float("-inf"), dtype=tl.float32)  # [BS]
    row_sum = tl.zeros([BLOCK_SIZE], dtype=tl.float32)  # [BS]
    acc = tl.zeros([BLOCK_SIZE, HEAD_DIM], dtype=tl.float32)  # [BS, D]
    for tile in range(total_count):
        key_block = tl.load(block_ids_ptr + tile)
        key_start = key_block * BLOCK_SIZE
        k_rows = token_base + key_start + offsets  # [BS]
        k8 = tl.load(k8_ptr + k_rows[:, None] * HEAD_DIM + cols[None, :])  # [BS, D] int8
        # The scores are exact integers (|S| < 2^22), so the fp32 cast is exact.
        scores = tl.dot(q8, tl.trans(k8)).to(tl.float32)  # [BS, BS]
        tile_scale = tl.load(k_scale_ptr + batch_head * num_blocks + key_block) * qk_scale
        key_length = tl.load(key_lengths_ptr + key_block)
        scores = scores * (q_scale * tile_scale)[:, None]
        scores = tl.where(offsets[None, :] < key_length, scores, float("-inf"))
        tile_max = tl.max(scores, 1)  # [BS]
        v_tile = v8_ptr + v_rows[:, None] + key_start + offsets[None, :]  # [D, BS]
        if INT8_PV:
            new_max = tl.maximum(row_max, tile_max)
            # P against the tile's own max, rounded to an integer in [0, 127] (exact int8).
            p8 = round_half_even(tl.math.exp2(scores - (tile_max - LOG2_INT8_P_SCALE_C)[:, None]))
            correction = tl.math.exp2(row_max - new_max)  # [BS]
            weight = tl.math.exp2(tile_max - new_max)  # [BS]
            # Exact integers: |p8 V8| < 2^22 a tile, and a row sum <= 127 * BS.
            pv = tl.dot(p8.to(tl.int8), tl.trans(tl.load(v_tile))).to(tl.float32)  # [BS, D]
            row_sum = row_sum * correction + tl.sum(p8, 1) * weight
            acc = acc * correction[:, None] + pv * weight[:, None]
        else:
            # The row max moves only past the threshold (quantize.RESCALE_THRESHOLD, as the
            # emulation and the Gluon kernel do); P <= 448.
            new_max = tl.where(tile_max > row_max + RESCALE_THRESHOLD_C, tile_max, row_max)
            probs = tl.math.exp2(
                scores - (new_max - (LOG2_P_SCALE_C - RESCALE_THRESHOLD_C))[:, None]
            )  # [BS, BS]
            correction = tl.math.exp2(row_max - new_max)  # [BS]
            # Of P before rounding: summing p8.to(tl.float32) instead compiled to wrong sums on
            # the H200 (Triton 3.6; cosine 0.7-0.9 against the reference), right under the
            # interpreter.
            row_sum = row_sum * correction + tl.sum(probs, 1)
            # Emulated, the values are exact in e4m3 and the cast below only re-encodes them.
            p8 = (round_to_e4m3(probs) if EMULATE_ROUNDING else probs).to(tl.float8e4nv)
            pv = tl.dot(p8, tl.trans(tl.load(v_tile)))  # [BS, D]
            if V_TERMS == 2:
                pv = tl.dot(p8, tl.trans(tl.load(v_tile + HEAD_DIM * padded_len)), pv)
            acc = acc * correction[:, None] + pv
        row_max = new_max

    # A row with no kept key block has row_sum 0: it outputs zeros.
    has_keys = row_sum > 0.0  # [BS]
    out = acc / tl.where(has_keys, row_sum, 1.0)[:, None] * tl.load(v_scale_ptr + channels)[None, :]
    out = tl.where(has_keys[:, None], out + tl.load(v_mean_ptr + channels)[None, :], 0.0)
    rows = q_block * BLOCK_SIZE + offsets  # [BS]
    o_base = o_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    tl.store(
        o_base + rows[:, None] * stride_on + cols[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=rows[:, None] < seq_len,
    )


def portable_fp8_attention(
    quantized: QuantizedQKV, lut: BlockLUT, out: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Run the portable kernel into ``out`` (``[B, H, N, D]``, unit stride along D)."""
    if quantized.wgmma_key_order:
        raise ValueError("the portable 8-bit kernel reads V^T in token order (key_order 'natural')")
    batch, heads, padded_len, head_dim = quantized.q.shape
    block_size = quantized.block_size
    _fp8_block_sparse_attention_kernel[(lut.num_blocks, batch * heads)](
        quantized.q,
        quantized.q_scale,
        quantized.k,
        quantized.k_scale,
        quantized.v_t,
        quantized.v_scale,
        quantized.v_mean,
        out,
        lut.kv_block_ids,
        lut.total_counts,
        lut.key_lengths,
        lut.q_block_order,
        *out.stride()[:3],
        heads,
        lut.mask_heads,
        lut.num_blocks,
        lut.kv_block_ids.shape[-1],
        quantized.seq_len,
        padded_len,
        scale * LOG2_E * quantized.score_scale,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        EMULATE_ROUNDING=interpreting(),
        V_TERMS=quantized.v_terms,
        INT8_PV=quantized.v_format == "int8",
        num_warps=4 if block_size == 64 else 8,
    )
    return out


def portable_fp8_supports(q: torch.Tensor) -> bool:
    """The interpreter, or a GPU whose tensor cores take FP8 (compute capability >= 8.9)."""
    if interpreting():
        return True
    return q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 9)


def portable_fp8_lut_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: BlockLUT,
    *,
    block_size: int,
    scale,
    v_format: str = "e4m3",
) -> torch.Tensor:
    """The pre-pass, then the kernel: ``[B, H, N, D]`` in q's dtype and memory order, with V
    (and P) in ``v_format``: "e4m3" (precision "fp8") or "int8" (precision "int8")."""
    quantized = quantize_qkv(
        q,
        k,
        v,
        block_size=block_size,
        key_lengths=lut.key_lengths,
        v_terms=runtime_v_terms(v_format),
        v_format=v_format,
    )
    return portable_fp8_attention(quantized, lut, torch.empty_like(q), scale=scale)
