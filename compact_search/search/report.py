"""The search report: per-head table (CSV, Markdown), Pareto plot, layers x heads map, summary."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich import box
from rich.table import Table

from compact_search.patterns import HeadPattern
from compact_search.search.result import SearchResult

KIND_COLOURS = {
    "dense": "#4d4d4d",
    "global": "#1f77b4",
    "local": "#2ca02c",
    "cross": "#ff7f0e",
    "far": "#d62728",
    "skip-near": "#9467bd",
    "mixed": "#8c564b",
    "empty": "#e0e0e0",
}


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
    for h in result.heads:
        rows.append(
            {
                "bucket": h.bucket,
                "layer": h.layer,
                "head": h.head,
                "kind": h.kind,
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


def write_report(result: SearchResult, run_dir: Path) -> dict[str, Path]:
    """heads.csv, heads.md, pareto.png, kinds.png in run_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    frame = heads_frame(result)
    paths = {
        "csv": run_dir / "heads.csv",
        "markdown": run_dir / "heads.md",
        "pareto": run_dir / "pareto.png",
        "kinds": run_dir / "kinds.png",
    }
    frame.to_csv(paths["csv"], index=False)
    paths["markdown"].write_text(summary_markdown(result) + "\n" + markdown_table(frame))

    fig, ax = plt.subplots(figsize=(7, 5))
    fronts = [[(e.density, e.recall_min) for e in h.front] for h in result.heads if h.front]
    ax.add_collection(LineCollection(fronts, colors="0.75", linewidths=0.5, alpha=0.5))
    for kind, group in frame.groupby("kind"):
        ax.scatter(
            group["density"], group["recall_min"], s=8, label=kind, c=KIND_COLOURS.get(kind, "k")
        )
    ax.axhline(result.recall, color="red", linewidth=0.8, linestyle="--", label="tau")
    ax.set(xlabel="density", ylabel="recall (worst sample)", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.set_title("Chosen patterns (dots) and per-head Pareto fronts (grey)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["pareto"], dpi=120)
    plt.close(fig)

    kinds = list(KIND_COLOURS)
    num_buckets = len(result.buckets)
    fig, axes = plt.subplots(1, num_buckets, figsize=(5 * num_buckets, 4.5), squeeze=False)
    for b, ax in enumerate(axes[0]):
        part = frame[frame["bucket"] == b]
        grid = part.pivot(index="layer", columns="head", values="kind").map(kinds.index)
        ax.imshow(
            grid.to_numpy(),
            cmap=ListedColormap(list(KIND_COLOURS.values())),
            vmin=-0.5,
            vmax=len(kinds) - 0.5,
            aspect="auto",
            interpolation="nearest",
        )
        bounds = result.buckets[b]
        ax.set(
            xlabel="head",
            ylabel="layer",
            title=f"bucket {b}: steps [{bounds.start}, {bounds.stop})",
        )
    present = [k for k in kinds if k in set(frame["kind"])]
    fig.legend(
        handles=[Patch(color=KIND_COLOURS[k], label=k) for k in present],
        loc="lower center",
        ncol=len(present),
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(paths["kinds"], dpi=120)
    plt.close(fig)
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
