"""Tile mass on a CUDA device: the compiled Triton path (autotuned) against the torch path, with
and without the log-sum-exp of the dense cuDNN call. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from compact_search.geometry import Grid, TileShape
from compact_search.profiling.dense import dense_attention_with_log_sum_exp
from compact_search.profiling.tile_mass import (
    multi_tile_mass,
    sums_to_mass,
    torch_tile_mass_sums,
)

pytestmark = pytest.mark.gpu

CASES = [
    pytest.param(Grid(5, 13, 21), (TileShape(1, 4, 8), TileShape(5, 4, 8)), 64, id="g5x13x21-d64"),
    pytest.param(
        Grid(7, 12, 20), (TileShape(3, 8, 8), TileShape(3, 8, 16)), 128, id="g7x12x20-d128"
    ),
]


@pytest.mark.parametrize("grid,tiles,head_dim", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_matches_torch_on_gpu(grid, tiles, head_dim, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 3, grid.num_tokens, head_dim)
    q = (torch.randn(shape, generator=gen, device="cuda") * 1.5).to(dtype)
    k = (torch.randn(shape, generator=gen, device="cuda") * 1.5).to(dtype)
    v = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    scale = head_dim**-0.5
    _, lse = dense_attention_with_log_sum_exp(q, k, v)
    for given in (None, lse):
        masses = multi_tile_mass(q, k, grid, tiles, log_sum_exp=given)
        for tile in tiles:
            expected = sums_to_mass(
                torch_tile_mass_sums(q.double(), k.double(), grid, tile, scale=scale), grid, tile, 2
            )
            torch.testing.assert_close(masses[tile].double(), expected, atol=2e-4, rtol=2e-3)
            row_sums = masses[tile].sum(-1)
            torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=2e-4, rtol=0)
