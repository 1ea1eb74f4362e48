"""Exact tile-level attention mass, computed from q and k without an [N, N] tensor.

tile mass A[i, j] of a head: the softmax probability that the query tokens of tile i put on the
key tokens of tile j, summed over those keys and averaged over those queries (and the batch).
Every row sums to 1. Tiles are numbered frame-major over the tile grid; border tiles the grid
cuts short hold fewer tokens and are averaged over the tokens they do hold.

Two paths compute the same numbers: on CUDA the Triton kernels of ``triton_tile_mass.py``; on
CPU (and for head dims tl.dot does not take) a chunked torch softmax. Internally both produce
probability *sums* per tile pair; sums pool exactly to coarser tiles (``pool_tile_sums``), which
is how one capture serves every candidate tile shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileLayout, TileShape, tile_grid_of, video_token_tiles
from compact_search.profiling.triton_tile_mass import (
    tile_mass_kernel_supports,
    triton_tile_mass_sums,
)

# Upper bound on the fp32 score chunk [B, H, chunk, N] held at once, in elements (256 MB).
CHUNK_ELEMENTS = 64 * 1024 * 1024


def _check_inputs(q: torch.Tensor, k: torch.Tensor, grid: Grid) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(
            f"q and k must both be [B, H, N, D], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[2] != grid.num_tokens:
        raise ValueError(f"q has {q.shape[2]} tokens but grid {grid} holds {grid.num_tokens}")


@functools.lru_cache(maxsize=64)
def tile_token_counts(grid: Grid, tile: TileShape) -> torch.Tensor:
    """[nt] int64: real tokens in every tile of the tile grid (cached; do not modify)."""
    nt = tile_grid_of(grid, tile).num_tokens
    return torch.bincount(video_token_tiles(grid, tile), minlength=nt)


def torch_tile_mass_sums(
    q: torch.Tensor, k: torch.Tensor, grid: Grid, tile: TileShape, *, scale: float
) -> torch.Tensor:
    """Chunked softmax in fp32 (fp64 for fp64 inputs): probability sums [H, nt, nt] over the batch
    and over the query tokens of each query tile.

    Tokens are permuted into tile order first (``TileLayout`` with 1-token blocks: every tile
    padded to the full tile volume), so per-tile sums are plain reshapes and sums; padded keys get
    a -inf bias and padded query rows are zeroed. Each query row is normalised after its keys are
    summed per tile, so the full probability matrix is never divided.
    """
    b, h, _, _ = q.shape
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    layout = TileLayout(grid, tile, block_size=1)
    nt, volume = layout.num_tiles, layout.tile_slots
    real_slots = (layout.slot_to_token >= 0).to(q.device)  # [P]
    padded = not bool(real_slots.all())
    q_slots = layout.to_slots(q.to(ct), dim=2)  # [B, H, P, D]
    # Scale folded into the keys once; [B, H, D, P] so each chunk is one plain matmul.
    k_slots_t = (layout.to_slots(k.to(ct), dim=2) * scale).transpose(-1, -2).contiguous()
    key_bias = torch.zeros(real_slots.shape, dtype=ct, device=q.device)
    key_bias.masked_fill_(~real_slots, float("-inf"))  # [P]
    sums = torch.empty((h, nt, nt), dtype=ct, device=q.device)  # [H, nq, nk]
    # Whole query tiles per chunk, the [B, H, rows, P] score chunk under CHUNK_ELEMENTS; one
    # buffer reused across chunks (fresh multi-MB allocations cost page faults on CPU).
    tiles_per_chunk = max(1, CHUNK_ELEMENTS // max(1, b * h * volume * layout.padded_len))
    scores = None
    for first in range(0, nt, tiles_per_chunk):
        last = min(first + tiles_per_chunk, nt)
        rows = slice(first * volume, last * volume)
        q_chunk = q_slots[:, :, rows]
        if scores is None or scores.shape[2] != q_chunk.shape[2]:
            scores = q.new_empty((b, h, q_chunk.shape[2], layout.padded_len), dtype=ct)
        torch.matmul(q_chunk, k_slots_t, out=scores)  # [B, H, C, P]
        if padded:
            scores.add_(key_bias)
        scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
        per_key_tile = scores.view(b, h, -1, nt, volume).sum(-1)  # [B, H, C, nk]
        per_key_tile /= per_key_tile.sum(-1, keepdim=True)
        if padded:
            per_key_tile *= real_slots[rows, None]  # padded query rows count for nothing
        sums[:, first:last] = per_key_tile.view(b, h, last - first, volume, nt).sum((0, 3))
    return sums


def tile_mass_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Grid | tuple[int, int, int],
    tile: TileShape | tuple[int, int, int],
    *,
    scale: float | None = None,
    log_sum_exp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Probability sums [H, nt, nt] (fp32; fp64 on the torch path for fp64 inputs).

    Dispatch: CUDA (or the Triton interpreter) with a head dim tl.dot takes -> Triton, else torch.
    ``log_sum_exp`` [B, H, N] (natural log over the scaled scores) lets the Triton path skip its
    first pass; the torch path does not need it.
    """
    grid, tile = Grid.of(grid), TileShape.of(tile)
    _check_inputs(q, k, grid)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if tile_mass_kernel_supports(q) and q.dtype != torch.float64:
        return triton_tile_mass_sums(q, k, grid, tile, scale=scale, log_sum_exp=log_sum_exp)
    return torch_tile_mass_sums(q, k, grid, tile, scale=scale)


def sums_to_mass(sums: torch.Tensor, grid: Grid, tile: TileShape, batch: int) -> torch.Tensor:
    """Probability sums [..., nt, nt] -> tile mass (rows averaged over real query tokens)."""
    counts = tile_token_counts(grid, tile).to(sums.device, sums.dtype) * batch  # [nq]
    return sums / counts[:, None]


@functools.lru_cache(maxsize=64)
def _target_of_base(
    grid: Grid, base: TileShape, target: TileShape, device: torch.device
) -> torch.Tensor:
    """[nb] int64: the target tile holding every base tile (cached per device)."""
    base_grid, target_grid = tile_grid_of(grid, base), tile_grid_of(grid, target)
    ratio = [t // b for b, t in zip(base.as_tuple(), target.as_tuple(), strict=True)]
    f = torch.arange(base_grid.frames) // ratio[0]
    h = torch.arange(base_grid.height) // ratio[1]
    w = torch.arange(base_grid.width) // ratio[2]
    ids = (f[:, None, None] * target_grid.height + h[None, :, None]) * target_grid.width + w[
        None, None, :
    ]
    return ids.reshape(-1).to(device)


def pool_tile_sums(
    sums: torch.Tensor, grid: Grid, base: TileShape, target: TileShape
) -> torch.Tensor:
    """Probability sums [..., nb, nb] over base tiles -> [..., nt, nt] over target tiles.

    Exact when every target tile is a union of base tiles: each axis of target is a multiple of
    the same axis of base (tiles start at 0, so the boundaries then line up, border tiles too).
    """
    for b_size, t_size in zip(base.as_tuple(), target.as_tuple(), strict=True):
        if t_size % b_size:
            raise UserInputError(f"tile {target} is not a union of base tiles {base}")
    target_of_base = _target_of_base(grid, base, target, sums.device)  # [nb]
    target_grid = tile_grid_of(grid, target)
    nt = target_grid.num_tokens
    rows = sums.new_zeros((*sums.shape[:-2], nt, sums.shape[-1]))
    rows.index_add_(-2, target_of_base, sums)  # [..., nt, nb]
    out = sums.new_zeros((*sums.shape[:-2], nt, nt))
    return out.index_add_(-1, target_of_base, rows)  # [..., nt, nt]


def base_tile_of(tiles: Sequence[TileShape]) -> TileShape:
    """The coarsest tile every candidate is a union of: the per-axis gcd."""
    return TileShape(
        *(math.gcd(*axis) for axis in zip(*(t.as_tuple() for t in tiles), strict=True))
    )


def multi_tile_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Grid,
    tiles: Sequence[TileShape],
    *,
    scale: float | None = None,
    log_sum_exp: torch.Tensor | None = None,
) -> dict[TileShape, torch.Tensor]:
    """Tile mass [H, nt, nt] fp32 for every candidate tile from one pass at their base tile."""
    base = base_tile_of(tiles)
    sums = tile_mass_sums(q, k, grid, base, scale=scale, log_sum_exp=log_sum_exp)
    batch = q.shape[0]
    out = {}
    for tile in tiles:
        pooled = sums if tile == base else pool_tile_sums(sums, grid, base, tile)
        out[tile] = sums_to_mass(pooled, grid, tile, batch).float()
    return out


def attention_tile_mass_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Grid | tuple[int, int, int],
    tile: TileShape | tuple[int, int, int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """The torch path of :func:`attention_tile_mass`, on any device. -> [H, nq, nk] fp32."""
    grid, tile = Grid.of(grid), TileShape.of(tile)
    _check_inputs(q, k, grid)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sums = torch_tile_mass_sums(q, k, grid, tile, scale=scale)
    return sums_to_mass(sums, grid, tile, q.shape[0]).float()


def attention_tile_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: Grid | tuple[int, int, int],
    tile: TileShape | tuple[int, int, int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Tile mass [H, nq, nk] fp32 of video tokens.

    q, k [B, H, N, D] in model token order (frame-major), N = F*H*W of ``grid``; ``tile`` a
    (tf, th, tw) shape; tiles numbered frame-major over the tile grid. Averaged over the batch and
    over the real (unpadded) query tokens of each tile; every row sums to 1. ``scale`` defaults to
    D ** -0.5. Triton on CUDA, chunked torch elsewhere; both agree within dtype tolerance.
    """
    grid, tile = Grid.of(grid), TileShape.of(tile)
    sums = tile_mass_sums(q, k, grid, tile, scale=scale)
    return sums_to_mass(sums, grid, tile, q.shape[0]).float()
