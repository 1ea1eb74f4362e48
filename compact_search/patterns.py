"""The head pattern family, its tile masks, and the measures the search optimises.

A head pattern keeps key tile j for query tile i by their tile distance
(|df|, |dh|, |dw|) = |coords(i) - coords(j)|:

- frame groups split the temporal distance |df| into ranges [start, stop), starting at 0;
- inside a group the kept spatial offsets are the union of at most two windows. A window `Rect`
  keeps |dh| in [h_from, height] and |dw| in [w_from, width]: with both starts 0 it is the
  classic window around the query tile (`Rect(h, w)`); one rectangle is a local window, two
  complementary ones (wide-and-short plus tall-and-narrow) a cross, one covering the tile grid is
  global, none skips those frames (heads that peak at a frame distance skip the near ones). A
  start above 0 makes a *band*: keys at a distance, not the near ones (a ring around the query
  tile is two bands). An axis can also *wrap*: its distance is then measured around the tile
  grid, min(|d|, n - |d|) for n tiles on that axis, so a window of half-width r keeps the r
  nearest tiles and the r tiles at the opposite edge (heads that attend the far edge of the
  frame);
- temporal distances at or past the last group's stop are skipped;
- or the pattern is dense.

Border rule: windows *clip* at the grid border. A query tile near the border keeps fewer key
tiles than one in the middle; windows never shift inward. Clipping makes the kept set a pure
function of the offset (a wrapped distance is a function of |d| too), so a pattern's mean
recall is a sum over a table of offsets (the search uses that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from compact_search.errors import UserInputError
from compact_search.geometry import Grid

AXES = ("h", "w")


@dataclass(frozen=True)
class Rect:
    """Spatial window in tiles: |dh| in [h_from, height] and |dw| in [w_from, width].

    `wrap` names the axes ("h", "w") whose distance is measured around the tile grid,
    min(|d|, n - |d|). `Rect(h, w)` is the window {|dh| <= h, |dw| <= w} around the query tile.
    """

    height: int
    width: int
    h_from: int = 0
    w_from: int = 0
    wrap: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("height", "width", "h_from", "w_from"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserInputError(f"rect {name} must be an integer >= 0, got {value!r}")
        if self.h_from > self.height or self.w_from > self.width:
            raise UserInputError(
                f"rect starts must not pass their ends: |dh| in [{self.h_from}, {self.height}], "
                f"|dw| in [{self.w_from}, {self.width}]"
            )
        wrap = tuple(self.wrap) if not isinstance(self.wrap, str) else (self.wrap,)
        if any(axis not in AXES for axis in wrap):
            raise UserInputError(f"rect wrap names axes 'h' and 'w', got {list(wrap)!r}")
        object.__setattr__(self, "wrap", tuple(a for a in AXES if a in wrap))

    @property
    def is_near(self) -> bool:
        """The classic window around the query tile: no band start, no wrap."""
        return self.h_from == 0 and self.w_from == 0 and not self.wrap

    def axis_masks(self, tile_grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
        """([Ht], [Wt]) bool: which plain distances |dh| and |dw| the window keeps."""
        return (
            _span_mask(self.h_from, self.height, "h" in self.wrap, tile_grid.height),
            _span_mask(self.w_from, self.width, "w" in self.wrap, tile_grid.width),
        )

    def offset_mask(self, tile_grid: Grid) -> torch.Tensor:
        """[Ht, Wt] bool over (|dh|, |dw|)."""
        mask_h, mask_w = self.axis_masks(tile_grid)
        return mask_h[:, None] & mask_w[None, :]

    def covers(self, tile_grid: Grid) -> bool:
        return bool(self.offset_mask(tile_grid).all())

    def too_large_for(self, tile_grid: Grid) -> str | None:
        """Why the window reaches past the tile grid's largest distance, or None."""
        for axis, end, n in (
            ("h", self.height, tile_grid.height),
            ("w", self.width, tile_grid.width),
        ):
            largest = n // 2 if axis in self.wrap else n - 1
            if end > largest:
                how = "wrapped " if axis in self.wrap else ""
                return f"d{axis} end {end} exceeds the largest {how}tile distance {largest}"
        return None

    def scaled(self, ratio_h: float, ratio_w: float, tile_grid: Grid) -> Rect:
        """The window on a tile grid `ratio` times the size (ends round up, starts down, so the
        window never shrinks), clipped to `tile_grid`'s largest distances."""

        def span(start: int, end: int, ratio: float, wrapped: bool, n: int) -> tuple[int, int]:
            largest = n // 2 if wrapped else n - 1
            new_end = min(largest, max(0, math.ceil(end * ratio)))
            return min(new_end, math.floor(start * ratio)), new_end

        h_from, height = span(self.h_from, self.height, ratio_h, "h" in self.wrap, tile_grid.height)
        w_from, width = span(self.w_from, self.width, ratio_w, "w" in self.wrap, tile_grid.width)
        return Rect(height, width, h_from, w_from, self.wrap)

    def text(self) -> str:
        """'3x5' for Rect(3, 5); '1-3x0-5' for a band; '~' marks a wrapped axis ('1~x2')."""

        def span(start: int, end: int, axis: str) -> str:
            body = str(end) if start == 0 else f"{start}-{end}"
            return body + ("~" if axis in self.wrap else "")

        return f"{span(self.h_from, self.height, 'h')}x{span(self.w_from, self.width, 'w')}"

    def to_json(self) -> list[int] | dict[str, Any]:
        if self.is_near:
            return [self.height, self.width]
        out: dict[str, Any] = {"dh": [self.h_from, self.height], "dw": [self.w_from, self.width]}
        if self.wrap:
            out["wrap"] = list(self.wrap)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Rect:
        """[h, w] or {"dh": [from, to], "dw": [from, to], "wrap": ["h", "w"]} (wrap optional)."""
        if isinstance(obj, dict):
            unknown = set(obj) - {"dh", "dw", "wrap"}
            if unknown:
                raise UserInputError(
                    f"unknown window field(s) {sorted(unknown)} (expected 'dh', 'dw', 'wrap')"
                )
            try:
                h_from, height = obj["dh"]
                w_from, width = obj["dw"]
            except (KeyError, TypeError, ValueError) as exc:
                raise UserInputError(
                    "a band window looks like {'dh': [from, to], 'dw': [from, to]}"
                ) from exc
            wrap = obj.get("wrap", [])
            if not isinstance(wrap, list):
                raise UserInputError(f"window wrap must be a list like ['w'], got {wrap!r}")
            return cls(
                int_exact(height),
                int_exact(width),
                int_exact(h_from),
                int_exact(w_from),
                tuple(wrap),
            )
        height, width = obj
        return cls(int_exact(height), int_exact(width))


def _span_mask(start: int, end: int, wrap: bool, n: int) -> torch.Tensor:
    """[n] bool over plain distances 0..n-1: start <= distance <= end (wrapped or not)."""
    d = torch.arange(n)
    distance = torch.minimum(d, n - d) if wrap else d
    return (distance >= start) & (distance <= end)


@dataclass(frozen=True)
class FrameGroup:
    """Temporal tile distances start <= |df| < stop and the windows kept there (0, 1 or 2)."""

    start: int
    stop: int
    rects: tuple[Rect, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rects", tuple(self.rects))
        if not (isinstance(self.start, int) and isinstance(self.stop, int)):
            raise UserInputError(f"frame group bounds must be integers, got {self.start!r}")
        if self.start < 0 or self.stop <= self.start:
            raise UserInputError(
                f"frame group needs 0 <= start < stop, got [{self.start}, {self.stop})"
            )
        if len(self.rects) > 2:
            raise UserInputError(f"a frame group holds at most 2 rects, got {len(self.rects)}")


@dataclass(frozen=True)
class HeadPattern:
    """One head's sparse pattern; `groups is None` means dense."""

    groups: tuple[FrameGroup, ...] | None

    def __post_init__(self) -> None:
        if self.groups is None:
            return
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups:
            raise UserInputError("a structured pattern needs at least one frame group")
        expected = 0
        for group in self.groups:
            if group.start != expected:
                raise UserInputError(
                    f"frame groups must be contiguous from 0: expected start {expected}, "
                    f"got [{group.start}, {group.stop})"
                )
            expected = group.stop

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def dense(cls) -> HeadPattern:
        return cls(None)

    @classmethod
    def local(cls, frames: int, height: int, width: int) -> HeadPattern:
        """Keys within |df| <= frames, |dh| <= height, |dw| <= width."""
        return cls((FrameGroup(0, frames + 1, (Rect(height, width),)),))

    @classmethod
    def cross(cls, frames: int, arm: int, tile_grid: Grid) -> HeadPattern:
        """Full rows and columns of half-width `arm` through the query tile, |df| <= frames."""
        wide = Rect(arm, tile_grid.width - 1)
        tall = Rect(tile_grid.height - 1, arm)
        return cls((FrameGroup(0, frames + 1, (wide, tall)),))

    @classmethod
    def global_(cls, tile_grid: Grid, frames: int | None = None) -> HeadPattern:
        """Every spatial tile, |df| <= frames (all frames when None)."""
        stop = tile_grid.frames if frames is None else frames + 1
        return cls((FrameGroup(0, stop, (Rect(tile_grid.height - 1, tile_grid.width - 1),)),))

    # --- queries -----------------------------------------------------------------------------

    @property
    def is_dense(self) -> bool:
        return self.groups is None

    def kind(self, tile_grid: Grid) -> str:
        """A short label for reports: dense, global, local, cross, far (bands or wrapped windows),
        skip-near, or mixed."""
        if self.groups is None:
            return "dense"
        kinds = []
        for group in self.groups:
            if group.start >= tile_grid.frames:
                continue
            if not group.rects:
                kinds.append("none")
            elif any(r.covers(tile_grid) for r in group.rects):
                kinds.append("global")
            elif any(not r.is_near for r in group.rects):
                kinds.append("far")
            elif len(group.rects) == 2:
                kinds.append("cross")
            else:
                kinds.append("local")
        if not kinds or all(k == "none" for k in kinds):
            return "empty"
        if kinds[0] == "none":
            return "skip-near"
        live = {k for k in kinds if k != "none"}
        return live.pop() if len(live) == 1 else "mixed"

    def tile_mask(self, tile_grid: Grid | tuple[int, int, int]) -> torch.Tensor:
        """[nt, nt] bool, query tiles by key tiles, tiles frame-major over `tile_grid`."""
        tg = Grid.of(tile_grid)
        nt = tg.num_tokens
        if self.groups is None:
            return torch.ones((nt, nt), dtype=torch.bool)
        ft, ht, wt = tg.as_tuple()
        n_groups = len(self.groups)
        # Allowed (|dh|, |dw|) per group; row n_groups stays empty for skipped distances.
        allowed = torch.zeros((n_groups + 1, ht, wt), dtype=torch.bool)
        group_of_df = torch.full((ft,), n_groups, dtype=torch.int64)
        for g, group in enumerate(self.groups):
            for rect in group.rects:
                allowed[g] |= rect.offset_mask(tg)
            group_of_df[group.start : min(group.stop, ft)] = g

        def distance(n: int) -> torch.Tensor:
            idx = torch.arange(n)
            return (idx[:, None] - idx[None, :]).abs()

        # [G+1, Ht*Wt, Ht*Wt]: the spatial mask of every group between query and key positions
        dist_h, dist_w = distance(ht), distance(wt)
        spatial = allowed[:, dist_h[:, None, :, None], dist_w[None, :, None, :]]
        spatial = spatial.reshape(n_groups + 1, ht * wt, ht * wt)
        per_frame_pair = spatial[group_of_df[distance(ft)]]  # [Ft, Ft, HW, HW]
        return per_frame_pair.permute(0, 2, 1, 3).reshape(nt, nt)

    def validate_for(self, tile_grid: Grid, where: str = "pattern") -> None:
        """Raise UserInputError if a window reaches past the tile grid (oversize windows)."""
        if self.groups is None:
            return
        for g, group in enumerate(self.groups):
            if group.stop > tile_grid.frames:
                raise UserInputError(
                    f"{where}: group {g} stop {group.stop} exceeds tile grid frames "
                    f"{tile_grid.frames}"
                )
            for rect in group.rects:
                problem = rect.too_large_for(tile_grid)
                if problem is not None:
                    raise UserInputError(f"{where}: group {g} rect {rect.text()}: {problem}")

    @property
    def uses_far_windows(self) -> bool:
        """Any band or wrapped window (config version 2 describes those)."""
        return self.groups is not None and any(not r.is_near for g in self.groups for r in g.rects)

    # --- serialisation -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        if self.groups is None:
            return {"kind": "dense"}
        return {
            "kind": "structured",
            "groups": [
                {"frames": [g.start, g.stop], "rects": [r.to_json() for r in g.rects]}
                for g in self.groups
            ],
        }

    @classmethod
    def from_json(cls, obj: Any) -> HeadPattern:
        """Parse `to_json` output; raises UserInputError saying what is wrong."""
        if not isinstance(obj, dict):
            raise UserInputError(f"expected an object with 'kind', got {type(obj).__name__}")
        kind = obj.get("kind")
        if kind == "dense":
            return cls.dense()
        if kind != "structured":
            raise UserInputError(
                f"unknown pattern kind {kind!r} (expected 'dense' or 'structured')"
            )
        groups = obj.get("groups")
        if not isinstance(groups, list):
            raise UserInputError("structured pattern needs a list 'groups'")
        parsed = []
        for i, group in enumerate(groups):
            try:
                start, stop = group["frames"]
                rects = tuple(Rect.from_json(r) for r in group["rects"])
            except UserInputError:
                raise
            except (KeyError, TypeError, ValueError) as exc:
                raise UserInputError(
                    f"group {i} must look like {{'frames': [start, stop], 'rects': [[h, w], ...]}} "
                    "(a band window: {'dh': [from, to], 'dw': [from, to]})"
                ) from exc
            parsed.append(FrameGroup(int_exact(start), int_exact(stop), rects))
        return cls(tuple(parsed))


def int_exact(value: Any) -> int:
    """An int from JSON; rejects floats like 1.5 and booleans."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


# --- measures --------------------------------------------------------------------------------


def density(tile_mask: torch.Tensor) -> torch.Tensor:
    """Kept share of tile pairs, per leading index of tile_mask [..., nq, nk]."""
    return tile_mask.float().mean(dim=(-2, -1))


@dataclass(frozen=True)
class Recall:
    mean: torch.Tensor  # [...] mean over query tiles of the kept mass
    worst: torch.Tensor  # [...] the smallest kept mass of any query tile


def recall(tile_mask: torch.Tensor, tile_mass: torch.Tensor) -> Recall:
    """Kept attention mass of tile_mask [nq, nk] under tile_mass [..., nq, nk] (rows sum to 1)."""
    kept = (tile_mass * tile_mask.to(tile_mass.dtype)).sum(dim=-1)  # [..., nq]
    return Recall(mean=kept.mean(dim=-1), worst=kept.min(dim=-1).values)
