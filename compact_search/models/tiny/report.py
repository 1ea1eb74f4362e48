"""Head-structure report: how much of its attention each head needs to keep, trained vs random.

For every self-attention head the report measures, on real sampling runs, the smallest density
(share of tile pairs kept) at which the head keeps a recall of at least ``recall`` when it keeps
its highest-mass tiles, whatever their shape. Recall is the mean over query tiles of the kept tile
mass (docs/tiny-model.md). Kept tiles are chosen by one global threshold over the head's tile-mass
matrix, taking pairs in decreasing order of A[i, j] until the recall is reached; for a mean-recall
target that is the smallest possible set (every pair costs the same and adds A[i, j] / nq).

A head's density is the mean over the profiled samples (prompt x captured step). A trained model
passes when the mean over heads is at most ``MAX_MEAN_DENSITY`` and the heads spread widely
(max - min at least ``MIN_DENSITY_SPREAD``); random weights attend almost uniformly and fail.

The tile mass itself is the profiler's (`compact_search.profiling.attention_tile_mass`); callers
pass it in as ``tile_mass_fn``, so the models never import the profiler that sits above them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Group
from rich.table import Table
from rich.text import Text

from compact_search.models.tiny.data import sample_scene_specs
from compact_search.models.tiny.pipeline import TinyVideoPipeline, build_models
from compact_search.models.wan import dense_attention, install_wan_attention

MAX_MEAN_DENSITY = 0.6
MIN_DENSITY_SPREAD = 0.3
DEFAULT_TILE = (1, 4, 4)
DEFAULT_CAPTURE_STEPS = (0, 5, 10, 15, 19)
# (q [B, H, N, D], k [B, H, N, D], grid, tile) -> tile mass [H, nq, nk] with rows summing to 1
TileMassFn = Callable[[torch.Tensor, torch.Tensor, tuple, tuple], torch.Tensor]


def min_density_for_recall(tile_mass: torch.Tensor, recall: float) -> torch.Tensor:
    """Smallest kept share of tile pairs with mean-over-rows kept mass >= ``recall``.

    ``tile_mass`` [..., nq, nk] with rows summing to 1 -> density [...].
    """
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    nq, nk = tile_mass.shape[-2:]
    contributions = tile_mass.flatten(-2).double() / nq  # [..., nq * nk]
    ordered = contributions.sort(dim=-1, descending=True).values
    # Pairs needed = 1 + number of prefixes still short of the target (tolerate rounding).
    short = (ordered.cumsum(dim=-1) < recall - 1e-9).sum(dim=-1)
    needed = (short + 1).clamp(max=nq * nk)
    return needed.float() / (nq * nk)


@dataclass(frozen=True)
class HeadStructureReport:
    """Per-head minimal densities ``densities`` [L, H] at ``recall`` for tile ``tile``."""

    label: str
    densities: torch.Tensor
    recall: float
    tile: tuple[int, int, int]
    num_samples: int

    @property
    def mean(self) -> float:
        return float(self.densities.mean())

    @property
    def spread(self) -> float:
        return float(self.densities.max() - self.densities.min())

    @property
    def passes(self) -> bool:
        return self.mean <= MAX_MEAN_DENSITY and self.spread >= MIN_DENSITY_SPREAD

    def summary(self) -> dict[str, float]:
        flat = self.densities.flatten()
        return {
            "min": float(flat.min()),
            "median": float(flat.median()),
            "max": float(flat.max()),
            "mean": self.mean,
            "spread": self.spread,
        }


def capture_tile_masses(
    pipeline: TinyVideoPipeline,
    prompts: list[str],
    *,
    tile_mass_fn: TileMassFn,
    tile: tuple[int, int, int] = DEFAULT_TILE,
    capture_steps: tuple[int, ...] = DEFAULT_CAPTURE_STEPS,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
) -> torch.Tensor:
    """Tile mass of every self-attention head during sampling: [S, L, H, nq, nk].

    S = len(prompts) x captured steps; the mass is taken on the prompt-conditioned half of the
    guidance batch, one prompt at a time.
    """
    current_step = [-1]
    captured: dict[tuple[int, int], torch.Tensor] = {}  # (step, layer) -> [B, H, nq, nk]
    batch = len(prompts)

    def record_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if current_step[0] in capture_steps:
            masses = [
                tile_mass_fn(q[i : i + 1].float(), k[i : i + 1].float(), pipeline.grid, tile)
                for i in range(batch)
            ]
            captured[(current_step[0], layer)] = torch.stack(masses)  # [B, H, nq, nk]
        return dense_attention(layer, q, k, v)

    def on_step(step: int, total: int) -> None:
        current_step[0] = step

    handle = install_wan_attention(pipeline.transformer, record_attention)
    try:
        pipeline(
            prompts,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            callback=on_step,
        )
    finally:
        handle.revert()
    steps = sorted({step for step, _ in captured})
    num_layers = len(pipeline.transformer.blocks)
    per_step = [
        torch.stack([captured[(step, layer)] for layer in range(num_layers)], dim=1)
        for step in steps
    ]  # each [B, L, H, nq, nk]
    return torch.cat(per_step, dim=0).cpu()


def head_structure_report(
    pipeline: TinyVideoPipeline,
    *,
    label: str,
    tile_mass_fn: TileMassFn,
    num_prompts: int = 4,
    recall: float = 0.9,
    tile: tuple[int, int, int] = DEFAULT_TILE,
    capture_steps: tuple[int, ...] = DEFAULT_CAPTURE_STEPS,
    num_steps: int = 20,
    seed: int = 0,
) -> HeadStructureReport:
    """Sample held-out prompts with ``pipeline`` and measure every head's minimal density."""
    specs = sample_scene_specs(num_prompts, torch.Generator().manual_seed(seed), split="held_out")
    masses = capture_tile_masses(
        pipeline,
        [s.prompt for s in specs],
        tile_mass_fn=tile_mass_fn,
        tile=tile,
        capture_steps=capture_steps,
        num_steps=num_steps,
        seed=seed,
    )  # [S, L, H, nq, nk]
    densities = min_density_for_recall(masses, recall).mean(dim=0)  # [L, H]
    return HeadStructureReport(label, densities, recall, tile, num_samples=masses.shape[0])


def random_weights_pipeline(pipeline: TinyVideoPipeline, seed: int = 0) -> TinyVideoPipeline:
    """The same architecture with freshly initialised (untrained) weights, on the same device."""
    torch.manual_seed(seed)
    transformer, text_encoder = build_models(pipeline.config)
    return TinyVideoPipeline(
        pipeline.config,
        transformer.to(pipeline.device),
        text_encoder.to(pipeline.device),
        pipeline.metadata,  # same sampling defaults
    )


def render_head_report(reports: list[HeadStructureReport]) -> Group:
    """Rich tables: summary per report, then the per-head densities of each."""
    summary = Table(title=f"Smallest density per head for recall >= {reports[0].recall:.2f}")
    for column in ("weights", "tile", "samples", "min", "median", "max", "mean", "verdict"):
        summary.add_column(column, justify="right" if column not in ("weights",) else "left")
    for report in reports:
        stats = report.summary()
        verdict = Text("pass", style="green") if report.passes else Text("fail", style="red")
        summary.add_row(
            report.label,
            "x".join(map(str, report.tile)),
            str(report.num_samples),
            *(f"{stats[key]:.3f}" for key in ("min", "median", "max", "mean")),
            verdict,
        )
    parts: list = [summary]
    for report in reports:
        table = Table(title=f"{report.label}: density per head (rows: layers)")
        table.add_column("layer", justify="right")
        for head in range(report.densities.shape[1]):
            table.add_column(f"h{head}", justify="right")
        for layer, row in enumerate(report.densities.tolist()):
            table.add_row(str(layer), *(f"{value:.2f}" for value in row))
        parts.append(table)
        parts.append(Text(density_histogram(report.densities)))
    return Group(*parts)


def density_histogram(densities: torch.Tensor, bins: int = 10) -> str:
    """Text histogram of head densities over [0, 1] in ``bins`` bins."""
    counts = torch.histc(densities.flatten().float(), bins=bins, min=0.0, max=1.0).int().tolist()
    lines = []
    for index, count in enumerate(counts):
        low, high = index / bins, (index + 1) / bins
        lines.append(f"{low:.1f}-{high:.1f} {'#' * count} {count}")
    return "\n".join(lines)
