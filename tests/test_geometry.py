"""Token tiling: permutation round trips, padding placement, block masks, cost."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_search.errors import UserInputError
from compact_search.geometry import (
    Grid,
    TileLayout,
    TileShape,
    check_block_size,
    tile_grid_of,
    valid_block_lengths,
    video_token_tiles,
)
from compact_search.patterns import HeadPattern

REAL_GRIDS = [
    pytest.param((21, 30, 52), (3, 8, 8), id="wan480p-3x8x8"),
    pytest.param((33, 45, 80), (4, 8, 8), id="hunyuan720p-4x8x8"),
    pytest.param((21, 45, 80), (3, 6, 10), id="wan720p-3x6x10"),
]

layouts = st.builds(
    lambda g, t, bs, p, at: TileLayout(Grid(*g), TileShape(*t), bs, p, at),
    st.tuples(*[st.integers(1, 9)] * 3),
    st.tuples(*[st.integers(1, 5)] * 3),
    st.sampled_from([1, 4, 16, 64]),
    st.integers(0, 70),
    st.sampled_from(["start", "end"]),
)


@settings(max_examples=150, deadline=None)
@given(layouts)
def test_round_trip_and_padding_is_zero(layout):
    x = torch.randn(2, 1, layout.num_tokens, 3)
    slots = layout.to_slots(x)
    assert slots.shape[-2] == layout.padded_len
    assert torch.equal(layout.from_slots(slots), x)
    padding = layout.slot_to_token < 0
    assert torch.all(slots[..., padding, :] == 0)
    assert int((~padding).sum()) == layout.num_tokens


@settings(max_examples=150, deadline=None)
@given(layouts)
def test_tiles_are_contiguous_and_valid_slots_are_block_prefixes(layout):
    owner = layout.slot_to_token
    # every block: valid slots first, then padding (one length per block describes it)
    valid = (owner >= 0).view(layout.num_blocks, layout.block_size)
    lengths = layout.block_lengths.long()
    expected = torch.arange(layout.block_size)[None, :] < lengths[:, None]
    assert torch.equal(valid, expected)
    # every video token sits inside the slot range of its own tile
    tiles = video_token_tiles(layout.grid, layout.tile)
    video_tokens = torch.arange(layout.grid.num_tokens)
    if layout.prefix_at == "start":
        video_tokens = video_tokens + layout.prefix_tokens
    slots = layout.token_to_slot[video_tokens]
    tile_of_slot = (slots - layout.prefix_slots) // layout.tile_slots
    assert torch.equal(tile_of_slot, tiles)
    # prefix tokens keep their order at the front
    prefix_tokens = torch.arange(layout.prefix_tokens)
    if layout.prefix_at == "end":
        prefix_tokens = prefix_tokens + layout.grid.num_tokens
    assert torch.equal(layout.token_to_slot[prefix_tokens], torch.arange(layout.prefix_tokens))


def test_tile_numbering_is_frame_major():
    grid, tile = Grid(4, 6, 6), TileShape(2, 3, 2)
    tiles = video_token_tiles(grid, tile).view(4, 6, 6)
    tg = tile_grid_of(grid, tile)
    assert tg.as_tuple() == (2, 2, 3)
    # token (f=2, h=3, w=5) lies in tile (1, 1, 2) -> (1 * 2 + 1) * 3 + 2
    assert tiles[2, 3, 5] == 11
    assert tiles[0, 0, 0] == 0


@pytest.mark.parametrize(("grid", "tile"), REAL_GRIDS)
def test_real_grids_with_partial_tiles(grid, tile):
    layout = TileLayout(Grid(*grid), TileShape(*tile), 128)
    counts = layout.tile_token_counts
    assert int(counts.sum()) == math.prod(grid)
    assert int(counts.max()) == math.prod(tile)
    assert int(counts.min()) < math.prod(tile)  # these grids are not divisible by the tile
    assert 0 < layout.padding_waste < 1
    x = torch.randn(1, 1, layout.num_tokens, 1)
    assert torch.equal(layout.from_slots(layout.to_slots(x)), x)


def test_border_tile_packs_real_tokens_first():
    # grid width 5 with tile width 4: the second tile column holds 1 real column
    layout = TileLayout(Grid(1, 2, 5), TileShape(1, 2, 4), block_size=4)
    # tile 1 (w = 4..4, h = 0..1): its 2 tokens occupy its first 2 slots
    tile1_slots = layout.slot_to_token[layout.tile_slots : 2 * layout.tile_slots]
    assert tile1_slots.tolist() == [4, 9, -1, -1, -1, -1, -1, -1]
    assert layout.block_lengths.tolist() == [4, 4, 2, 0]
    assert layout.tile_block_counts.tolist() == [2, 1]


def test_block_mask_matches_tile_mask_and_drops_padding_blocks():
    layout = TileLayout(Grid(3, 5, 5), TileShape(2, 4, 4), block_size=16, prefix_tokens=20)
    tg = layout.tile_grid
    tile_mask = HeadPattern.local(0, 0, 1).tile_mask(tg)
    bm = layout.block_mask(tile_mask)
    assert bm.shape == (layout.num_blocks, layout.num_blocks)
    pb, bpt = layout.prefix_blocks, layout.blocks_per_tile
    nonempty = layout.block_lengths > 0
    for i in range(layout.num_blocks):
        for j in range(layout.num_blocks):
            if not (nonempty[i] and nonempty[j]):
                expected = False
            elif i < pb or j < pb:
                expected = True
            else:
                expected = bool(tile_mask[(i - pb) // bpt, (j - pb) // bpt])
            assert bool(bm[i, j]) == expected, (i, j)
    assert float(layout.computed_blocks(tile_mask)) == float(bm.sum())


def test_cost_counts_padding_against_dense():
    # tile volume 48 padded to 64-slot blocks: a dense pattern costs more than dense attention
    layout = TileLayout(Grid(4, 4, 12), TileShape(1, 4, 12), block_size=64)
    full = torch.ones(layout.num_tiles, layout.num_tiles, dtype=torch.bool)
    assert float(layout.cost(full)) == pytest.approx(16 / 9)
    empty = torch.zeros_like(full)
    assert float(layout.cost(empty)) == 0.0


@pytest.mark.parametrize(
    ("grid", "tile", "message"),
    [((0, 2, 2), (1, 1, 1), "grid.frames"), ((2, 2, 2), (1, -1, 1), "tile.height")],
)
def test_bad_geometry_names_the_field(grid, tile, message):
    with pytest.raises(UserInputError, match=message):
        TileLayout(Grid(*grid), TileShape(*tile))


def test_permutation_shape_errors():
    layout = TileLayout(Grid(2, 2, 2), TileShape(1, 2, 2), block_size=4)
    with pytest.raises(ValueError, match="tokens"):
        layout.to_slots(torch.zeros(1, 1, 7, 2))
    with pytest.raises(ValueError, match="slots"):
        layout.from_slots(torch.zeros(1, 1, 7, 2))


@pytest.mark.parametrize(
    ("num_valid", "block_size", "num_blocks", "expected"),
    [
        (300, 128, None, [128, 128, 44]),  # the ragged last block of an untiled sequence
        (256, 128, None, [128, 128]),
        (0, 128, None, []),  # no tokens, no blocks
        (5, 4, 3, [4, 1, 0]),  # a padded run: blocks past the real tokens are empty
        (torch.tensor([5, 0, 8]), 4, 2, [[4, 1], [0, 0], [4, 4]]),  # one run per count
    ],
    ids=["ragged", "whole", "empty", "padded-run", "per-tile"],
)
def test_valid_block_lengths(num_valid, block_size, num_blocks, expected):
    lengths = valid_block_lengths(num_valid, block_size, num_blocks)
    assert lengths.dtype == torch.int32 and lengths.tolist() == expected


@pytest.mark.parametrize("block_size", [16, 32, 64, 128, 256])
def test_kernel_block_sizes_pass(block_size):
    check_block_size(block_size)


@pytest.mark.parametrize("block_size", [0, 8, 24, 48, 100])
def test_other_block_sizes_are_user_errors_naming_the_option(block_size):
    with pytest.raises(
        UserInputError, match=f"--block-size must be a power of two >= 16, got {block_size}"
    ):
        check_block_size(block_size, "--block-size")
