"""Offset tables: a pattern's mean recall and its cost as sums over tile offsets (|df|, |dh|, |dw|).

Under the clipping border rule a head pattern keeps key tile j for query tile i exactly when the
offset |coords(i) - coords(j)| lies in the pattern's kept offset set. So

    mean recall over query tiles = sum over kept offsets o of T[o],
        T[o] = (1 / nq) * sum of tile_mass[i, j] over tile pairs (i, j) at offset o
    computed blocks / dense blocks = prefix term + sum over kept offsets o of C[o],
        C[o] = sum of blocks(i) * blocks(j) over pairs at offset o, over dense blocks

and the density is the same sum over D[o] = (pairs at offset o) / nq^2. The search never touches
an [nq, nk] mask: it sums the tables of a frame group over |df| and takes inclusive 2D prefix sums
over (|dh|, |dw|), so the recall or cost of any box of offsets in a group is four lookups (one for
a window anchored at the query tile), and the union of two windows is W1 + W2 - (W1 and W2)
(`WindowOptions`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileLayout, tile_coordinates
from compact_search.patterns import Rect


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


# Options per frame group the solvers enumerate by default. The full window family fits on
# spatial tile grids up to 4x4 (2,840 options); larger grids get the tiers that fit (see
# `WindowOptions`). Measured in docs/search.md: what each tier buys and what it costs.
DEFAULT_MAX_OPTIONS = 3000

# Window tiers, in the order they join the option set (each whole, while it fits the budget).
WINDOW_TIERS = ("near", "wrapped", "half-wrapped", "band")


def _runs(mask: int, n: int) -> list[tuple[int, int]]:
    """Maximal runs [lo, hi] of set bits in an n-bit axis mask."""
    runs, lo = [], None
    for d in range(n + 1):
        on = d < n and bool(mask >> d & 1)
        if on and lo is None:
            lo = d
        elif not on and lo is not None:
            runs.append((lo, d - 1))
            lo = None
    return runs


class WindowOptions:
    """Every choice a frame group has: none, one window, or the union of two (`patterns.Rect`).

    Options come in tiers (`WINDOW_TIERS`): near windows {|dh| <= h, |dw| <= w} and their
    crossing pairs (the classic family); windows wrapped on both axes; windows wrapped on one
    axis; bands (a span that starts at a distance). A tier brings its windows and every distinct
    union of one of them with a window of the same or an earlier tier. Tiers join in order while
    the option count stays within `max_options`; a tier that does not fit is left out whole (so
    the family depends on the tile grid and the budget only, never on the data). Near windows
    always join and keep today's indices: 0 is none, 1 + h * Wt + w the window Rect(h, w).

    Values are O(1) per option from the group's 2D prefix sums S (`group_rect_sums`): an option
    is a signed sum of a few axis-aligned boxes (a window is one box, or up to four where it
    wraps; a union adds two windows and subtracts their intersection), and a box is four lookups.
    """

    def __init__(self, height: int, width: int, max_options: int = DEFAULT_MAX_OPTIONS):
        self.height, self.width = height, width
        self.max_options = max_options
        self.windows: list[tuple[Rect, ...]] = [()]
        self.tiers: list[str] = []
        self._masks: list[int] = [0]  # kept (|dh|, |dw|) offsets per option, bit h * Wt + w
        seen = {0: 0}
        earlier: list[tuple[Rect, int]] = []
        for tier in WINDOW_TIERS:
            new = [(r, self._mask(r)) for r in self._tier_windows(tier)]
            pool = earlier + new
            if tier == "near":
                added = self._near_options(new)
            elif len(new) * len(pool) > 20 * max(1, max_options):
                continue  # far too many candidates to enumerate for what is left of the budget
            else:
                added = {}
                for rect, mask in new:
                    if mask not in seen and mask not in added:
                        added[mask] = (rect,)
                for i, (first, first_mask) in enumerate(new):
                    for second, second_mask in pool[: len(earlier) + i]:
                        union = first_mask | second_mask
                        if union not in seen and union not in added:
                            added[union] = (second, first)
                if len(self.windows) + len(added) > max_options:
                    continue
            for mask, rects in added.items():
                seen[mask] = len(self.windows)
                self.windows.append(rects)
                self._masks.append(mask)
            self.tiers.append(tier)
            earlier = pool
        self._terms = self._box_terms()

    # --- enumeration -------------------------------------------------------------------------

    def _tier_windows(self, tier: str) -> list[Rect]:
        ht, wt = self.height, self.width
        near_h, near_w = range(ht), range(wt)
        # wrapped half-widths that differ from every near window: r < n - r
        wrap_h = [r for r in range(1, ht) if r < ht - r]
        wrap_w = [r for r in range(1, wt) if r < wt - r]
        if tier == "near":
            return [Rect(h, w) for h in near_h for w in near_w]
        if tier == "wrapped":
            return [Rect(h, w, wrap=("h", "w")) for h in wrap_h for w in wrap_w]
        if tier == "half-wrapped":
            return [Rect(h, w, wrap=("h",)) for h in wrap_h for w in near_w] + [
                Rect(h, w, wrap=("w",)) for h in near_h for w in wrap_w
            ]
        spans_h = [(a, b) for a in range(ht) for b in range(a, ht)]
        spans_w = [(a, b) for a in range(wt) for b in range(a, wt)]
        return [
            Rect(hb, wb, ha, wa) for ha, hb in spans_h for wa, wb in spans_w if ha > 0 or wa > 0
        ]

    def _near_options(self, near: list[tuple[Rect, int]]) -> dict[int, tuple[Rect, ...]]:
        """Near singles at 1 + h * Wt + w (the greedy baseline's indices), then the crossing
        pairs (h1 < h2, w1 > w2); any other pair of near windows is one inside the other."""
        ht, wt = self.height, self.width
        out = {mask: (rect,) for rect, mask in near}
        for h1 in range(ht):
            for h2 in range(h1 + 1, ht):
                for w2 in range(wt):
                    for w1 in range(w2 + 1, wt):
                        pair = (Rect(h1, w1), Rect(h2, w2))
                        out[self._mask(pair[0]) | self._mask(pair[1])] = pair
        return out

    def _mask(self, rect: Rect) -> int:
        """The window's kept (|dh|, |dw|) offsets as bits h * Wt + w."""
        wt = self.width

        def axis_bits(start: int, end: int, wrap: bool, n: int) -> list[int]:
            return [d for d in range(n) if start <= (min(d, n - d) if wrap else d) <= end]

        w_row = sum(1 << w for w in axis_bits(rect.w_from, rect.width, "w" in rect.wrap, wt))
        rows = axis_bits(rect.h_from, rect.height, "h" in rect.wrap, self.height)
        return sum(w_row << (h * wt) for h in rows)

    # --- values ------------------------------------------------------------------------------

    def _boxes(self, rect_mask: int) -> list[tuple[int, int, int, int]]:
        """A window's (or an intersection's) kept offsets as disjoint boxes (h0, h1, w0, w1).

        Windows and their intersections are products of an h-set and a w-set of distances, so
        the boxes are the products of the two sets' runs.
        """
        ht, wt = self.height, self.width
        rows = [(rect_mask >> (h * wt)) & ((1 << wt) - 1) for h in range(ht)]
        h_set = sum(1 << h for h in range(ht) if rows[h])
        w_set = next((r for r in rows if r), 0)
        return [(a, b, c, d) for a, b in _runs(h_set, ht) for c, d in _runs(w_set, wt)]

    def _box_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """(index [O, T], sign [O, T]) into the flat prefix sums; padding points at the zero."""
        wt, zero = self.width, self.none

        def corner(h: int, w: int) -> int:
            return zero if h < 0 or w < 0 else h * wt + w

        def box_terms(box, sign) -> list[tuple[int, int]]:
            a, b, c, d = box
            return [
                (corner(b, d), sign),
                (corner(a - 1, d), -sign),
                (corner(b, c - 1), -sign),
                (corner(a - 1, c - 1), sign),
            ]

        per_option = []
        for rects in self.windows:
            masks = [self._mask(r) for r in rects]
            terms = []
            for m in masks:
                terms += [t for box in self._boxes(m) for t in box_terms(box, 1)]
            if len(masks) == 2 and masks[0] & masks[1]:
                terms += [t for box in self._boxes(masks[0] & masks[1]) for t in box_terms(box, -1)]
            merged: dict[int, int] = {}
            for index, sign in terms:
                if index != zero:
                    merged[index] = merged.get(index, 0) + sign
            per_option.append([(i, v) for i, v in merged.items() if v])
        width = max(1, max(len(t) for t in per_option))
        index = np.full((len(per_option), width), zero, dtype=np.int64)
        sign = np.zeros((len(per_option), width))
        for o, terms in enumerate(per_option):
            for t, (i, v) in enumerate(terms):
                index[o, t], sign[o, t] = i, v
        return index, sign

    @classmethod
    @functools.lru_cache(maxsize=32)
    def of(cls, height: int, width: int, max_options: int = DEFAULT_MAX_OPTIONS) -> WindowOptions:
        """Shared instances: building the option set costs up to a second on large grids."""
        return cls(height, width, max_options)

    @property
    def none(self) -> int:
        """The flat index of the zero entry of a group's rect sums."""
        return self.height * self.width

    @property
    def count(self) -> int:
        return len(self.windows)

    def values(self, rect_sums: np.ndarray) -> np.ndarray:
        """Rect sums [..., G, Ht*Wt + 1] -> option values [..., G, O]."""
        index, sign = self._terms
        out = np.zeros((*rect_sums.shape[:-1], len(index)))
        # one gather per term column: options with fewer terms point at the zero entry there
        for t in range(index.shape[1]):
            column = sign[:, t]
            live = np.nonzero(column)[0]
            if len(live) == len(column):
                out += rect_sums[..., index[:, t]] * column
            elif len(live):
                out[..., live] += rect_sums[..., index[live, t]] * column[live]
        return out
