"""Every layer's kernel inputs as module buffers, built once by `apply`.

A compiled graph must not look anything up in Python: a Python layer index or a cache keyed by
a mask object is a guard (one graph per layer) or a graph break. So `apply` builds, for every
self-attention layer, a `LayerTables` module holding that layer's lookup tables for every step
bucket plus the slot permutation, registers it on the layer's attention module (buffers follow
`.to()`, and torch.compile lifts buffers into graph inputs the way it lifts weights, so the
repeated blocks of `compile_repeated_blocks` share one graph), and hands it to the processor as
the layer argument of the attention function.

The tables of one bucket share one shape across layers (rows padded to the bucket's longest one),
so the layers' graphs do not differ by shape either.

Only the Triton kernels read lookup tables; the reference and FlexAttention run from a block
mask. Where the handle's backend resolves to one of those on the model's device
(`runtime.attention.reads_lookup_tables`), a layer holds `BucketMasks` (the [H, nb, nb] block
mask and the key lengths) instead, about 10x cheaper to build (14B-sized layers, 40 heads x 840
blocks, one CPU core: 9.5 s with tables against 1.0 s without for 2 layers x 2 buckets).
"""

from __future__ import annotations

import torch

from compact_search.config import CompactConfig
from compact_search.geometry import TileLayout
from compact_search.runtime.lut import BlockLUT, build_block_lut

# The attribute of an attention module that holds its LayerTables while a handle is installed.
TABLES_ATTRIBUTE = "compact_search_tables"


class BucketTables(torch.nn.Module):
    """One layer's lookup tables in one step bucket (`BlockLUT`'s tensors), as buffers."""

    def __init__(self, lut: BlockLUT):
        super().__init__()
        for name in ("kv_block_ids", "full_counts", "total_counts", "key_lengths", "q_block_order"):
            self.register_buffer(name, getattr(lut, name), persistent=False)

    def lut(self, density: float) -> BlockLUT:
        return BlockLUT(
            self.kv_block_ids,
            self.full_counts,
            self.total_counts,
            self.key_lengths,
            self.q_block_order,
            density,
        )


class BucketMasks(torch.nn.Module):
    """One layer's block mask in one step bucket, for the backends that run from a mask.

    Buffers: ``block_mask`` bool [H, nb, nb] and ``key_lengths`` int32 [nb] (valid keys per
    block, as `BlockLUT.key_lengths`).
    """

    def __init__(self, block_mask: torch.Tensor, key_lengths: torch.Tensor):
        super().__init__()
        self.register_buffer("block_mask", block_mask, persistent=False)
        self.register_buffer("key_lengths", key_lengths.to(torch.int32), persistent=False)


class LayerTables(torch.nn.Module):
    """One self-attention layer's tables for every bucket, and the slot permutation.

    Buffers (not saved in a state dict): ``buckets[b]`` (`BucketTables`, or `BucketMasks` for
    the backends that read no tables), ``token_to_slot`` int64 [N] and ``padding_slots`` int64
    [padded_len - N] (`TileLayout`'s index tensors).
    """

    def __init__(
        self,
        index: int,
        buckets: list[BucketTables] | list[BucketMasks],
        layout: TileLayout,
        device,
    ):
        super().__init__()
        self.index = index  # for messages; compiled code never reads it
        self.buckets = torch.nn.ModuleList(buckets)
        self.register_buffer("token_to_slot", layout.token_to_slot.to(device), persistent=False)
        self.register_buffer("padding_slots", layout.padding_slots.to(device), persistent=False)

    def extra_repr(self) -> str:
        return f"layer {self.index}, {len(self.buckets)} buckets"


def _widen(lut: BlockLUT, width: int) -> BlockLUT:
    """The same tables with rows `width` wide: entries past a row's count repeat its last id."""
    ids = lut.kv_block_ids  # [Hm, nb, w]; column w - 1 already holds each row's padding value
    pad = ids[..., -1:].expand(-1, -1, width - ids.shape[-1])
    return BlockLUT(
        torch.cat([ids, pad], dim=-1).contiguous(),
        lut.full_counts,
        lut.total_counts,
        lut.key_lengths,
        lut.q_block_order,
        lut.density,
    )


def build_layer_tables(
    config: CompactConfig,
    layout: TileLayout,
    device: torch.device | str,
    *,
    lookup_tables: bool = True,
) -> tuple[list[LayerTables], tuple[float, ...]]:
    """Every layer's `LayerTables` on ``device``, and each bucket's mean block density (the
    kernels' autotuning key: one value per bucket, so it adds no graph per layer).

    ``lookup_tables=False``: each bucket holds `BucketMasks` (no lookup table is built), for the
    reference and FlexAttention, which run from a block mask.
    """
    device = torch.device(device)
    lengths = layout.key_block_lengths(device)  # [nb]
    per_layer: list[list] = [[] for _ in range(config.model.num_layers)]
    densities = []
    for bucket in range(config.schedule.num_buckets):
        luts, bucket_density = [], 0.0
        for layer in range(config.model.num_layers):
            mask = layout.block_mask(config.tile_masks(bucket, layer).to(device))  # [H, nb, nb]
            if lookup_tables:
                luts.append(
                    build_block_lut(
                        mask,
                        seq_len=layout.padded_len,
                        block_size=layout.block_size,
                        key_block_lengths=lengths,
                    )
                )
                bucket_density += luts[-1].density
            else:
                per_layer[layer].append(BucketMasks(mask, lengths))
                bucket_density += float(mask.float().mean()) if mask.numel() else 0.0
        if luts:
            width = max(lut.kv_block_ids.shape[-1] for lut in luts)
            for layer, lut in enumerate(luts):
                per_layer[layer].append(BucketTables(_widen(lut, width)))
        densities.append(bucket_density / config.model.num_layers)
    tables = [LayerTables(i, buckets, layout, device) for i, buckets in enumerate(per_layer)]
    return tables, tuple(densities)
