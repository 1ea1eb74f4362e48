"""Offset tables: a pattern's mean recall and its cost as sums over tile offsets (|df|, |dh|, |dw|).

Under the clipping border rule a head pattern keeps key tile j for query tile i exactly when the
offset |coords(i) - coords(j)| lies in the pattern's kept offset set. So

    mean recall over query tiles = sum over kept offsets o of T[o],
        T[o] = (1 / nq) * sum of tile_mass[i, j] over tile pairs (i, j) at offset o
    computed blocks / dense blocks = prefix term + sum over kept offsets o of C[o],
        C[o] = sum of blocks(i) * blocks(j) over pairs at offset o, over dense blocks

and the density is the same sum over D[o] = (pairs at offset o) / nq^2. The search never touches
an [nq, nk] mask: it sums the tables of a frame group over |df| and takes inclusive 2D prefix sums
over (|dh|, |dw|), so the recall or cost of any anchored rectangle `Rect(h, w)` in a group is one
lookup, and the union of two anchored rectangles is R1 + R2 - R(min h, min w).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileLayout, tile_coordinates


def offset_index(tile_grid: Grid) -> torch.Tensor:
    """[nt, nt] int64: flat offset id |df| * Ht * Wt + |dh| * Wt + |dw| of every tile pair."""
    coords = tile_coordinates(tile_grid)  # [nt, 3]
    dist = (coords[:, None, :] - coords[None, :, :]).abs()  # [nt, nt, 3]
    _, ht, wt = tile_grid.as_tuple()
    return (dist[..., 0] * ht + dist[..., 1]) * wt + dist[..., 2]


def recall_tables(tile_mass: torch.Tensor, tile_grid: Grid) -> np.ndarray:
    """Tile mass [..., nq, nk] -> per-offset mean recall table [..., Ft, Ht, Wt] float64.

    Summing the table over a pattern's kept offsets gives the pattern's recall (mean over query
    tiles) for every leading index (sample, head) at once.
    """
    nt = tile_grid.num_tokens
    if tile_mass.shape[-2:] != (nt, nt):
        raise UserInputError(
            f"tile mass must end in ({nt}, {nt}) for tile grid {tile_grid}, "
            f"got {tuple(tile_mass.shape)}"
        )
    lead = tile_mass.shape[:-2]
    flat = tile_mass.reshape(-1, nt * nt).to(torch.float64)  # [B, nq*nk]
    index = offset_index(tile_grid).reshape(-1)  # [nq*nk]
    table = torch.zeros((flat.shape[0], nt), dtype=torch.float64)
    table.index_add_(1, index, flat)  # [B, n_offsets]; n_offsets == nt
    table /= nt
    return table.reshape(*lead, *tile_grid.as_tuple()).numpy()


@dataclass(frozen=True)
class CostModel:
    """What a kept tile pair costs: kernel blocks of a layout, or one unit (density) without one.

    `per_offset` [Ft, Ht, Wt] is each offset's share of the dense cost; `constant` is the prefix
    (text tokens, always computed). Without a layout the cost of a mask is its density.
    """

    tile_grid: Grid
    per_offset: np.ndarray  # [Ft, Ht, Wt] float64
    constant: float
    # The cost of HeadPattern.dense(): every tile pair kept. With a layout that is the padded
    # full mask the kernel runs (> 1 where tiles pad their blocks), not the unpadded 1.0.
    dense_cost: float

    def __post_init__(self) -> None:
        if self.per_offset.shape != self.tile_grid.as_tuple():
            raise ValueError(
                f"per_offset shape {self.per_offset.shape} != tile grid {self.tile_grid}"
            )

    @classmethod
    def density_only(cls, tile_grid: Grid) -> CostModel:
        return cls(tile_grid, density_table(tile_grid), 0.0, 1.0)

    @classmethod
    def from_layout(cls, layout: TileLayout) -> CostModel:
        tg = layout.tile_grid
        counts = layout.tile_block_counts.to(torch.float64)  # [nt]
        pair_blocks = (counts[:, None] * counts[None, :]).reshape(-1)  # [nq*nk]
        table = torch.zeros(tg.num_tokens, dtype=torch.float64)
        table.index_add_(0, offset_index(tg).reshape(-1), pair_blocks)
        pb = layout.prefix_blocks
        prefix = pb * pb + 2 * pb * float(counts.sum())
        dense = float(layout.dense_blocks)
        full_mask = float(table.sum()) + prefix  # = (prefix blocks + tile blocks) ** 2
        return cls(
            tg, (table / dense).reshape(tg.as_tuple()).numpy(), prefix / dense, full_mask / dense
        )


def density_table(tile_grid: Grid) -> np.ndarray:
    """[Ft, Ht, Wt] float64: the share of all tile pairs that sit at each offset."""
    nt = tile_grid.num_tokens
    counts = torch.bincount(offset_index(tile_grid).reshape(-1), minlength=nt)
    return (counts.to(torch.float64) / (nt * nt)).reshape(tile_grid.as_tuple()).numpy()


def frame_groups_of(cuts: tuple[int, ...], frames: int) -> tuple[tuple[int, int], ...]:
    """Interior cut points over |df| -> contiguous [start, stop) groups covering [0, frames)."""
    bounds = (0, *cuts, frames)
    if any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise UserInputError(f"frame cuts must increase strictly inside (0, {frames}), got {cuts}")
    return tuple(zip(bounds, bounds[1:], strict=False))


def group_rect_sums(table: np.ndarray, groups: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Table [..., Ft, Ht, Wt] -> [..., G, Ht*Wt + 1]: the sum over Rect(h, w) in every group.

    Entry h * Wt + w holds the sum over start <= |df| < stop, |dh| <= h, |dw| <= w; the last
    entry is 0, the value of "no rectangle", so option formulas index it instead of branching.
    """
    per_group = np.stack([table[..., a:b, :, :].sum(axis=-3) for a, b in groups], axis=-3)
    rect = per_group.cumsum(axis=-2).cumsum(axis=-1)  # [..., G, Ht, Wt]
    flat = rect.reshape(*rect.shape[:-2], -1)
    return np.concatenate([flat, np.zeros((*flat.shape[:-1], 1))], axis=-1)


@dataclass(frozen=True)
class RectOptions:
    """Every choice a frame group has: none, one rectangle, or two crossing rectangles.

    An option's value (recall, cost or density) is `S[add_a] + S[add_b] - S[sub]` over a group's
    rect sums S (`group_rect_sums`); index `none` points at the zero entry. Pairs are only the
    crossing ones (h1 < h2 and w1 > w2): any other pair is one rectangle inside the other.
    """

    height: int  # Ht
    width: int  # Wt

    @cached_property
    def none(self) -> int:
        return self.height * self.width

    @cached_property
    def rects(self) -> np.ndarray:
        """[O, 2, 2] int: (h, w) of up to two rects per option, -1 where absent."""
        ht, wt = self.height, self.width
        out = [[[-1, -1], [-1, -1]]]
        out += [[[h, w], [-1, -1]] for h in range(ht) for w in range(wt)]
        out += [
            [[h1, w1], [h2, w2]]
            for h1 in range(ht)
            for h2 in range(h1 + 1, ht)
            for w2 in range(wt)
            for w1 in range(w2 + 1, wt)
        ]
        return np.asarray(out, dtype=np.int64)

    @cached_property
    def indices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(add_a, add_b, sub), each [O] int, into the flat rect sums of one group."""
        r = self.rects
        wt, none = self.width, self.none

        def flat(h: np.ndarray, w: np.ndarray) -> np.ndarray:
            return np.where(h >= 0, h * wt + w, none)

        add_a = flat(r[:, 0, 0], r[:, 0, 1])
        add_b = flat(r[:, 1, 0], r[:, 1, 1])
        sub = flat(r[:, 0, 0], np.where(r[:, 1, 0] >= 0, r[:, 1, 1], -1))
        sub = np.where(r[:, 1, 0] >= 0, sub, none)
        return add_a, add_b, sub

    def values(self, rect_sums: np.ndarray) -> np.ndarray:
        """Rect sums [..., G, Ht*Wt + 1] -> option values [..., G, O]."""
        add_a, add_b, sub = self.indices
        return rect_sums[..., add_a] + rect_sums[..., add_b] - rect_sums[..., sub]

    @property
    def count(self) -> int:
        return len(self.rects)
