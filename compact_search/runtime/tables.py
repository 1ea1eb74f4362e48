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


class LayerTables(torch.nn.Module):
    """One self-attention layer's tables for every bucket, and the slot permutation.

    Buffers (not saved in a state dict): ``buckets[b]`` (`BucketTables`), ``token_to_slot``
    int64 [N] and ``padding_slots`` int64 [padded_len - N] (`TileLayout`'s index tensors).
    """

    def __init__(self, index: int, luts: list[BlockLUT], layout: TileLayout, device):
        super().__init__()
        self.index = index  # for messages; compiled code never reads it
        self.buckets = torch.nn.ModuleList(BucketTables(lut) for lut in luts)
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
    config: CompactConfig, layout: TileLayout, device: torch.device | str
) -> tuple[list[LayerTables], tuple[float, ...]]:
    """Every layer's `LayerTables` on ``device``, and each bucket's mean block density (the
    kernels' autotuning key: one value per bucket, so it adds no graph per layer)."""
    device = torch.device(device)
    lengths = layout.key_block_lengths(device)  # [nb]
    per_layer: list[list[BlockLUT]] = [[] for _ in range(config.model.num_layers)]
    densities = []
    for bucket in range(config.schedule.num_buckets):
        luts = [
            build_block_lut(
                layout.block_mask(config.tile_masks(bucket, layer).to(device)),
                seq_len=layout.padded_len,
                block_size=layout.block_size,
                key_block_lengths=lengths,
            )
            for layer in range(config.model.num_layers)
        ]
        width = max(lut.kv_block_ids.shape[-1] for lut in luts)
        for layer, lut in enumerate(luts):
            per_layer[layer].append(_widen(lut, width))
        densities.append(sum(lut.density for lut in luts) / len(luts))
    tables = [LayerTables(i, luts, layout, device) for i, luts in enumerate(per_layer)]
    return tables, tuple(densities)
