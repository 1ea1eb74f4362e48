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


def brute_force(q, k, v, token_mask):
    """Softmax over the allowed keys of each query, zeros where none is allowed (fp64)."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill(~token_mask, float("-inf")), dim=-1)
    return torch.where(token_mask.any(-1, keepdim=True), probs, 0) @ v.double()


def exported_flex_case(tmp_path):
    """A two-bucket, two-layer config on a padded tile layout (tiles do not divide the grid),
    exported with --format flex and read back; with q, k, v over its slots and the token mask
    every exported BlockMask must apply."""
    from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, uniform_config
    from compact_search.export import write_flex_masks
    from compact_search.runtime.kernels.flex import load_flex_masks

    config = uniform_config(
        ModelSpec("m", "wan", num_layers=2, num_heads=2, head_dim=16),
        GeometrySpec(Grid(3, 5, 6), TileShape(2, 4, 4), block_size=16),
        StepSchedule(num_steps=4, dense_steps=1, bucket_starts=(1, 3)),
        [HeadPattern.local(0, 0, 0), HeadPattern.local(1, 0, 1)],
    )
    masks = load_flex_masks(write_flex_masks(config, tmp_path / "c.flex.safetensors"))
    layout = config.layout()
    n, bs = layout.padded_len, layout.block_size
    block_of = torch.arange(n) // bs
    valid = (torch.arange(n) % bs) < layout.key_block_lengths()[block_of]  # [N]
    block_mask = config.block_masks(0, 1)  # [H, nb, nb]
    token_mask = block_mask[:, block_of][:, :, block_of] & valid  # [H, N, N]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(3))
    assert 0 < token_mask.float().mean() < 0.5  # sparse: dense attention is far from it
    return masks[(0, 1)], q, k, v, token_mask, layout.slot_to_token >= 0


def test_exported_flex_masks_give_the_sparse_result_in_eager_flex_attention(tmp_path):
    from torch.nn.attention.flex_attention import flex_attention

    block_mask, q, k, v, token_mask, real = exported_flex_case(tmp_path)
    expected = brute_force(q, k, v, token_mask)
    got = flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(got.double()[:, :, real], expected[:, :, real], rtol=1e-5, atol=1e-5)
    dense = brute_force(q, k, v, torch.ones_like(token_mask))
    assert (dense - expected)[:, :, real].abs().max() > 0.1  # the test tells sparse from dense


@pytest.mark.slow
def test_exported_flex_masks_give_the_sparse_result_in_compiled_flex_attention(tmp_path):
    from torch.nn.attention.flex_attention import flex_attention

    block_mask, q, k, v, token_mask, real = exported_flex_case(tmp_path)
    expected = brute_force(q, k, v, token_mask)
    got = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(got.double()[:, :, real], expected[:, :, real], rtol=1e-4, atol=1e-4)
