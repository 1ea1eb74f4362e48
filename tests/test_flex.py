"""FlexAttention interop: block-level BlockMasks reproduce the reference, padding included."""

import math

import pytest
import torch

from compact_search import sparse_attention
from compact_search.geometry import Grid, TileLayout, TileShape
from compact_search.patterns import HeadPattern
from compact_search.runtime.kernels.reference import masked_reference


@pytest.mark.parametrize(("n", "bs"), [(63, 16), (100, 32)], ids=["N63-bs16", "N100-bs32"])
def test_flex_matches_reference_with_empty_rows_and_padding(n, bs):
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 3, n, 16, generator=gen) for _ in range(3))
    nb = math.ceil(n / bs)
    mask = torch.rand(3, nb, nb, generator=gen) < 0.5
    mask[0, 0] = False
    mask[1, -1] = True
    lengths = torch.full((nb,), bs, dtype=torch.int32)
    lengths[-1] = n - (nb - 1) * bs
    lengths[0] = 3
    expected = masked_reference(q, k, v, mask, block_size=bs, key_block_lengths=lengths)
    got = sparse_attention(q, k, v, mask, block_size=bs, backend="flex", key_block_lengths=lengths)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.all(got[0, 0, :bs] == 0)


def test_flex_on_a_tiled_layout():
    layout = TileLayout(Grid(3, 5, 6), TileShape(2, 4, 4), block_size=16)
    mask = layout.block_mask(HeadPattern.local(0, 0, 1).tile_mask(layout.tile_grid))[None]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, layout.padded_len, 8, generator=gen) for _ in range(3))
    lengths = layout.key_block_lengths()
    expected = masked_reference(q, k, v, mask, block_size=16, key_block_lengths=lengths)
    got = sparse_attention(q, k, v, mask, block_size=16, backend="flex", key_block_lengths=lengths)
    real = layout.slot_to_token >= 0
    torch.testing.assert_close(got[:, :, real], expected[:, :, real], rtol=1e-4, atol=1e-5)
