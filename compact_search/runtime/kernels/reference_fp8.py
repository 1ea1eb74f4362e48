"""8-bit attention in PyTorch: an exact emulation of what the 8-bit Triton kernels compute.

``precision="fp8"`` (and ``"int8"``) on the reference backend and on CPU under "auto": the
pre-pass in torch (``runtime/quantize.emulate_quantize_qkv``: INT8 Q per token and K per block
after a Hadamard rotation and K smoothing, FP8 e4m3 (or INT8) V per channel after V smoothing),
then ``emulate_fp8_attention``: the same tile order (the lookup table's), the same running max
at which each P tile is rounded to e4m3, fp32 per-tile P V sums added to an fp32 accumulator. The
kernels (``triton_portable_fp8``, ``gluon_hopper_fp8``) differ from it only where fp32 rounding
order differs (a fused multiply-add in the scores, exp2, sum order), which moves a P value by one
e4m3 step on rare near-ties. The row sums are of P before rounding, as the portable kernel adds
them; the Gluon kernel's default sums the rounded P on its tensor cores
(``sum_rounded_p=True`` emulates it). Unlike the bf16 kernels, the pre-pass reads every valid
key of a head (its means and V's scale), so a non-finite key or value anywhere in a head makes
that head's output non-finite, kept block or not.
"""

from __future__ import annotations

import math

import torch

from compact_search.runtime.kernels.common import LOG2_E
from compact_search.runtime.lut import BlockLUT
from compact_search.runtime.quantize import (
    LOG2_INT8_P_SCALE,
    LOG2_P_SCALE,
    RESCALE_THRESHOLD,
    QuantizedQKV,
    emulate_quantize_qkv,
    natural_key_order,
    runtime_v_terms,
    to_e4m3,
)

__all__ = ["emulate_fp8_attention", "reference_fp8_lut_attention"]


def emulate_fp8_attention(
    quantized: QuantizedQKV,
    lut: BlockLUT,
    *,
    scale: float,
    out_dtype: torch.dtype = torch.float32,
    query_blocks: int | None = None,
    rescale_threshold: float = RESCALE_THRESHOLD,
    sum_rounded_p: bool = False,
) -> torch.Tensor:
    """What the 8-bit kernels compute, in torch, from the same quantized inputs: ``[B, H, N, D]``.

    Every query block steps through its lookup-table row in order, all blocks at once: step t
    takes each row's t-th kept key block (rows shorter than t + 1 leave their state alone).
    ``query_blocks``: only the first that many query blocks (the output has that many blocks'
    rows, clipped to N), for long-N accuracy measurements whose every query row would not fit.
    ``rescale_threshold``: a row's running max moves only to a tile max that passes it by more
    than this (log2 units), and P is ``448 * 2^-threshold * exp2(s - m)``; 0 is the plain online
    softmax (the Gluon kernel's ``lazy_rescale=False``). ``sum_rounded_p``: a row's sum is of
    the e4m3 P values its P V multiplies (the Gluon kernel's default ``mma_row_sum``); off, of P
    before rounding (the portable kernel, and the Gluon kernel's ``mma_row_sum=False``).

    INT8 V (``quantized.v_format == "int8"``): P V runs in INT8 as the Gluon kernel's INT8 path
    does. Each tile's P is ``127 * exp2(s - t)`` with ``t`` the tile's own row max, rounded to an
    integer (ties to even), its product with V and its row sum exact integers; the tile joins
    the running sums scaled by ``exp2(t - m)``, ``m`` the new running max (so
    ``rescale_threshold`` and ``sum_rounded_p`` do not apply: the sums are of the rounded P).
    """
    batch, heads, padded_len, head_dim = quantized.q.shape
    block_size = quantized.block_size
    num_blocks = padded_len // block_size
    rows_kept = num_blocks if query_blocks is None else min(query_blocks, num_blocks)
    qk_scale = torch.tensor(scale * LOG2_E * quantized.score_scale, dtype=torch.float32)
    blocked = (batch, heads, num_blocks, block_size, head_dim)
    query_blocked = (batch, heads, rows_kept, block_size, head_dim)
    q8 = quantized.q.float().reshape(blocked)[:, :, :rows_kept]  # exact integers
    k8 = quantized.k.float().reshape(blocked)
    # e4m3 values (two terms: their sum, exact in fp32; the kernels' two products of one P
    # tile add up to its product to fp32 rounding).
    v_t = quantized.v_values()  # [B, H, D, Np]
    v_t = natural_key_order(v_t) if quantized.wgmma_key_order else v_t
    v8 = v_t.transpose(-1, -2).reshape(blocked)
    q_scale = quantized.q_scale.reshape(batch, heads, num_blocks, block_size, 1)[:, :, :rows_kept]
    head_rows = torch.arange(heads, device=q8.device) % lut.mask_heads
    block_ids = lut.kv_block_ids.to(q8.device).long()[head_rows][:, :rows_kept]  # [H, nq, width]
    counts = lut.total_counts.to(q8.device)[head_rows][:, :rows_kept]  # [H, nq]
    lengths = lut.key_lengths.to(q8.device).long()
    int8_pv = quantized.v_format == "int8"
    offsets = torch.arange(block_size, device=q8.device)

    row_max = torch.full((batch, heads, rows_kept, block_size, 1), -math.inf, device=q8.device)
    row_sum = torch.zeros_like(row_max)
    acc = torch.zeros(query_blocked, device=q8.device)
    for step in range(block_ids.shape[-1]):
        key_blocks = block_ids[..., step]  # [H, nq]
        active = (step < counts)[None, :, :, None, None]  # [1, H, nq, 1, 1]
        gather = key_blocks[None, :, :, None, None].expand(query_blocked)
        scores = q8 @ torch.gather(k8, 2, gather).transpose(-1, -2)  # [B, H, nq, BS, BS]
        tile_scale = torch.gather(quantized.k_scale, 2, key_blocks[None].expand(batch, -1, -1))
        scores = scores * (q_scale * (tile_scale * qk_scale)[..., None, None])
        valid = offsets < lengths[key_blocks][..., None, None]  # [H, nq, 1, BS]
        scores = torch.where(valid, scores, -math.inf)
        tile_max = scores.amax(-1, keepdim=True)
        if int8_pv:
            new_max = torch.maximum(tile_max, row_max)
            probs8 = torch.round(torch.exp2(scores - (tile_max - LOG2_INT8_P_SCALE)))  # ties even
            correction = torch.exp2(row_max - new_max)
            weight = torch.exp2(tile_max - new_max)  # the tile's share, relative to new_max
            # Integer sums, exact in fp64 (< 2^31), as the int32 wgmma accumulates them.
            products = (probs8.double() @ torch.gather(v8, 2, gather).double()).float()
            new_sum = row_sum * correction + probs8.sum(-1, keepdim=True) * weight
            new_acc = acc * correction + products * weight
        else:
            new_max = torch.where(tile_max > row_max + rescale_threshold, tile_max, row_max)
            probs = torch.exp2(scores - (new_max - (LOG2_P_SCALE - rescale_threshold)))
            correction = torch.exp2(row_max - new_max)
            probs8 = to_e4m3(probs).float()
            tile_sum = (probs8 if sum_rounded_p else probs).sum(-1, keepdim=True)
            new_sum = row_sum * correction + tile_sum
            new_acc = acc * correction + probs8 @ torch.gather(v8, 2, gather)
        row_max = torch.where(active, new_max, row_max)
        row_sum = torch.where(active, new_sum, row_sum)
        acc = torch.where(active, new_acc, acc)

    has_keys = row_sum > 0
    out = acc / torch.where(has_keys, row_sum, 1.0) * quantized.v_scale[:, :, None, None]
    out = torch.where(has_keys, out + quantized.v_mean[:, :, None, None], 0.0)
    out = out.view(batch, heads, rows_kept * block_size, head_dim)[:, :, : quantized.seq_len]
    return out.to(out_dtype)


def reference_fp8_lut_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: BlockLUT,
    *,
    block_size: int,
    scale: float,
    v_format: str = "e4m3",
) -> torch.Tensor:
    """``[B, H, N, D]`` in q's dtype: the emulated pre-pass and kernel, with V (and P) in
    ``v_format``: "e4m3" (precision "fp8") or "int8" (precision "int8")."""
    quantized = emulate_quantize_qkv(
        q,
        k,
        v,
        block_size=block_size,
        key_lengths=lut.key_lengths,
        v_terms=runtime_v_terms(v_format),
        v_format=v_format,
    )
    return emulate_fp8_attention(quantized, lut, scale=scale, out_dtype=q.dtype)
