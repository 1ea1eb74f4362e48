"""FlexAttention interop: our block masks as FlexAttention `BlockMask`s, built at block level.

`create_block_mask` evaluates a mask function on every token pair and runs out of memory near
119k tokens; here the BlockMask comes straight from the [H, nb, nb] block mask. Kept key blocks
whose keys are all valid go in as *full* blocks (no mask_mod call); kept blocks that hold padded
keys (tile padding, the ragged last block) go in as *partial* blocks, where the mask_mod drops the
padded keys. Semantics match `sparse_attention`: a query row with no kept valid key outputs 0.

`load_flex_masks` reads the BlockMasks back from a `compact-search export --format flex` file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compact_search.errors import UserInputError
from compact_search.geometry import valid_block_lengths
from compact_search.runtime.kernels.common import masked_value_terms, nonfinite_keys
from compact_search.runtime.lut import BlockLUT, lut_block_mask


def _sorted_kept(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts [1, H, nb] and kept ids first, ascending, [1, H, nb, nb] int32."""
    counts = mask.sum(-1, dtype=torch.int32)[None]
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
    return counts, order.to(torch.int32)[None].contiguous()


def _valid_keys(lengths: torch.Tensor, block_size: int) -> torch.Tensor:
    """[nb * block_size] bool from valid keys per block [nb]: which key slots are not padding."""
    slots = torch.arange(lengths.numel() * block_size, device=lengths.device)
    return (slots % block_size) < lengths.repeat_interleave(block_size)


def flex_block_mask(
    block_mask: torch.Tensor,
    seq_len: int,
    block_size: int,
    key_block_lengths: torch.Tensor | None = None,
):
    """BlockMask for flex_attention from bool [H, nb, nb] (H may be 1 to broadcast).

    key_block_lengths int32 [nb]: valid keys at the start of each key block (default: all, with
    the ragged last block).
    """
    from torch.nn.attention.flex_attention import BlockMask

    nb = block_mask.shape[-1]
    device = block_mask.device
    if key_block_lengths is None:
        key_block_lengths = valid_block_lengths(seq_len, block_size, nb)
    lengths = key_block_lengths.to(device)
    has_keys = lengths > 0  # [nb]
    complete = lengths == block_size  # [nb]
    full = block_mask & (has_keys & complete)[None, None, :]
    partial = block_mask & (has_keys & ~complete)[None, None, :]
    full_counts, full_ids = _sorted_kept(full)
    partial_counts, partial_ids = _sorted_kept(partial)
    valid = _valid_keys(lengths, block_size)  # [nb * block_size]

    heads = block_mask.shape[0]

    # Compiled flex skips mask_mod on full blocks and drops unlisted blocks; its eager (CPU) path
    # ignores block sparsity and applies mask_mod everywhere, so the block mask goes in here too.
    def kept_and_valid(b, h, q_idx, kv_idx):
        head = h if heads > 1 else h * 0
        return block_mask[head, q_idx // block_size, kv_idx // block_size] & valid[kv_idx]

    return BlockMask.from_kv_blocks(
        partial_counts,
        partial_ids,
        full_counts,
        full_ids,
        BLOCK_SIZE=block_size,
        mask_mod=kept_and_valid,
        seq_lengths=(seq_len, seq_len),
    )


_compiled_flex = None


def _flex(q, k, v, mask, scale: float, with_lse: bool = False):
    """flex_attention, compiled on CUDA (its eager path computes every block), eager elsewhere;
    with ``with_lse`` also the rows' log-sum-exp ``[B, H, N]`` (natural log)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    run = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        run = _compiled_flex
    if not with_lse:
        return run(q, k, v, block_mask=mask, scale=scale)
    out, aux = run(q, k, v, block_mask=mask, scale=scale, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int,
    scale: float,
    key_block_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention through FlexAttention (compiled on CUDA, eager elsewhere).

    Values holding Inf or NaN (found by one reduction over v, read back to the host: this runs
    inside the opaque operator, so it breaks no graph) are zeroed for flex and their terms added
    back where a row attends them, from flex's log-sum-exp: flex multiplies the zero weight of a
    masked or padded key by its value, and 0 * Inf is NaN.
    """
    n = q.shape[2]
    mask = flex_block_mask(block_mask, n, block_size, key_block_lengths)
    bad = torch.nonzero(nonfinite_keys(v)).flatten()  # [J]
    if bad.numel() == 0:
        return _flex(q, k, v, mask, scale)
    out, lse = _flex(q, k, v.index_fill(2, bad, 0), mask, scale, with_lse=True)  # lse [B, H, N]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bhnd,bhjd->bhnj", q.to(compute), k[:, :, bad].to(compute)) * scale
    probs = torch.exp(scores - lse.to(compute).unsqueeze(-1))  # [B, H, N, J]
    lengths = key_block_lengths
    if lengths is None:
        lengths = valid_block_lengths(n, block_size, block_mask.shape[-1], q.device)
    key_ok = _valid_keys(lengths.to(q.device), block_size)[bad]  # [J]
    query_blocks = torch.arange(n, device=q.device) // block_size  # [N]
    allowed = block_mask[:, query_blocks][:, :, bad // block_size] & key_ok  # [H|1, N, J]
    extra = masked_value_terms(probs, v[:, :, bad].to(compute), allowed.unsqueeze(0))
    return (out.to(compute) + extra).to(q.dtype)


def flex_lut_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: BlockLUT,
    *,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """FlexAttention over the blocks a lookup table visits, with its key lengths."""
    return flex_sparse_attention(
        q,
        k,
        v,
        lut_block_mask(lut.kv_block_ids, lut.total_counts),
        block_size=block_size,
        scale=scale,
        key_block_lengths=lut.key_lengths,
    )


def load_flex_masks(path: str | Path) -> dict[tuple[int, int], object]:
    """(bucket, layer) -> FlexAttention BlockMask, from a `--format flex` export.

    The stored block lists are turned back into the [H, nb, nb] block mask and rebuilt with
    `flex_block_mask`, so the mask_mod knows the kept blocks as well as the padding: eager
    flex_attention (which ignores the block lists) gives the same sparse result as compiled.
    """
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
        if meta.get("format") != "compact-search/flex":
            raise UserInputError(f"{path}: not a compact-search flex export")
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    block_size, seq_len = int(meta["block_size"]), int(meta["seq_len"])
    lengths = tensors.pop("key_block_lengths")
    out = {}
    for key in tensors:
        if not key.endswith(".kv_num_blocks") or key.count(".") != 2:
            continue
        prefix = key[: -len(".kv_num_blocks")]
        b, layer = (int(part[1:]) for part in prefix.split("."))
        # [1, H, nb] counts and [1, H, nb, nb] ids of the partial and the full kept blocks
        partial = lut_block_mask(tensors[f"{prefix}.kv_indices"][0], tensors[key][0])
        full = lut_block_mask(
            tensors[f"{prefix}.full_kv_indices"][0], tensors[f"{prefix}.full_kv_num_blocks"][0]
        )
        out[(b, layer)] = flex_block_mask(partial | full, seq_len, block_size, lengths)
    return out
