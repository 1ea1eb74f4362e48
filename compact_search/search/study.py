"""Model-level search: Optuna over the choices every head shares, a fast solver for every head.

One trial fixes the model-level choices:

- the tile shape (one of the profile's candidates; the whole model uses one),
- the frame groups over temporal tile distance: how many (up to `max_groups`) and how they are
  spaced (`frame_cuts`),
- the dense warm-up K (unless fixed) and the bounds of the step buckets,

and then solves every (bucket, layer, head) for the cheapest pattern meeting the recall
threshold (`LayerSolver.head_costs`, sharded over worker processes by layer). The trial's value
is the model's attention cost averaged over all denoising steps: warm-up steps cost 1 (dense),
a bucket's steps cost the mean of its heads' costs. Choices that leave a bucket without a
profiled step are infeasible, reported as trial constraints (`Trial.set_constraint`, which
replaces the `constraints_func` argument deprecated in Optuna 5.0); TPE samples around them.

The study lives in Optuna storage (sqlite by default) under a name derived from the profile and
the search config, with `load_if_exists=True`, so a killed search resumes with its finished
trials and runs only the trials still missing.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import optuna

from compact_search.errors import UserInputError
from compact_search.geometry import DEFAULT_BLOCK_SIZE, TileShape
from compact_search.search.offsets import DEFAULT_MAX_OPTIONS
from compact_search.search.shards import (
    BucketRequest,
    LayerShards,
    TileMassSource,
    open_source,
    profiled_layers,
    samples_per_step,
)
from compact_search.search.solver import DEFAULT_FRONT_LEVELS, SolverConfig
from compact_search.search.storage import (
    DEFAULT_HEARTBEAT,
    TARGET_ATTR,
    StudyStorage,
    resolve_storage,
    run_trials,
)

# The warm-up's recall threshold. On the built-in model (docs/search.md, "Sparse warm-up") a
# warm-up of fixed length searched at 0.97 kept PSNR against dense at 37.7 dB (39.5 with a dense
# warm-up) and fidelity equal, for 11% less attention cost per video.
DEFAULT_WARMUP_RECALL = 0.97
AUTO = "auto"

# Optuna 5 replaced TPESampler(constraints_func=...) by Trial.set_constraint; samplers read it.
CONSTRAINT_NAME = "empty_buckets"


@dataclass(frozen=True)
class SearchConfig:
    """Everything the model-level search needs besides the profile. Frozen: it names the study."""

    recall: float = 0.9
    mean_over_samples: bool = False
    num_buckets: int = 2
    dense_steps: int | None = None  # None: searched in [0, max_dense_fraction * num_steps]
    max_dense_fraction: float = 0.5
    max_groups: int = 8  # most frame groups; more never cost more on the profile (see docs)
    n_trials: int = 40
    seed: int = 0
    tiles: tuple[TileShape, ...] = ()  # empty: every candidate tile shape of the profile
    block_size: int = DEFAULT_BLOCK_SIZE
    workers: int = 2
    front_levels: tuple[float, ...] = DEFAULT_FRONT_LEVELS
    # Search the warm-up steps as a bucket of their own at this recall threshold instead of
    # running them dense (heads that no pattern serves stay dense); None: dense warm-up. "auto":
    # DEFAULT_WARMUP_RECALL for a warm-up of given length, dense when its length is searched
    # (the search then trades the dense warm-up's length itself; docs/search.md has the numbers).
    warmup_recall: float | str | None = AUTO
    # Window options per frame group (`WindowOptions`); None: as many as the trial budget
    # affords for the profile's size (`auto_max_options`).
    max_options: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiles", tuple(TileShape.of(t) for t in self.tiles))
        object.__setattr__(self, "front_levels", tuple(self.front_levels))
        if not 0.0 < self.recall <= 1.0:
            raise UserInputError(f"recall must lie in (0, 1], got {self.recall}")
        if self.num_buckets < 1:
            raise UserInputError(f"num_buckets must be >= 1, got {self.num_buckets}")
        if self.dense_steps is not None and self.dense_steps < 0:
            raise UserInputError(f"dense_steps must be >= 0, got {self.dense_steps}")
        if not 0.0 <= self.max_dense_fraction < 1.0:
            raise UserInputError(
                f"max_dense_fraction must lie in [0, 1), got {self.max_dense_fraction}"
            )
        if self.max_groups < 1:
            raise UserInputError(f"max_groups must be >= 1, got {self.max_groups}")
        if self.n_trials < 1:
            raise UserInputError(f"n_trials must be >= 1, got {self.n_trials}")
        if self.workers < 1:
            raise UserInputError(f"workers must be >= 1, got {self.workers}")
        if self.warmup_recall == AUTO:
            fixed = self.dense_steps is not None
            object.__setattr__(self, "warmup_recall", DEFAULT_WARMUP_RECALL if fixed else None)
        if isinstance(self.warmup_recall, str):
            raise UserInputError(
                f"warmup recall must be a number, 'auto' or None, got {self.warmup_recall!r}"
            )
        if self.warmup_recall is not None and not 0.0 < self.warmup_recall <= 1.0:
            raise UserInputError(f"warmup recall must lie in (0, 1], got {self.warmup_recall}")
        if self.max_options is not None and self.max_options < 1:
            raise UserInputError(f"max_options must be >= 1, got {self.max_options}")

    def solver_config(self, front: bool = False) -> SolverConfig:
        thresholds = {self.recall} | ({self.warmup_recall} if self.warmup_recall else set())
        levels = tuple(sorted({*self.front_levels, *thresholds})) if front else ()
        return SolverConfig(self.recall, self.mean_over_samples, levels)

    def study_name(self, fingerprint: str) -> str:
        """Same profile and same choices -> same study (so it resumes); trial count excluded."""
        fields = asdict(self)
        for volatile in ("n_trials", "workers", "front_levels"):
            fields.pop(volatile)
        fields["tiles"] = [str(t) for t in self.tiles]
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        return f"compact-search-{fingerprint}-{digest}"


# Solver work a trial may spend on window options: options x profiled layers x heads x samples.
# Sized so that the Wan2.1-14B-sized benchmark (40 x 40 heads, 12 samples) gets ~800 options
# per group (the near and wrapped tiers on its 7x6x8 tile grid; docs/search.md has the
# timings), while small profiles such as the built-in model's get the whole family.
OPTION_WORK_BUDGET = 800 * 40 * 40 * 12


def auto_max_options(source: TileMassSource) -> int:
    """Window options per frame group that the trial budget affords for this profile."""
    work = len(profiled_layers(source)) * source.num_heads * len(source.steps)
    work *= samples_per_step(source)
    return int(min(DEFAULT_MAX_OPTIONS, max(1, OPTION_WORK_BUDGET // max(1, work))))


@dataclass(frozen=True)
class Schedule:
    """Dense warm-up steps and the step buckets after it, each with its profiled samples.

    With a searched warm-up the warm-up steps are bucket 0 (its own recall threshold) and
    `dense_steps` is 0.
    """

    dense_steps: int
    bounds: tuple[tuple[int, int], ...]  # per bucket [start, stop) over denoising steps
    samples: tuple[tuple[int, ...], ...]  # per bucket: indices into the profile's samples
    recall: tuple[float | None, ...] = ()  # per bucket; None or empty: the search's tau

    def recall_of(self, bucket: int) -> float | None:
        return self.recall[bucket] if self.recall else None

    def step_weights(self, num_steps: int) -> np.ndarray:
        """[B] share of all denoising steps each bucket covers."""
        return np.array([(b - a) / num_steps for a, b in self.bounds])


def schedule_of(
    dense_steps: int,
    bucket_cuts: list[int],
    captured: list[int],
    per_step: int,
    num_steps: int,
    warmup_recall: float | None = None,
) -> tuple[Schedule | None, float]:
    """Build the schedule; (None, violation > 0) when a bucket would hold no profiled step.

    bucket_cuts index the captured steps: cut c starts a bucket at captured step c, the bound
    sits halfway between captured steps c-1 and c. With `warmup_recall` the warm-up steps
    [0, dense_steps) become bucket 0, searched at that threshold, when a profiled step falls in
    them (they stay dense otherwise: there is nothing to search on).
    """
    live = [i for i, step in enumerate(captured) if step >= dense_steps]
    cuts = sorted(bucket_cuts)
    edges = [live[0] if live else len(captured), *cuts, len(captured)]
    violation = float(sum(max(0, a + 1 - b) for a, b in zip(edges, edges[1:], strict=False)))
    if not live or violation > 0 or cuts and cuts[0] <= live[0]:
        return None, max(violation, 1.0)
    bounds, samples = [], []
    start = dense_steps
    for first, stop_index in zip(edges, edges[1:], strict=False):
        stop = (
            num_steps
            if stop_index == len(captured)
            else (captured[stop_index - 1] + captured[stop_index] + 1) // 2
        )
        bounds.append((start, stop))
        steps_here = range(first, stop_index)
        # samples are step-major: sample t * per_step + p
        samples.append(tuple(t * per_step + p for t in steps_here for p in range(per_step)))
        start = stop
    warm = [i for i, step in enumerate(captured) if step < dense_steps]
    if warmup_recall is None or not warm:
        return Schedule(dense_steps, tuple(bounds), tuple(samples)), 0.0
    warm_samples = tuple(t * per_step + p for t in warm for p in range(per_step))
    return (
        Schedule(
            0,
            ((0, dense_steps), *bounds),
            (warm_samples, *samples),
            (warmup_recall, *(None for _ in bounds)),
        ),
        0.0,
    )


def bucket_requests(schedule: Schedule) -> list[BucketRequest]:
    return [
        BucketRequest(samples, schedule.recall_of(b)) for b, samples in enumerate(schedule.samples)
    ]


@dataclass(frozen=True)
class TrialChoice:
    """The model-level choices of one trial."""

    tile_index: int
    cuts: tuple[int, ...]
    schedule: Schedule


FRAME_SPACINGS = ("geometric", "linear")


def frame_cuts(groups: int, spacing: str, frames: int) -> tuple[int, ...]:
    """Cuts over temporal tile distance [0, frames) for `groups` groups.

    geometric: group edges at frames ** (k / groups) (fine near the query frame, coarse far
    away, like attention that decays with distance); linear: evenly spaced. Asking for as many
    groups as distances gives every distance its own group.
    """
    if groups >= frames:
        return tuple(range(1, frames))
    if spacing == "geometric":
        edges = [frames ** (k / groups) for k in range(1, groups)]
    else:
        edges = [k * frames / groups for k in range(1, groups)]
    cuts: list[int] = []
    for edge in edges:  # strictly increasing, so rounding never merges two groups
        cut = max(round(edge), cuts[-1] + 1 if cuts else 1)
        if cut < frames:
            cuts.append(cut)
    return tuple(cuts)


def suggest(
    trial: optuna.Trial, source: TileMassSource, config: SearchConfig, geometries
) -> tuple[TrialChoice | None, float]:
    """Sample the model-level choices; -> (TrialChoice or None, constraint violation)."""
    tile_names = [str(g.tile) for g in geometries]
    tile_index = tile_names.index(trial.suggest_categorical("tile", tile_names))
    tile_frames = geometries[tile_index].tile_grid.frames
    groups = trial.suggest_int("frame_groups", 1, config.max_groups)
    spacing = trial.suggest_categorical("frame_spacing", FRAME_SPACINGS)
    cuts = frame_cuts(groups, spacing, tile_frames)
    if config.dense_steps is None:
        most = int(config.max_dense_fraction * source.num_steps)
        dense = trial.suggest_int("dense_steps", 0, most) if most > 0 else 0
    else:
        dense = config.dense_steps
    captured = list(source.steps)
    bucket_cuts = [
        trial.suggest_int(f"bucket_cut_{k}", 1, max(1, len(captured) - 1))
        for k in range(config.num_buckets - 1)
    ]
    schedule, violation = schedule_of(
        dense,
        bucket_cuts,
        captured,
        samples_per_step(source),
        source.num_steps,
        config.warmup_recall,
    )
    if schedule is None:
        return None, violation
    return TrialChoice(tile_index, cuts, schedule), 0.0


def make_objective(source: TileMassSource, config: SearchConfig, shards: LayerShards):
    """The objective over a frozen search config; solves are cached per distinct choice."""
    solver_config = config.solver_config()
    cache: dict[tuple, np.ndarray] = {}

    def objective(trial: optuna.Trial) -> float:
        started = time.perf_counter()
        choice, violation = suggest(trial, source, config, shards.geometries)
        trial.set_constraint(CONSTRAINT_NAME, violation)
        if choice is None:
            return 1.0  # dense; the constraint marks the trial infeasible
        schedule = choice.schedule
        key = (choice.tile_index, choice.cuts, schedule.samples, schedule.recall)
        if key not in cache:
            cache[key] = shards.costs(
                choice.tile_index, choice.cuts, bucket_requests(schedule), solver_config
            )
        costs = cache[key]  # [B, L, H]
        bucket_cost = costs.mean(axis=(1, 2))  # [B]
        weights = schedule.step_weights(source.num_steps)
        value = schedule.dense_steps / source.num_steps + float((weights * bucket_cost).sum())
        trial.set_user_attr("bucket_cost", [float(c) for c in bucket_cost])
        trial.set_user_attr("bucket_bounds", [list(b) for b in schedule.bounds])
        trial.set_user_attr("frame_cuts", list(choice.cuts))
        trial.set_user_attr("dense_steps", schedule.dense_steps)
        trial.set_user_attr("seconds", time.perf_counter() - started)
        return value

    return objective


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """All constraint values <= 0 (a trial without constraints never ran its objective)."""
    return bool(trial.constraints) and all(v <= 0 for v in trial.constraints.values())


def open_study(
    source: TileMassSource,
    config: SearchConfig,
    where: StudyStorage,
    *,
    join: bool = False,
) -> optuna.Study:
    """Create or load the study (`join`: load only; it must exist)."""
    name = config.study_name(source.fingerprint)
    # Workers sharing a study sample with their own seeds (the same seed would propose the same
    # parameters everywhere) and treat the others' running trials as taken (constant liar).
    seed = config.seed if not join else random.SystemRandom().randrange(2**31)
    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=where.shared)
    if join:
        try:
            return optuna.load_study(study_name=name, storage=where.storage, sampler=sampler)
        except KeyError:
            raise UserInputError(
                f"storage {where.shown} holds no study {name}: start it with the same profile and "
                "search options without --join first"
            ) from None
    return optuna.create_study(
        storage=where.storage,
        sampler=sampler,
        study_name=name,
        direction="minimize",
        load_if_exists=True,
    )


def warm_start_params(source: TileMassSource, config: SearchConfig, geometries) -> dict:
    """The first trial: the tile shape with least padding, the finest frame groups allowed,
    no warm-up (when searched) and evenly spaced buckets."""

    def full_cost(i: int) -> float:  # padding makes a tile shape's full pattern dearer
        return float(geometries[i].cost_model.per_offset.sum())

    tile_index = min(range(len(geometries)), key=full_cost)
    frames = geometries[tile_index].tile_grid.frames
    params: dict = {"tile": str(geometries[tile_index].tile)}
    params["frame_groups"] = min(config.max_groups, frames)
    params["frame_spacing"] = "geometric"
    captured = list(source.steps)
    if config.dense_steps is None:
        params["dense_steps"] = 0
    for k in range(config.num_buckets - 1):
        params[f"bucket_cut_{k}"] = max(1, (k + 1) * len(captured) // config.num_buckets)
    return params


def best_feasible(study: optuna.Study) -> optuna.trial.FrozenTrial:
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if is_feasible(t)
    ]
    if not done:
        raise UserInputError(
            "no feasible trial: every step bucket needs a profiled step after the warm-up "
            "(fewer buckets or fewer dense steps)"
        )
    return min(done, key=lambda t: t.value)


@dataclass(frozen=True)
class StudyOutcome:
    """The best trial's choices and the per-head solutions they give."""

    study_name: str
    best_trial: int
    best_value: float
    trials_completed: int
    choice: TrialChoice
    geometry: object  # shards.Geometry of the chosen tile
    solutions: list  # [bucket][layer][head] (HeadSolution, worst query-tile recall)
    seconds: float  # the whole run
    max_options: int  # window options per frame group the solvers enumerated
    timings: dict[str, float] = field(default_factory=dict)  # tables, trials, final solve
    trial_seconds: list[float] = field(default_factory=list)  # objective time per trial
    storage: str = ""  # where the study lives, password hidden


def run_study(
    source: TileMassSource | str | Path,
    config: SearchConfig,
    run_dir: Path,
    *,
    storage: str | None = None,
    on_trial=None,
    heartbeat: int = DEFAULT_HEARTBEAT,
    on_stage=None,
) -> StudyOutcome:
    """Run (or resume) the study, then solve every head at the best trial with Pareto fronts.

    On a shared storage other workers (`join_study`) may add trials meanwhile; this worker waits
    for their running trials and uses every finished one. `on_stage(line)` hears each stage
    begin (and whether the study resumes), for a progress display.
    """
    say = on_stage or (lambda line: None)
    started = time.perf_counter()
    where = resolve_storage(storage, run_dir, heartbeat)
    src = open_source(source)
    tiles = config.tiles or tuple(src.tiles)
    if not tiles:
        raise UserInputError("the profile lists no candidate tile shapes")
    study = open_study(src, config, where)
    study.set_user_attr(TARGET_ATTR, config.n_trials)
    finished = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if finished:
        say(f"resuming study {study.study_name}: {finished} of {config.n_trials} trials finished")
    timings: dict[str, float] = {}
    max_options = config.max_options or auto_max_options(src)
    say(f"offset tables: {len(profiled_layers(src))} layers, {len(tiles)} tile shapes")
    with LayerShards(source, tiles, config.block_size, config.workers, max_options) as shards:
        timings["tables"] = time.perf_counter() - started
        if not study.trials:
            study.enqueue_trial(warm_start_params(src, config, shards.geometries))
        say(f"trials: {max(0, config.n_trials - finished)} to run")
        trials_started = time.perf_counter()
        callbacks = [lambda st, tr: on_trial(st, tr)] if on_trial else None
        ran = run_trials(
            study,
            make_objective(src, config, shards),
            config.n_trials,
            shared=where.shared,
            wait_for_others=True,
            callbacks=callbacks,
        )
        timings["trials_run"] = len(ran)
        timings["trials"] = time.perf_counter() - trials_started
        ran_here = set(ran)
        mine = [t for t in study.get_trials(deepcopy=False) if t.number in ran_here]
        timings["objective"] = sum(t.user_attrs.get("seconds", 0.0) for t in mine)
        final_started = time.perf_counter()
        best = best_feasible(study)
        say(f"final solve with Pareto fronts at trial {best.number}")
        choice, _ = suggest(optuna.trial.FixedTrial(best.params), src, config, shards.geometries)
        solutions = shards.solve(
            choice.tile_index,
            choice.cuts,
            bucket_requests(choice.schedule),
            config.solver_config(front=True),
        )
        geometry = shards.geometries[choice.tile_index]
        timings["final"] = time.perf_counter() - final_started
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return StudyOutcome(
        study_name=study.study_name,
        best_trial=best.number,
        best_value=float(best.value),
        trials_completed=len(completed),
        choice=choice,
        geometry=geometry,
        solutions=solutions,
        seconds=time.perf_counter() - started,
        max_options=max_options,
        timings=timings,
        trial_seconds=[t.user_attrs.get("seconds", 0.0) for t in completed],
        storage=where.shown,
    )


@dataclass(frozen=True)
class JoinOutcome:
    study_name: str
    trials_run: int  # by this worker
    trials_completed: int  # by every worker, when this one stopped
    target: int


def join_study(
    source: TileMassSource | str | Path,
    config: SearchConfig,
    storage: str,
    *,
    on_trial=None,
    heartbeat: int = DEFAULT_HEARTBEAT,
) -> JoinOutcome:
    """Add trials to a shared study another `optimize` started with the same profile and search
    options, until it has its trial count; writes no result (the starting worker does)."""
    where = resolve_storage(storage, Path("."), heartbeat)
    if not where.shared:
        raise UserInputError(
            f"--join needs a database server storage (postgresql://...), got {where.shown}: "
            "only a server's heartbeats let workers take over a dead worker's trial"
        )
    src = open_source(source)
    if len(getattr(src, "experts", None) or []) > 1 and getattr(src, "expert", None) is None:
        raise UserInputError(
            "--join is not supported for a profile of several experts yet: each expert is a "
            "study of its own; run optimize without --join"
        )
    tiles = config.tiles or tuple(src.tiles)
    study = open_study(src, config, where, join=True)
    target = int(study.user_attrs.get(TARGET_ATTR, config.n_trials))
    max_options = config.max_options or auto_max_options(src)
    with LayerShards(source, tiles, config.block_size, config.workers, max_options) as shards:
        callbacks = [lambda st, tr: on_trial(st, tr)] if on_trial else None
        ran = run_trials(
            study,
            make_objective(src, config, shards),
            target,
            shared=True,
            wait_for_others=False,
            callbacks=callbacks,
        )
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return JoinOutcome(study.study_name, len(ran), len(completed), target)
