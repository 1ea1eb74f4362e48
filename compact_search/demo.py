"""`compact-search demo`: the longest real pipeline that runs on a fresh CPU machine.

Today: build a config by hand for a sample geometry, validate it through a save/load round trip,
run block-sparse reference attention with its masks next to dense attention, and summarise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compact_search.config import (
    GeometrySpec,
    ModelSpec,
    StepSchedule,
    load_config,
    save_config,
    uniform_config,
)
from compact_search.geometry import Grid, TileShape
from compact_search.patterns import FrameGroup, HeadPattern, Rect, density
from compact_search.runtime.attention import sparse_attention


@dataclass(frozen=True)
class HeadResult:
    head: int
    kind: str
    density: float
    cost: float
    relative_error: float


@dataclass(frozen=True)
class DemoResult:
    config_path: Path
    layout: dict[str, object]
    heads: list[HeadResult]
    sparse_seconds: float
    dense_seconds: float


def sample_patterns(tile_grid: Grid) -> list[HeadPattern]:
    """One head of each kind the family expresses."""
    return [
        HeadPattern.local(1, 1, 1),
        HeadPattern.cross(1, 0, tile_grid),
        HeadPattern.global_(tile_grid, frames=0),
        HeadPattern((FrameGroup(0, 2), FrameGroup(2, tile_grid.frames, (Rect(1, 1),)))),
    ]


def run_foundation_demo(out_dir: Path, seed: int = 0) -> DemoResult:
    """Hand-built config for an 8x16x16 grid, 4 heads; sparse vs dense reference attention."""
    geometry = GeometrySpec(Grid(8, 16, 16), TileShape(2, 4, 8), block_size=64)
    layout = geometry.layout()
    patterns = sample_patterns(layout.tile_grid)
    model = ModelSpec("sample", "wan", num_layers=1, num_heads=len(patterns), head_dim=64)
    schedule = StepSchedule(num_steps=20, dense_steps=6, bucket_starts=(6,))
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "sample-config.json"
    save_config(uniform_config(model, geometry, schedule, patterns), config_path)
    config = load_config(config_path)  # validated round trip

    gen = torch.Generator().manual_seed(seed)
    # Queries and keys with spatial structure: tokens near each other in (f, h, w) correlate.
    f, h, w = torch.meshgrid(
        *(torch.arange(s, dtype=torch.float32) for s in (8, 16, 16)), indexing="ij"
    )
    position = torch.stack([f, h, w], dim=-1).reshape(1, 1, -1, 3)  # [1, 1, N, 3]
    freqs = torch.randn(model.num_heads, 3, 32, generator=gen) * 0.4
    phase = position @ freqs  # [1, H, N, 32]
    q = torch.cat([phase.cos(), phase.sin()], dim=-1) * 3
    k = q + 0.3 * torch.randn(q.shape, generator=gen)
    v = torch.randn(q.shape, generator=gen)

    q_s, k_s, v_s = (layout.to_slots(t) for t in (q, k, v))
    block_mask = config.block_masks(0, 0)
    start = time.perf_counter()
    sparse = layout.from_slots(
        sparse_attention(
            q_s,
            k_s,
            v_s,
            block_mask,
            block_size=layout.block_size,
            key_block_lengths=layout.key_block_lengths(),
        )
    )
    sparse_seconds = time.perf_counter() - start
    start = time.perf_counter()
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    dense_seconds = time.perf_counter() - start

    tile_masks = config.tile_masks(0, 0)
    heads = []
    for head, pattern in enumerate(patterns):
        err = (sparse[0, head] - dense[0, head]).norm() / dense[0, head].norm()
        heads.append(
            HeadResult(
                head=head,
                kind=pattern.kind(layout.tile_grid),
                density=float(density(tile_masks[head])),
                cost=float(layout.cost(tile_masks[head])),
                relative_error=float(err),
            )
        )
    return DemoResult(config_path, layout.describe(), heads, sparse_seconds, dense_seconds)
