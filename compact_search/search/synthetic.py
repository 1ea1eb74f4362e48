"""Synthetic tile masses with planted heads, for tests and the search benchmark.

A planted head puts a share `inside` of every query tile's mass on the key tiles of a planted
pattern (falling off with tile distance inside it) and spreads the rest over all other key tiles;
every sample multiplies the masses by log-normal noise and renormalises. The planted pattern's
recall on every sample is exactly `inside`, so a search at tau <= inside must find a pattern that
costs no more than the planted one.

`SyntheticProfile` offers the profile interface the search reads (`sample_tile_mass` and the
metadata), with a different planted kind per head and diffuse early denoising steps. The classic
kinds (`PLANTED_KINDS`) are what the paper's family describes; `FAR_KINDS` attend at a spatial
distance: a local window plus the opposite edge of the frame, and a ring around the query tile
(two bands, the near tiles left out).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import torch

from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape, tile_coordinates, tile_grid_of
from compact_search.patterns import FrameGroup, HeadPattern, Rect

PLANTED_KINDS = ("local", "cross", "global", "decaying", "peaking")
FAR_KINDS = ("far-edge", "ring")


def planted_pattern(kind: str, tile_grid: Grid, scale: float = 1.0) -> HeadPattern:
    """A pattern of the named kind sized for the tile grid; `scale` widens its windows.

    Needs at least 4 tile frames and 3 tiles in height and width.
    """
    ft, ht, wt = tile_grid.as_tuple()
    if ft < 4 or ht < 3 or wt < 3:
        raise UserInputError(
            f"planted patterns need a tile grid of at least 4x3x3, got {tile_grid}"
        )

    def size(fraction: float, limit: int) -> int:
        return max(0, min(limit - 1, round(fraction * scale * limit)))

    if kind == "local":
        return HeadPattern.local(size(0.15, ft), size(0.2, ht), size(0.2, wt))
    if kind == "cross":
        return HeadPattern.cross(size(0.15, ft), size(0.05, min(ht, wt)), tile_grid)
    if kind == "global":
        return HeadPattern.global_(tile_grid, frames=size(0.05, ft))
    if kind == "decaying":
        near, mid = max(1, size(0.1, ft)), max(2, size(0.3, ft))
        return HeadPattern(
            (
                FrameGroup(0, near, (Rect(size(0.35, ht), size(0.35, wt)),)),
                FrameGroup(near, mid, (Rect(size(0.15, ht), size(0.15, wt)),)),
                FrameGroup(mid, ft, (Rect(0, 0),)),
            )
        )
    if kind == "far-edge":
        near_h, near_w = size(0.1, ht), size(0.1, wt)
        edge = wt - 1 - size(0.05, wt)  # the last tile columns, as far as the grid reaches
        frames = size(0.15, ft)
        local, far = Rect(near_h, near_w), Rect(near_h, wt - 1, 0, max(near_w + 1, edge))
        return HeadPattern((FrameGroup(0, frames + 1, (local, far)),))
    if kind == "ring":
        outer = max(2, size(0.75, min(ht, wt)))
        inner = max(1, round(0.6 * outer))  # |dh| and |dw| both below it are left out
        frames = size(0.15, ft)
        rows, columns = Rect(outer, outer, inner, 0), Rect(outer, outer, 0, inner)
        return HeadPattern((FrameGroup(0, frames + 1, (rows, columns)),))
    if kind == "peaking":
        gap = max(1, size(0.3, ft))
        return HeadPattern(
            (
                FrameGroup(0, gap),
                FrameGroup(gap, min(ft, gap + 2), (Rect(size(0.2, ht), size(0.2, wt)),)),
            )
        )
    raise UserInputError(
        f"unknown planted kind {kind!r}; expected one of {PLANTED_KINDS + FAR_KINDS}"
    )


def planted_tile_mass(
    patterns: list[HeadPattern],
    tile_grid: Grid,
    inside: torch.Tensor,
    *,
    decay: float = 0.4,
    noise: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Tile masses [S, H, nq, nk] fp32 for H planted patterns; inside [S] (or [S, H]) is each
    sample's share of mass on the planted keys. Rows sum to 1."""
    weights, outside = _planted_weights(tuple(patterns), tile_grid, decay)  # [H, nq, nk] each
    num_samples = inside.shape[0]
    share = inside.reshape(num_samples, -1, 1, 1).float()  # [S, H or 1, 1, 1]
    jitter = torch.exp(noise * torch.randn((num_samples, *weights.shape), generator=generator))
    planted = weights * jitter  # [S, H, nq, nk]
    rest = outside * jitter
    planted_rows = planted.sum(-1, keepdim=True)
    rest_rows = rest.sum(-1, keepdim=True).clamp_min(1e-30)
    # A query tile with no planted key (possible at the grid border) spreads everything.
    has_planted = planted_rows > 0
    planted_share = torch.where(has_planted, share, 0.0)
    out = planted / planted_rows.clamp_min(1e-30) * planted_share
    out += rest / rest_rows * (1 - planted_share)
    return out


# A profile reads every (layer, tile) once per captured step: keep the last few weight sets.
@functools.lru_cache(maxsize=8)
def _planted_weights(
    patterns: tuple[HeadPattern, ...], tile_grid: Grid, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask x distance falloff, 1 - mask), each [H, nq, nk] fp32."""
    masks = torch.stack([p.tile_mask(tile_grid) for p in patterns]).float()  # [H, nq, nk]
    coords = tile_coordinates(tile_grid).float()  # [nt, 3]
    distance = (coords[:, None, :] - coords[None, :, :]).abs().sum(-1)  # [nq, nk]
    falloff = torch.exp(-decay * distance)  # [nq, nk]
    return masks * falloff, 1 - masks


def _seed_of(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class SyntheticProfile:
    """A profile-shaped source of planted tile masses (the search reads only this interface).

    Every (layer, head) gets a planted kind and window scale; steps before `diffuse_until` x
    num_steps spread more mass outside the planted pattern (early denoising is less structured).
    """

    grid: Grid
    tiles: tuple[TileShape, ...]
    num_layers: int
    num_heads: int
    num_steps: int
    steps: tuple[int, ...]
    num_prompts: int = 2
    prefix_tokens: int = 0
    head_dim: int = 128
    inside: float = 0.95
    diffuse_until: float = 0.3
    noise: float = 0.3
    seed: int = 0
    model: str = "synthetic"
    adapter: str = "wan"  # what an exported config names (export reads it)
    prompts: tuple[str, ...] = field(default=())
    kinds: tuple[str, ...] = PLANTED_KINDS  # drawn per head

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", Grid.of(self.grid))
        object.__setattr__(self, "tiles", tuple(TileShape.of(t) for t in self.tiles))
        object.__setattr__(self, "steps", tuple(sorted(self.steps)))
        if not self.tiles:
            raise UserInputError("a synthetic profile needs at least one tile shape")
        if not self.steps or self.steps[0] < 0 or self.steps[-1] >= self.num_steps:
            raise UserInputError(f"captured steps must lie in [0, {self.num_steps})")
        object.__setattr__(self, "kinds", tuple(self.kinds))
        unknown = [k for k in self.kinds if k not in PLANTED_KINDS + FAR_KINDS]
        if not self.kinds or unknown:
            raise UserInputError(
                f"planted kinds must come from {PLANTED_KINDS + FAR_KINDS}, got {self.kinds}"
            )
        if not self.prompts:
            prompts = tuple(f"synthetic prompt {i}" for i in range(self.num_prompts))
            object.__setattr__(self, "prompts", prompts)

    @property
    def fingerprint(self) -> str:
        parts = (self.grid, self.tiles, self.num_layers, self.seed)
        if self.kinds != PLANTED_KINDS:
            parts = (*parts, self.kinds)
        return f"synthetic-{_seed_of(*parts):016x}"

    @cached_property
    def head_kinds(self) -> list[list[tuple[str, float]]]:
        """[layer][head] -> (planted kind, window scale)."""
        gen = torch.Generator().manual_seed(self.seed)
        kinds = torch.randint(len(self.kinds), (self.num_layers, self.num_heads), generator=gen)
        scales = 0.6 + 0.8 * torch.rand((self.num_layers, self.num_heads), generator=gen)
        return [
            [(self.kinds[int(k)], float(s)) for k, s in zip(row_k, row_s, strict=True)]
            for row_k, row_s in zip(kinds, scales, strict=True)
        ]

    def _inside_share(self, step: int) -> float:
        """Early steps are diffuse: up to a third of the mass leaves the planted pattern."""
        progress = step / max(1.0, self.diffuse_until * self.num_steps)
        return self.inside - (1 / 3) * max(0.0, 1.0 - progress)

    def sample_tile_mass(
        self, layer: int, tile: TileShape | None = None, steps: list[int] | None = None
    ) -> torch.Tensor:
        """[S, H, nq, nk] fp32, samples step-major (step x prompt), as a per-prompt profile."""
        tile = self.tiles[0] if tile is None else TileShape.of(tile)
        steps = list(self.steps if steps is None else steps)
        tile_grid = tile_grid_of(self.grid, tile)
        patterns = [planted_pattern(k, tile_grid, s) for k, s in self.head_kinds[layer]]
        per_step = []
        for step in steps:  # seeded per step: any selection of steps sees the same samples
            inside = torch.full((len(self.prompts),), self._inside_share(step))
            gen = torch.Generator().manual_seed(_seed_of(self.seed, layer, tile, step))
            per_step.append(
                planted_tile_mass(patterns, tile_grid, inside, noise=self.noise, generator=gen)
            )
        return torch.cat(per_step)

    def tile_mass(
        self,
        layer: int,
        head: int,
        step: int | None = None,
        prompt: int | None = None,
        tile: TileShape | None = None,
    ) -> torch.Tensor:
        """[nq, nk]: one head's tile mass, averaged over prompts/steps left as None."""
        steps = None if step is None else [step]
        mass = self.sample_tile_mass(layer, tile, steps)[:, head]  # [P * T, nq, nk]
        mass = mass.reshape(-1, len(self.prompts), *mass.shape[-2:])  # [T, P, nq, nk]
        mass = mass.mean(1) if prompt is None else mass[:, prompt]
        return mass.mean(0)
