"""Tile mass: torch and Triton (interpreter on CPU) paths against a brute-force fp64 softmax."""

from __future__ import annotations

import os

import pytest
import torch

from compact_search.geometry import Grid, TileShape, tile_grid_of, video_token_tiles
from compact_search.profiling import attention_tile_mass
from compact_search.profiling.tile_mass import (
    attention_tile_mass_torch,
    base_tile_of,
    multi_tile_mass,
    pool_tile_sums,
    tile_mass_sums,
    tile_token_counts,
)
from compact_search.profiling.triton_tile_mass import triton_log_sum_exp, triton_tile_mass_sums

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def brute_force_tile_mass(q, k, grid: Grid, tile: TileShape, scale=None) -> torch.Tensor:
    """[H, nq, nk] fp64 from the full [B, H, N, N] softmax."""
    q, k = q.double(), k.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # [B, H, N, N]
    ids = video_token_tiles(grid, tile)
    nt = tile_grid_of(grid, tile).num_tokens
    one_hot = torch.nn.functional.one_hot(ids, nt).double()  # [N, nt]
    sums = torch.einsum("bhqk,qi,kj->hij", probs, one_hot, one_hot)
    counts = one_hot.sum(0) * q.shape[0]
    return sums / counts[:, None]


CASES = [
    # (batch, heads, grid, tile, head_dim)
    pytest.param(1, 2, (2, 3, 5), (1, 2, 2), 16, id="B1-H2-g2x3x5-t1x2x2-d16"),
    pytest.param(2, 3, (3, 4, 4), (2, 4, 4), 32, id="B2-H3-g3x4x4-t2x4x4-d32"),
    pytest.param(1, 1, (3, 5, 7), (3, 5, 7), 16, id="B1-H1-g3x5x7-whole-d16"),
]


def _random_qk(b, h, grid, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = Grid.of(grid).num_tokens
    q = torch.randn(b, h, n, d, generator=gen) * 2.0
    k = torch.randn(b, h, n, d, generator=gen) * 2.0
    return q.to(dtype), k.to(dtype)


@pytest.mark.parametrize("b,h,grid,tile,d", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_torch_path_matches_brute_force(b, h, grid, tile, d, dtype):
    q, k = _random_qk(b, h, grid, d, dtype)
    grid, tile = Grid.of(grid), TileShape.of(tile)
    expected = brute_force_tile_mass(q, k, grid, tile)
    got = attention_tile_mass_torch(q, k, grid, tile)
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-5, rtol=0)


@pytest.mark.skipif(not INTERPRETING, reason="Triton path on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("b,h,grid,tile,d", CASES)
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"]
)
def test_triton_path_matches_brute_force(b, h, grid, tile, d, dtype, tol):
    q, k = _random_qk(b, h, grid, d, dtype, seed=1)
    grid, tile = Grid.of(grid), TileShape.of(tile)
    # The reference sees the same rounded bf16 values the kernel sees.
    expected = brute_force_tile_mass(q, k, grid, tile)
    sums = triton_tile_mass_sums(q, k, grid, tile, scale=d**-0.5)
    counts = tile_token_counts(grid, tile).double() * b
    got = sums.double() / counts[:, None]
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@pytest.mark.skipif(not INTERPRETING, reason="Triton path on CPU needs TRITON_INTERPRET=1")
def test_triton_path_with_given_log_sum_exp():
    """Pass 2 alone, fed the normaliser a dense attention call would return."""
    grid, tile = Grid(2, 4, 6), TileShape(1, 2, 3)
    q, k = _random_qk(1, 2, grid, 16, torch.float32, seed=2)
    scale = 0.3
    lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)  # [B, H, N]
    sums = triton_tile_mass_sums(q, k, grid, tile, scale=scale, log_sum_exp=lse.float())
    got = sums.double() / tile_token_counts(grid, tile).double()[:, None]
    expected = brute_force_tile_mass(q, k, grid, tile, scale=scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not INTERPRETING, reason="Triton path on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("b,h,grid,tile,d", CASES)
def test_triton_log_sum_exp_is_the_exact_normaliser_in_model_order(b, h, grid, tile, d):
    """Pass 1 alone, read back from its padded slot layout into token order."""
    q, k = _random_qk(b, h, grid, d, torch.float32, seed=3)
    grid, tile = Grid.of(grid), TileShape.of(tile)
    scale = 0.4
    expected = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)
    got = triton_log_sum_exp(q, k, grid, tile, scale=scale)
    assert got.shape == (b, h, grid.num_tokens) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_pooling_equals_direct_computation():
    grid = Grid(4, 6, 10)
    q, k = _random_qk(1, 2, grid, 8, torch.float64, seed=3)
    base = TileShape(1, 2, 2)
    base_sums = tile_mass_sums(q, k, grid, base)
    for target in [TileShape(2, 4, 4), TileShape(4, 6, 2), TileShape(3, 2, 6)]:
        pooled = pool_tile_sums(base_sums, grid, base, target)
        direct = tile_mass_sums(q, k, grid, target)
        torch.testing.assert_close(pooled, direct, atol=1e-10, rtol=1e-10)


def test_multi_tile_mass_serves_every_candidate():
    grid = Grid(3, 6, 6)
    tiles = [TileShape(1, 2, 4), TileShape(3, 4, 2), TileShape(2, 6, 6)]
    assert base_tile_of(tiles) == TileShape(1, 2, 2)
    q, k = _random_qk(2, 2, grid, 8, torch.float64, seed=4)
    masses = multi_tile_mass(q, k, grid, tiles)
    for tile in tiles:
        expected = brute_force_tile_mass(q, k, grid, tile)
        torch.testing.assert_close(masses[tile].double(), expected, atol=1e-6, rtol=1e-6)


def test_shape_errors_name_the_problem():
    q = torch.randn(1, 1, 10, 8)
    with pytest.raises(ValueError, match="grid 2x2x2 holds 8"):
        attention_tile_mass(q, q, (2, 2, 2), (1, 1, 1))
