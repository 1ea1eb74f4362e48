"""The search report: per-head table (CSV, Markdown), Pareto plot, layers x heads map, summary,
and a head gallery (what every head's attention looks like by tile offset, beside what it kept).

Patterns are named by what they keep (`pattern_name`, docs/search.md "Reading the report").
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich import box
from rich.table import Table

from compact_search.geometry import Grid, TileShape
from compact_search.patterns import FrameGroup, HeadPattern
from compact_search.search.offsets import recall_tables
from compact_search.search.result import SearchResult

KIND_COLOURS = {
    "dense": "#4d4d4d",
    "global": "#1f77b4",
    "temporal": "#17becf",
    "local": "#2ca02c",
    "cross": "#ff7f0e",
    "far": "#d62728",
    "empty": "#e0e0e0",
}
# Names of several parts ("global>local", "none>local") take these, in order of appearance.
COMPOUND_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78")
MAX_TICKS = 20  # integer axes longer than this label every k-th row or column


def group_keeps(group: FrameGroup, tile_grid: Grid) -> str:
    """What one frame group keeps: none, global (a window covers the frame), far (a band or a
    wrapped window), cross (two windows around the query tile) or local (one)."""
    if not group.rects:
        return "none"
    if any(r.covers(tile_grid) for r in group.rects):
        return "global"
    if any(not r.is_near for r in group.rects):
        return "far"
    return "cross" if len(group.rects) == 2 else "local"


def pattern_name(pattern: HeadPattern, tile_grid: Grid | tuple[int, int, int]) -> str:
    """The pattern named by what it keeps, from near to far frame distance.

    dense; empty (nothing kept); global (whole frames at every frame distance); temporal (whole
    frames, the near frame distances only); local, cross, far (the same kind of window at every
    kept frame distance); else the groups' kinds from near to far, repeats merged, joined by
    '>' ("global>local": whole frames near in time, a window further; "none>local": nothing
    on the nearest frames, a window further). Groups past the tile grid's frames, and groups
    that keep nothing after the last one that keeps something, do not count.
    """
    tile_grid = Grid.of(tile_grid)
    if pattern.is_dense:
        return "dense"
    parts: list[tuple[str, int]] = []  # (what the group keeps, its stop)
    for group in pattern.groups:
        if group.start >= tile_grid.frames:
            continue
        keeps = group_keeps(group, tile_grid)
        if parts and parts[-1][0] == keeps:
            parts[-1] = (keeps, group.stop)
        else:
            parts.append((keeps, group.stop))
    while parts and parts[-1][0] == "none":
        parts.pop()
    if not parts:
        return "empty"
    if [keeps for keeps, _ in parts] == ["global"] and parts[0][1] < tile_grid.frames:
        return "temporal"
    return ">".join(keeps for keeps, _ in parts)


def kind_colours(names) -> dict[str, str]:
    """A colour per name: the fixed ones for single kinds, the compound palette for the rest."""
    compound = sorted({n for n in names if n not in KIND_COLOURS})
    colours = {n: KIND_COLOURS[n] for n in KIND_COLOURS if n in set(names)}
    for i, name in enumerate(compound):
        colours[name] = COMPOUND_COLOURS[i % len(COMPOUND_COLOURS)]
    return colours


def kept_offsets(pattern: HeadPattern, tile_grid: Grid | tuple[int, int, int]) -> torch.Tensor:
    """[Ft, Ht, Wt] bool: the tile offsets (|df|, |dh|, |dw|) the pattern keeps."""
    tile_grid = Grid.of(tile_grid)
    shape = tile_grid.as_tuple()
    if pattern.is_dense:
        return torch.ones(shape, dtype=torch.bool)
    kept = torch.zeros(shape, dtype=torch.bool)
    for group in pattern.groups:
        for rect in group.rects:
            kept[group.start : group.stop] |= rect.offset_mask(tile_grid)
    return kept


def offset_mass(tile_mass: torch.Tensor, tile_grid: Grid) -> np.ndarray:
    """Tile mass [S, H, nq, nk] -> [H, Ft, Ht, Wt]: each offset's share of the attention mass
    (mean over samples); a pattern's mean recall is the sum over the offsets it keeps."""
    return recall_tables(tile_mass, tile_grid).mean(axis=0)


def offset_strips(tables: np.ndarray) -> np.ndarray:
    """[H, Ft, Ht, Wt] -> [H * (Ht + 1) - 1, Ft * (Wt + 1) - 1]: head h in rows
    h * (Ht + 1) ..., frame distance |df| in columns |df| * (Wt + 1) ..., |dh| down and |dw|
    right inside; NaN between heads and between frame distances."""
    heads, ft, ht, wt = tables.shape
    out = np.full((heads, ht + 1, ft, wt + 1), np.nan)
    out[:, :ht, :, :wt] = tables.transpose(0, 2, 1, 3)  # [H, Ht, Ft, Wt]
    return out.reshape(heads * (ht + 1), ft * (wt + 1))[:-1, :-1]


def windows_text(pattern: HeadPattern) -> str:
    """'dense' or '[0,1):3x5+1x9 [1,4):2x2~ [4,7):-' (window = |dh| x |dw| half-extents, a
    band as from-to, '~' a wrapped axis: `Rect.text`)."""
    if pattern.groups is None:
        return "dense"
    parts = []
    for group in pattern.groups:
        rects = "+".join(r.text() for r in group.rects) or "-"
        parts.append(f"[{group.start},{group.stop}):{rects}")
    return " ".join(parts)


def heads_frame(result: SearchResult) -> pd.DataFrame:
    rows = []
    tile_grid = Grid(*result.tile_grid)
    for h in result.heads:
        rows.append(
            {
                "bucket": h.bucket,
                "layer": h.layer,
                "head": h.head,
                "kind": pattern_name(h.pattern, tile_grid),
                "groups": 0 if h.pattern.is_dense else len(h.pattern.groups),
                "windows": windows_text(h.pattern),
                "recall_min": h.recall_min,
                "recall_mean": h.recall_mean,
                "recall_worst_tile": h.recall_worst_tile,
                "density": h.density,
                "cost": h.cost,
                "greedy_cost": h.greedy_cost,
                "greedy_windows": windows_text(h.greedy_pattern),
            }
        )
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs tabulate; this does not)."""
    shown = frame.copy()
    for column in shown.select_dtypes("float").columns:
        shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.{digits}f}")
    lines = [
        "| " + " | ".join(shown.columns) + " |",
        "|" + "|".join("---" for _ in shown.columns) + "|",
    ]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def integer_ticks(count: int, labels) -> tuple[list[int], list[str]]:
    """Positions 0..count-1 (every k-th past MAX_TICKS) and their integer labels."""
    step = max(1, math.ceil(count / MAX_TICKS))
    positions = list(range(0, count, step))
    return positions, [str(int(labels[i])) for i in positions]


def kinds_figure(result: SearchResult, frame: pd.DataFrame):
    """Layers x heads coloured by pattern name, one panel per bucket; the axes carry the
    profiled layers' and the heads' numbers."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = kind_colours(set(frame["kind"]))
    names = list(colours)
    num_buckets = len(result.buckets)
    fig, axes = plt.subplots(1, num_buckets, figsize=(5 * num_buckets, 4.5), squeeze=False)
    for b, ax in enumerate(axes[0]):
        part = frame[frame["bucket"] == b]
        grid = part.pivot(index="layer", columns="head", values="kind").map(names.index)
        ax.imshow(
            grid.to_numpy(),
            cmap=ListedColormap(list(colours.values())),
            vmin=-0.5,
            vmax=len(names) - 0.5,
            aspect="auto",
            interpolation="nearest",
        )
        columns, rows = (
            integer_ticks(grid.shape[1], grid.columns),
            integer_ticks(grid.shape[0], grid.index),
        )
        ax.set_xticks(*columns)
        ax.set_yticks(*rows)
        bounds = result.buckets[b]
        ax.set(
            xlabel="head",
            ylabel="layer",
            title=f"bucket {b}: steps [{bounds.start}, {bounds.stop})",
        )
    fig.legend(
        handles=[Patch(color=colour, label=name) for name, colour in colours.items()],
        loc="lower center",
        ncol=min(len(colours), 6),
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def gallery_figure(result: SearchResult, bucket: int, layer: int, tables: np.ndarray):
    """One layer of one bucket: every head's attention mass by tile offset (left, log colour) and
    the offsets its pattern keeps (right, in its kind's colour), with recall and cost.

    tables: [H, Ft, Ht, Wt] the heads' `offset_mass`.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, LogNorm

    tile_grid = Grid(*result.tile_grid)
    ft, ht, wt = tile_grid.as_tuple()
    heads = [result.head(bucket, layer, h) for h in range(result.num_heads)]
    names = [pattern_name(h.pattern, tile_grid) for h in heads]
    colours = kind_colours(names)
    kept = np.stack([kept_offsets(h.pattern, tile_grid).numpy() for h in heads])
    # kept offsets as 1 + the index of the head's colour, dropped ones 0 (light grey)
    palette = list(colours)
    codes = kept * np.array([1 + palette.index(n) for n in names])[:, None, None, None]
    mass = offset_strips(tables)
    top = float(np.nanmax(mass))
    floor = top * 1e-4  # four decades of colour; less mass is drawn at the floor
    head_height = max(0.35, 0.08 * (ht + 1))
    panel_width = min(9.0, max(3.0, 0.08 * ft * (wt + 1)))
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(2 * panel_width + 5, 1.8 + head_height * result.num_heads),
        layout="constrained",
    )
    image = left.imshow(
        np.clip(mass, floor, top),
        norm=LogNorm(vmin=floor, vmax=top),
        cmap="viridis",
        aspect="auto",
        interpolation="nearest",
    )
    right.imshow(
        offset_strips(codes.astype(float)),
        cmap=ListedColormap(["#ebebeb", *colours.values()]),
        vmin=-0.5,
        vmax=len(palette) + 0.5,
        aspect="auto",
        interpolation="nearest",
    )
    frame_ticks = [f * (wt + 1) + (wt - 1) / 2 for f in range(ft)]
    head_ticks = [h * (ht + 1) + (ht - 1) / 2 for h in range(result.num_heads)]
    for ax, title in ((left, "attention mass by tile offset"), (right, "kept by the pattern")):
        ax.set_xticks(frame_ticks, [str(f) for f in range(ft)])
        ax.set_xlabel("frame distance |df|")
        ax.set_title(title)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    left.set_yticks(head_ticks, [f"head {h}" for h in range(result.num_heads)])
    right.yaxis.tick_right()
    right.set_yticks(
        head_ticks,
        [
            f"{name}  recall {h.recall_min:.3f}  cost {h.cost:.3f}"
            for name, h in zip(names, heads, strict=True)
        ],
        fontsize=8,
    )
    fig.colorbar(image, ax=left, location="right", shrink=0.8, label="share of mass")
    bounds = result.buckets[bucket]
    fig.suptitle(
        f"layer {layer}, bucket {bucket} (steps [{bounds.start}, {bounds.stop})), "
        f"tile grid {ft}x{ht}x{wt}; per head and |df| a block of tile offsets, |dh| down, "
        "|dw| right",
        fontsize=10,
    )
    return fig


def gallery_path(run_dir: Path, bucket: int, layer: int) -> Path:
    return run_dir / "gallery" / f"bucket{bucket}-layer{layer:03d}.png"


def write_gallery(result: SearchResult, run_dir: Path, source) -> list[Path]:
    """gallery/bucket{b}-layer{l}.png for every bucket and profiled layer, from the tile mass of
    the bucket's profiled steps in `source` (a profile: `sample_tile_mass`)."""
    import matplotlib.pyplot as plt

    tile_grid = Grid(*result.tile_grid)
    paths = []
    for layer in result.layers:
        for b, bounds in enumerate(result.buckets):
            mass = source.sample_tile_mass(layer, TileShape(*result.tile), list(bounds.steps))
            fig = gallery_figure(result, b, layer, offset_mass(mass, tile_grid))
            path = gallery_path(run_dir, b, layer)
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=90)
            plt.close(fig)
            paths.append(path)
    return paths


def write_report(result: SearchResult, run_dir: Path, source=None) -> dict[str, Path]:
    """heads.csv, heads.md, pareto.png, kinds.png in run_dir; with the searched profile as
    `source`, the head gallery too (gallery/, one PNG per bucket and layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    frame = heads_frame(result)
    paths = {
        "csv": run_dir / "heads.csv",
        "markdown": run_dir / "heads.md",
        "pareto": run_dir / "pareto.png",
        "kinds": run_dir / "kinds.png",
    }
    frame.to_csv(paths["csv"], index=False)
    paths["markdown"].write_text(summary_markdown(result) + "\n" + markdown_table(frame))

    colours = kind_colours(set(frame["kind"]))
    fig, ax = plt.subplots(figsize=(7, 5))
    fronts = [[(e.density, e.recall_min) for e in h.front] for h in result.heads if h.front]
    ax.add_collection(LineCollection(fronts, colors="0.75", linewidths=0.5, alpha=0.5))
    for kind, group in frame.groupby("kind"):
        ax.scatter(group["density"], group["recall_min"], s=8, label=kind, c=colours[kind])
    ax.axhline(result.recall, color="red", linewidth=0.8, linestyle="--", label="tau")
    ax.set(xlabel="density", ylabel="recall (worst sample)", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.set_title("Chosen patterns (dots) and per-head Pareto fronts (grey)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["pareto"], dpi=120)
    plt.close(fig)

    fig = kinds_figure(result, frame)
    fig.savefig(paths["kinds"], dpi=120)
    plt.close(fig)
    if source is not None:
        write_gallery(result, run_dir, source)
        paths["gallery"] = run_dir / "gallery"
    return paths


def bucket_summary(result: SearchResult) -> pd.DataFrame:
    frame = heads_frame(result)
    summary = frame.groupby("bucket").agg(
        heads=("head", "size"),
        density=("density", "mean"),
        cost=("cost", "mean"),
        greedy_cost=("greedy_cost", "mean"),
        recall_min=("recall_min", "min"),
    )
    summary["beats_greedy"] = (
        (frame["cost"] < frame["greedy_cost"] - 1e-12).groupby(frame["bucket"]).mean()
    )
    summary["steps"] = [f"[{b.start}, {b.stop})" for b in result.buckets]
    summary["tau"] = [result.bucket_recall(b) for b in range(len(result.buckets))]
    return summary.reset_index()


def summary_markdown(result: SearchResult) -> str:
    lines = [
        f"# Search report: {result.model}",
        "",
        f"- tile {'x'.join(map(str, result.tile))}, tile grid "
        f"{'x'.join(map(str, result.tile_grid))}, frame cuts {list(result.frame_cuts)}",
        f"- recall >= {result.recall} on "
        + ("the mean over samples" if result.mean_over_samples else "every sample"),
        f"- dense warm-up steps {result.dense_steps} of {result.num_steps}",
        f"- model attention cost over all steps {result.objective:.4f} (dense = 1)",
        f"- study {result.study['name']}: best trial {result.study['best_trial']} of "
        f"{result.study['trials_completed']}",
    ]
    if result.budget:
        lines.append(f"- budget: {result.budget}")
    return "\n".join(lines) + "\n\n" + markdown_table(bucket_summary(result)) + "\n"


def summary_table(result: SearchResult) -> Table:
    """The rich table the CLI prints: one row per bucket."""
    # Fits 80 columns: no vertical rules, headers that wrap between words.
    table = Table(
        title=(
            f"{result.model}: tile {'x'.join(map(str, result.tile))}, "
            f"dense steps {result.dense_steps}, cost {result.objective:.4f} of dense"
        ),
        box=box.SIMPLE_HEAD,
    )
    summary = bucket_summary(result)
    for column in (
        "bucket",
        "steps",
        "tau",
        "heads",
        "density",
        "cost",
        "greedy cost",
        "min recall",
        "beats greedy",
    ):
        table.add_column(column, justify="right")
    for row in summary.itertuples(index=False):
        table.add_row(
            str(row.bucket),
            row.steps,
            f"{row.tau:g}",
            str(row.heads),
            f"{row.density:.4f}",
            f"{row.cost:.4f}",
            f"{row.greedy_cost:.4f}",
            f"{row.recall_min:.4f}",
            f"{row.beats_greedy:.0%}",
        )
    return table
