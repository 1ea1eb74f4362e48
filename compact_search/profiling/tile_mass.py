"""Exact tile-level attention mass, computed from q and k without an [N, N] tensor.

tile mass A[i, j] of a head: the softmax probability that the query tokens of tile i put on the
key tokens of tile j, summed over those keys and averaged over those queries (and the batch).
Every row sums to 1. Tiles are numbered frame-major over the tile grid; border tiles the grid
cuts short hold fewer tokens and are averaged over the tokens they do hold.
"""

from __future__ import annotations

import torch

from compact_search.geometry import Grid, TileShape, tile_grid_of, video_token_tiles

# Upper bound on the fp32 score chunk [B, H, chunk, N] held at once, in elements (256 MB).
CHUNK_ELEMENTS = 64 * 1024 * 1024


def attention_tile_mass_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Grid | tuple[int, int, int],
    tile: TileShape | tuple[int, int, int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Chunked fp32 (fp64 for fp64 inputs) tile mass. q, k [B, H, N, D] -> [H, nq, nk] fp32."""
    grid, tile = Grid.of(grid), TileShape.of(tile)
    b, h, n, d = q.shape
    if k.shape != q.shape:
        raise ValueError(f"q and k must have one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if n != grid.num_tokens:
        raise ValueError(f"q has {n} tokens but grid {grid} holds {grid.num_tokens}")
    scale = d**-0.5 if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    nt = tile_grid_of(grid, tile).num_tokens
    token_tile = video_token_tiles(grid, tile).to(q.device)  # [N]
    sums = torch.zeros((h, nt, nt), dtype=ct, device=q.device)  # [H, nq, nk]
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * n))
    kc = k.to(ct)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        scores = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:stop].to(ct), kc) * scale
        probs = torch.softmax(scores, dim=-1)  # [B, H, C, N]
        per_key_tile = torch.zeros((b, h, stop - start, nt), dtype=ct, device=q.device)
        per_key_tile.index_add_(3, token_tile, probs)  # [B, H, C, nk]
        # sum over the batch, then over the query tokens of each query tile
        sums.index_add_(1, token_tile[start:stop], per_key_tile.sum(0))
    counts = torch.bincount(token_tile, minlength=nt).to(ct) * b  # [nq]
    return (sums / counts[None, :, None]).float()


def attention_tile_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Grid | tuple[int, int, int],
    tile: TileShape | tuple[int, int, int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Tile mass [H, nq, nk] of video tokens. q, k [B, H, N, D] in model (frame-major) order."""
    return attention_tile_mass_torch(q, k, grid, tile, scale=scale)
