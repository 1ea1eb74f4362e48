"""`compact-search optimize` as one library call: study, final solve, budget, result, report.

A profile of several experts (Wan2.2) is searched one expert at a time, each on the captured
steps it runs (`Capture.expert_view`), with its own tile shape, frame groups, warm-up and step
buckets (no more buckets than it has captured steps): the first expert's result goes to
RUN_DIR, every other expert's to RUN_DIR/expert-<name>, and the first's `study["experts"]` names
those folders for `export`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from compact_search.errors import UserInputError
from compact_search.geometry import Grid
from compact_search.io import ensure_folder
from compact_search.search.budget import BudgetTarget, allocate
from compact_search.search.result import (
    RESULT_FILE,
    BucketBounds,
    FrontEntry,
    HeadResult,
    SearchResult,
)
from compact_search.search.shards import TileMassSource, open_source, profiled_layers
from compact_search.search.storage import DEFAULT_HEARTBEAT
from compact_search.search.study import SearchConfig, StudyOutcome, run_study


def optimize_profile(
    profile: TileMassSource | str | Path,
    run_dir: str | Path,
    config: SearchConfig,
    *,
    storage: str | None = None,
    target: BudgetTarget | None = None,
    on_trial=None,
    heartbeat: int = DEFAULT_HEARTBEAT,
    on_stage=None,
) -> SearchResult:
    """Search the profile, write RUN_DIR/search.json and the report files, return the result.

    With a database server `storage` other processes may join the study (`join_study`); the
    result uses every finished trial, whoever ran it.
    """
    from compact_search.search.report import write_report

    run_dir = Path(run_dir)
    try:
        source = open_source(profile)
    except UserInputError:
        source = None  # run_study says what is wrong with it, after checking the storage
    experts = list(getattr(source, "experts", None) or [])
    if len(experts) > 1 and getattr(source, "expert", None) is None:
        options = {"storage": storage, "target": target, "on_trial": on_trial, "on_stage": on_stage}
        views = {name: source.expert_view(name) for name in experts}
        results = {
            name: optimize_profile(
                view,
                run_dir if name == experts[0] else run_dir / expert_run_name(name),
                # No more step buckets than the expert has captured steps.
                replace(config, num_buckets=min(config.num_buckets, len(view.steps))),
                heartbeat=heartbeat,
                **options,
            )
            for name, view in views.items()
        }
        first = results[experts[0]]
        study = {**first.study, "experts": {n: expert_run_name(n) for n in experts[1:]}}
        if isinstance(profile, str | Path):
            study["profile"] = str(Path(profile).resolve())  # what `export RUN` reads
        first = replace(first, study=study)
        first.save(run_dir)
        return first
    # An expert's view is handed to the workers as it is; a profile folder they open themselves.
    searched = source if getattr(source, "expert", None) is not None else profile
    outcome = run_study(
        searched,
        config,
        run_dir,
        storage=storage,
        on_trial=on_trial,
        heartbeat=heartbeat,
        on_stage=on_stage,
    )
    source = open_source(searched)
    result = assemble(source, config, outcome, storage)
    if getattr(source, "expert", None) is not None:
        result = replace(result, study={**result.study, "expert": source.expert})
    if isinstance(profile, str | Path):
        # `export RUN` finds the capture here; the run's fingerprint says whether it changed.
        result = replace(result, study={**result.study, "profile": str(Path(profile).resolve())})
    if target is not None:
        result = apply_budget(result, target)
    # search.json (what `export` reads) is written last and the old one goes first, so a full
    # disk or an interruption never leaves a result beside another result's report: a folder
    # without search.json is an unfinished run, which the same command completes.
    ensure_folder(run_dir)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    if on_stage is not None:
        on_stage(f"report: {run_dir}")
    write_report(result, run_dir, source)  # the gallery draws the tile mass the search read
    result.save(run_dir)
    return result


def expert_run_name(expert: str) -> str:
    """The folder, inside the run folder, of the search of an expert other than the first."""
    return f"expert-{expert}"


def assemble(
    source: TileMassSource, config: SearchConfig, outcome: StudyOutcome, storage: str | None
) -> SearchResult:
    choice, geometry = outcome.choice, outcome.geometry
    tile_grid = geometry.tile_grid
    captured = list(source.steps)
    heads = []
    layers = profiled_layers(source)
    for b, per_layer in enumerate(outcome.solutions):
        for layer, per_head in zip(layers, per_layer, strict=True):
            for head, (solution, worst_tile) in enumerate(per_head):
                recall = solution.sample_recall
                heads.append(
                    HeadResult(
                        bucket=b,
                        layer=layer,
                        head=head,
                        kind=solution.pattern.kind(tile_grid),
                        pattern=solution.pattern,
                        recall_mean=float(recall.mean()),
                        recall_min=float(recall.min()),
                        recall_worst_tile=worst_tile,
                        density=solution.density,
                        cost=solution.cost,
                        greedy_pattern=solution.greedy_pattern,
                        greedy_cost=solution.greedy_cost,
                        front=tuple(
                            FrontEntry(
                                p.level, p.recall_mean, p.recall_min, p.cost, p.density, p.pattern
                            )
                            for p in solution.front
                        ),
                    )
                )
    schedule = choice.schedule
    buckets = tuple(
        BucketBounds(a, b, tuple(s for s in captured if a <= s < b), schedule.recall_of(i))
        for i, (a, b) in enumerate(schedule.bounds)
    )
    result = SearchResult(
        model=str(getattr(source, "model", "unknown")),
        fingerprint=str(source.fingerprint),
        grid=source.grid.as_tuple(),
        prefix_tokens=int(source.prefix_tokens),
        num_layers=int(source.num_layers),
        layers=tuple(layers),
        num_heads=int(source.num_heads),
        num_steps=int(source.num_steps),
        tile=geometry.tile.as_tuple(),
        tile_grid=tile_grid.as_tuple(),
        block_size=config.block_size,
        recall=config.recall,
        mean_over_samples=config.mean_over_samples,
        dense_steps=schedule.dense_steps,
        buckets=buckets,
        frame_cuts=choice.cuts,
        objective=0.0,
        study={
            "name": outcome.study_name,
            "storage": outcome.storage if storage else "sqlite:///<run>/study.db",
            "best_trial": outcome.best_trial,
            "best_value": outcome.best_value,
            "trials_completed": outcome.trials_completed,
            "seconds": round(outcome.seconds, 3),
            "timings": {k: round(v, 3) for k, v in outcome.timings.items()},
            "seed": config.seed,
            "max_options": outcome.max_options,
        },
        heads=tuple(heads),
    )
    return replace(result, objective=model_cost(result))


def bucket_weights(result: SearchResult) -> np.ndarray:
    """[B] each bucket's share of all denoising steps."""
    return np.array([(b.stop - b.start) / result.num_steps for b in result.buckets])


def model_cost(result: SearchResult) -> float:
    """Attention cost over all denoising steps (dense = 1): warm-up dense, buckets their heads'."""
    per_bucket = np.zeros(len(result.buckets))
    counts = np.zeros(len(result.buckets))
    for head in result.heads:
        per_bucket[head.bucket] += head.cost
        counts[head.bucket] += 1
    mean_cost = per_bucket / np.maximum(counts, 1)
    return float(result.dense_steps / result.num_steps + (bucket_weights(result) * mean_cost).sum())


def apply_budget(result: SearchResult, target: BudgetTarget) -> SearchResult:
    weights = bucket_weights(result)
    heads, summary = allocate(
        list(result.heads), weights / weights.sum(), target, result.mean_over_samples
    )
    tile_grid = Grid(*result.tile_grid)
    heads = [replace(h, kind=h.pattern.kind(tile_grid)) for h in heads]
    budgeted = replace(result, heads=tuple(heads), budget=summary)
    return replace(budgeted, objective=model_cost(budgeted))


# Padding share of the computed slots above which a block size is called wasteful.
WASTEFUL_PADDING = 0.5


def waste_warnings(result: SearchResult, cost: float | None = None) -> list[str]:
    """Lines for a result whose block size wastes the kernel's work: most computed slots are
    padding (tiles much smaller than blocks), or the attention costs more than dense (`cost`,
    dense = 1; default the search's objective)."""
    from compact_search.geometry import TileLayout

    def layout(block_size: int) -> TileLayout:
        return TileLayout(result.grid, result.tile, block_size, result.prefix_tokens)

    chosen = layout(result.block_size)
    candidates = [16, 32, 64, 128]
    better = [b for b in candidates if layout(b).padding_waste < WASTEFUL_PADDING]
    hint = (
        f"; try --block-size {max(better)}" if better and max(better) != result.block_size else ""
    )
    tile = "x".join(map(str, result.tile))
    lines = []
    if chosen.padding_waste >= WASTEFUL_PADDING:
        lines.append(
            f"{chosen.padding_waste:.0%} of the kernel's slots are padding: tile {tile} "
            f"({chosen.tile.volume} tokens) padded to blocks of {result.block_size} "
            f"(--block-size){hint}"
        )
    cost = result.objective if cost is None else cost
    if cost > 1.0:
        lines.append(
            f"the config costs {cost:.2f}x dense attention (padding included): "
            f"dense would be cheaper at --block-size {result.block_size}{hint}"
        )
    return lines
