"""Block mask -> lookup tables for the block-sparse attention kernel.

The kernel walks, for one head and one query block, only the key blocks the mask keeps. This
module turns a boolean block mask ``[H or 1, nb, nb]`` into that per-row list once and caches it,
so repeated calls with the same mask (every layer of every denoising step) skip the rebuild. Nothing
here is larger than the ``nb x nb`` mask itself.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from compact_search.geometry import valid_block_lengths

__all__ = [
    "BlockLUT",
    "build_block_lut",
    "cached_block_lut",
    "clear_lut_cache",
    "lut_block_mask",
    "lut_tensors_from_mask",
]


@dataclass(frozen=True)
class BlockLUT:
    """Kept key blocks per head and query block, in the order the kernel visits them.

    Attributes:
        kv_block_ids: int32 ``[Hm, nb, width]``. Row ``[h, i]`` lists first the kept key blocks
            whose keys are all valid (``full_counts[h, i]`` of them), then the kept key blocks
            with padded keys (up to ``total_counts[h, i]``), each group in ascending block order
            so neighbouring query blocks read the same key blocks close in time (L2 reuse).
            Entries past ``total_counts`` repeat the last kept id (0 in an empty row), so a
            speculative load from the padding stays in bounds. Key blocks with no valid key are
            dropped: they contribute nothing.
        full_counts: int32 ``[Hm, nb]``: kept key blocks without padded keys.
        total_counts: int32 ``[Hm, nb]``: all kept key blocks with at least one valid key.
        key_lengths: int32 ``[nb]``: valid keys per key block (a prefix of each block).
        q_block_order: int32 ``[Hm, nb]``: query blocks by descending ``total_counts``, so the
            longest rows start first and the short ones fill the tail of the launch.
        density: kept share of block pairs over all mask heads (before dropping empty blocks).
    """

    kv_block_ids: torch.Tensor
    full_counts: torch.Tensor
    total_counts: torch.Tensor
    key_lengths: torch.Tensor
    q_block_order: torch.Tensor
    density: float

    @property
    def mask_heads(self) -> int:
        return self.kv_block_ids.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.kv_block_ids.shape[1]

    def heads(self, start: int, stop: int) -> BlockLUT:
        """The tables of heads [start, stop) (views; all of them when one mask is shared)."""
        if self.mask_heads == 1:
            return self
        return BlockLUT(
            self.kv_block_ids[start:stop],
            self.full_counts[start:stop],
            self.total_counts[start:stop],
            self.key_lengths,
            self.q_block_order[start:stop],
            self.density,
        )


def build_block_lut(
    block_mask: torch.Tensor,
    *,
    seq_len: int,
    block_size: int,
    key_block_lengths: torch.Tensor | None = None,
    width: int | None = None,
) -> BlockLUT:
    """Compile a block mask into lookup tables (no caching; see :func:`cached_block_lut`).

    Args:
        block_mask: bool ``[Hm, nb, nb]``; ``[h, i, j]`` keeps key block j for query block i.
        seq_len: tokens N; ``nb == ceil(N / block_size)``.
        block_size: tokens per mask block.
        key_block_lengths: int32 ``[nb]`` valid keys per key block, or None for the default
            (full blocks, ragged last one). Clipped to the tokens that exist.
        width: entries per row of ``kv_block_ids``; default the longest row. A larger one (up to
            nb) pads, so the tables of several layers share one shape; a smaller one is a
            ValueError.

    Returns:
        A :class:`BlockLUT` on the mask's device.
    """
    mask_heads, num_blocks, num_cols = block_mask.shape
    if num_blocks != num_cols or num_blocks != -(-seq_len // block_size):
        raise ValueError(
            f"block_mask has shape {tuple(block_mask.shape)}, expected [H, {num_cols}, {num_cols}]"
            f" with nb = ceil({seq_len} / {block_size})"
        )
    device = block_mask.device
    block_mask = block_mask.bool()
    existing = valid_block_lengths(seq_len, block_size, device=device)  # [nb]
    if key_block_lengths is None:
        key_lengths = existing
    else:
        key_lengths = torch.minimum(key_block_lengths.to(device, torch.int32), existing)
    full_kept, padded_kept = _kept_blocks(block_mask, key_lengths, block_size)
    total_counts = full_kept.sum(-1) + padded_kept.sum(-1)  # [Hm, nb]
    longest = max(int(total_counts.max()) if total_counts.numel() else 0, 1)
    if width is None:
        width = longest
    elif not longest <= width <= max(num_blocks, 1):
        raise ValueError(
            f"width {width} must lie between the longest row ({longest}) and nb ({num_blocks})"
        )
    tables = lut_tensors_from_mask(block_mask, key_lengths, block_size, width)
    density = float(block_mask.float().mean()) if block_mask.numel() else 0.0
    return BlockLUT(*tables, density=density)


def _kept_blocks(
    block_mask: torch.Tensor, key_lengths: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[Hm, nb, nb]`` twice: kept key blocks whose keys are all valid, and kept key blocks
    with padded keys but at least one valid key."""
    has_keys = key_lengths > 0  # [nb]
    is_full = key_lengths == block_size  # [nb]
    return block_mask & is_full, block_mask & has_keys & ~is_full


def lut_tensors_from_mask(
    block_mask: torch.Tensor, key_lengths: torch.Tensor, block_size: int, width: int
) -> tuple[torch.Tensor, ...]:
    """The five tables of :class:`BlockLUT` (``kv_block_ids`` ``width`` wide: at least the longest
    row, at most nb), from bool ``[Hm, nb, nb]`` and int32 ``[nb]`` key lengths clipped to N.

    Tensor operations only, no value read back to Python: it runs inside a compiled graph (the
    runtime rebuilds a layer's tables there when a call has fewer prefix tokens than the config).
    """
    full_kept, padded_kept = _kept_blocks(block_mask, key_lengths, block_size)  # [Hm, nb, nb]
    full_counts = full_kept.sum(-1, dtype=torch.int32)  # [Hm, nb]
    total_counts = full_counts + padded_kept.sum(-1, dtype=torch.int32)  # [Hm, nb]

    # Sort key: full kept blocks first, then padded kept blocks, then the rest; a stable sort keeps
    # ascending block ids inside each group.
    group = torch.where(full_kept, 0, torch.where(padded_kept, 1, 2)).to(torch.int8)
    order = torch.sort(group, dim=-1, stable=True).indices.to(torch.int32)  # [Hm, nb, nb]
    kv_block_ids = order[..., :width]  # [Hm, nb, width]

    # Pad past each row's count with its last kept id (0 for an empty row).
    slot = torch.arange(width, device=block_mask.device, dtype=torch.int32)  # [width]
    last_slot = (total_counts - 1).clamp(min=0).unsqueeze(-1)  # [Hm, nb, 1]
    last_id = torch.gather(kv_block_ids, -1, last_slot.long())  # [Hm, nb, 1]
    last_id = torch.where(total_counts.unsqueeze(-1) > 0, last_id, torch.zeros_like(last_id))
    kv_block_ids = torch.where(slot < total_counts.unsqueeze(-1), kv_block_ids, last_id)

    q_block_order = torch.sort(total_counts, dim=-1, descending=True, stable=True).indices
    return (
        kv_block_ids.contiguous(),
        full_counts.contiguous(),
        total_counts.contiguous(),
        key_lengths.to(torch.int32).contiguous(),
        q_block_order.to(torch.int32).contiguous(),
    )


def lut_block_mask(kv_block_ids: torch.Tensor, total_counts: torch.Tensor) -> torch.Tensor:
    """bool ``[Hm, nb, nb]``: the key blocks a lookup table visits (kept blocks with a valid key).

    The inverse of the tables up to blocks without valid keys, which the tables drop and which
    attend nothing anyway; what the reference and FlexAttention run from tables. Tensor operations
    only (traceable).
    """
    heads, num_blocks, width = kv_block_ids.shape
    device = kv_block_ids.device
    visited = torch.arange(width, device=device) < total_counts.unsqueeze(-1)  # [Hm, nb, width]
    # Padding entries repeat a listed id: summing (not assigning) keeps them from unsetting it.
    hits = torch.zeros(heads, num_blocks, num_blocks, dtype=torch.int32, device=device)
    return hits.scatter_add(-1, kv_block_ids.long(), visited.to(torch.int32)) > 0


# id(block_mask) -> (weak reference to the mask, cache key, lut). Entries leave when the mask is
# garbage-collected; the key also holds the mask's version counter, so an in-place edit rebuilds.
_LUT_CACHE: dict[int, tuple[weakref.ref, tuple, BlockLUT]] = {}


def _cache_key(
    block_mask: torch.Tensor,
    seq_len: int,
    block_size: int,
    key_block_lengths: torch.Tensor | None,
    device: torch.device,
) -> tuple:
    # By identity and version, never by value: reading the values would synchronise with the
    # GPU on every call. Callers that pass the same lengths tensor each time (the runtime does)
    # hit; a fresh tensor with equal values rebuilds the table.
    lengths_key = (
        None
        if key_block_lengths is None
        else (id(key_block_lengths), key_block_lengths._version, key_block_lengths.data_ptr())
    )
    return (block_mask._version, block_mask.data_ptr(), seq_len, block_size, lengths_key, device)


def cached_block_lut(
    block_mask: torch.Tensor,
    *,
    seq_len: int,
    block_size: int,
    key_block_lengths: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> BlockLUT:
    """:func:`build_block_lut` on ``device`` (default: the mask's), cached per mask object.

    A hit needs the same mask tensor object, unmodified since (its version counter), the same
    ``seq_len``/``block_size``/device and the same unmodified ``key_block_lengths`` tensor
    object (or None).
    """
    device = torch.device(device) if device is not None else block_mask.device
    key = _cache_key(block_mask, seq_len, block_size, key_block_lengths, device)
    entry = _LUT_CACHE.get(id(block_mask))
    if entry is not None and entry[0]() is block_mask and entry[1] == key:
        return entry[2]
    lut = build_block_lut(
        block_mask.to(device),
        seq_len=seq_len,
        block_size=block_size,
        key_block_lengths=key_block_lengths,
    )
    mask_id = id(block_mask)
    _LUT_CACHE[mask_id] = (
        weakref.ref(block_mask, lambda _: _LUT_CACHE.pop(mask_id, None)),
        key,
        lut,
    )
    return lut


def clear_lut_cache() -> None:
    """Drop every cached lookup table."""
    _LUT_CACHE.clear()
