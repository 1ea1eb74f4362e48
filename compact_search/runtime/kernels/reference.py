"""Block-sparse attention in plain PyTorch: the semantics every backend must match.

Query token i of head h attends key token j iff block_mask[h, i // bs, j // bs] is set and key j
is valid: key j of block b is valid iff j - b * bs < key_block_lengths[b] (padding sits at the end
of a block). A query with no valid kept key outputs zeros. Softmax runs in fp32 (fp64 for fp64
inputs), the output is cast back to q's dtype. NaN or Inf in q, k or v propagates as in plain
softmax attention over the kept valid keys only: keys and values of blocks a query block skips,
and padded keys, never reach its output, whatever they hold.

Two forms: `masked_reference` builds the [N, N] token mask (small N, tests) and
`chunked_reference` walks query blocks and gathers their kept keys, so memory stays at
[B, block_size, kept keys] per step (a 32,768-token head runs on CPU).
`reference_sparse_attention`, what the "reference" backend runs, takes the first up to 4,096
tokens and the second above; `reference_lut_attention` runs it from lookup tables (the compiled
runtime's operator hands every backend tables, `runtime/lut.py`).
"""

from __future__ import annotations

import math

import torch

from compact_search.geometry import DEFAULT_BLOCK_SIZE
from compact_search.runtime.kernels.common import masked_value_terms, nonfinite_keys
from compact_search.runtime.lut import BlockLUT, lut_block_mask

# Above this many query x key tokens per head `reference_sparse_attention` walks query blocks
# instead of building the [N, N] mask.
MASKED_REFERENCE_MAX_PAIRS = 4096 * 4096


def valid_keys(
    n: int, block_size: int, key_block_lengths: torch.Tensor | None, device
) -> torch.Tensor:
    """[N] bool: keys that are not padding."""
    if key_block_lengths is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    pos = torch.arange(n, device=device)
    return (pos % block_size) < key_block_lengths.to(device).long()[pos // block_size]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale: float | None = None,
    key_block_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense-masked reference. q, k, v [B, H, N, D]; block_mask bool [H or 1, nb, nb]."""
    n, d = q.shape[-2], q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    ct = _compute_dtype(q.dtype)
    token_mask = block_mask.to(q.device).repeat_interleave(block_size, dim=1)
    token_mask = token_mask.repeat_interleave(block_size, dim=2)[:, :n, :n]  # [H|1, N, N]
    token_mask = token_mask & valid_keys(n, block_size, key_block_lengths, q.device)[None, None, :]
    allowed = token_mask.unsqueeze(0)  # [1, H|1, N, N]
    has_key = allowed.any(dim=-1, keepdim=True)  # [1, H|1, N, 1]
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    nonfinite = nonfinite_keys(kc, vc)  # [N]
    if not nonfinite.any():
        out = torch.nn.functional.scaled_dot_product_attention(
            qc, kc, vc, attn_mask=allowed, scale=scale
        )  # [B, H, N, D]; rows with no allowed key come out NaN
        return torch.where(has_key, out, torch.zeros((), dtype=ct)).to(q.dtype)
    # Inf or NaN in a key or value: SDPA adds its mask to the scores (NaN + -inf is NaN) and a
    # matmul multiplies values by the zero weight of masked keys, so both would spread NaN to
    # rows that never attend them. The scores are masked by replacement instead, and columns
    # with such values are summed only where allowed; all other columns go through the matmul.
    scores = torch.einsum("bhqd,bhkd->bhqk", qc, kc) * scale
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # [B, H, N, N]
    probs = torch.where(has_key, probs, torch.zeros((), dtype=ct))
    bad = torch.nonzero(nonfinite).flatten()  # keys with a non-finite value somewhere
    out = probs @ vc.index_fill(2, bad, 0)
    out = out + masked_value_terms(probs[..., bad], vc[:, :, bad], allowed[..., bad])
    return out.to(q.dtype)


def chunked_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale: float | None = None,
    key_block_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Memory-bounded reference: one query block at a time over its kept, valid keys only."""
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    ct = _compute_dtype(q.dtype)
    nb = math.ceil(n / block_size)
    key_ok = valid_keys(n, block_size, key_block_lengths, q.device)
    mask = block_mask.to(q.device)
    out = torch.zeros_like(q)
    for head in range(h):
        head_mask = mask[head if mask.shape[0] > 1 else 0]  # [nb, nb]
        for qb in range(nb):
            rows = slice(qb * block_size, min((qb + 1) * block_size, n))
            kept_blocks = torch.nonzero(head_mask[qb]).flatten()
            if kept_blocks.numel() == 0:
                continue
            offsets = torch.arange(block_size, device=q.device)
            keys = (kept_blocks[:, None] * block_size + offsets[None, :]).flatten()
            keys = keys[keys < n]
            keys = keys[key_ok[keys]]
            if keys.numel() == 0:
                continue
            q_blk = q[:, head, rows].to(ct)  # [B, bm, D]
            k_sel = k[:, head, keys].to(ct)  # [B, kept, D]
            v_sel = v[:, head, keys].to(ct)  # [B, kept, D]
            probs = torch.softmax(q_blk @ k_sel.transpose(-1, -2) * scale, dim=-1)
            out[:, head, rows] = (probs @ v_sel).to(q.dtype)
    return out


def reference_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale: float | None = None,
    key_block_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """The masked form where the [N, N] mask is small, else the chunked one (same results)."""
    n = q.shape[2]
    run = masked_reference if n * n <= MASKED_REFERENCE_MAX_PAIRS else chunked_reference
    return run(
        q,
        k,
        v,
        block_mask,
        block_size=block_size,
        scale=scale,
        key_block_lengths=key_block_lengths,
    )


def reference_lut_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: BlockLUT,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale: float | None = None,
) -> torch.Tensor:
    """The reference over the blocks a lookup table visits, with its key lengths."""
    return reference_sparse_attention(
        q,
        k,
        v,
        lut_block_mask(lut.kv_block_ids, lut.total_counts),
        block_size=block_size,
        scale=scale,
        key_block_lengths=lut.key_lengths,
    )
