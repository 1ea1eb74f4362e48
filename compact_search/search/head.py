"""`optimize_head`: the stable one-head API."""

from __future__ import annotations

import warnings

import optuna
import torch

from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileLayout
from compact_search.patterns import HeadPattern
from compact_search.search.offsets import DEFAULT_MAX_OPTIONS, CostModel, recall_tables
from compact_search.search.solver import HeadSolution, LayerSolver, SolverConfig


def solve_head(
    tile_mass: torch.Tensor,
    tile_grid: Grid | tuple[int, int, int],
    recall: float,
    *,
    n_trials: int = 30,
    seed: int = 0,
    mean_over_samples: bool = False,
    layout: TileLayout | None = None,
    max_groups: int = 3,
    max_options: int = DEFAULT_MAX_OPTIONS,
) -> HeadSolution:
    """Like `optimize_head`, returning the full solution (costs, recalls, greedy baseline).

    Optuna searches the frame-group cuts (seeded TPE; brute force when all cut sets fit in
    n_trials); for each cut set the exact solver (`LayerSolver.solve(exact=True)`) picks the
    cheapest pattern. The cut set with no cuts is tried first.
    """
    tg = Grid.of(tile_grid)
    if tile_mass.ndim == 2:
        tile_mass = tile_mass[None]
    if tile_mass.ndim != 3:
        raise UserInputError(f"tile_mass must be [S, nq, nk], got {tuple(tile_mass.shape)}")
    if layout is not None and layout.tile_grid != tg:
        raise UserInputError(f"layout tile grid {layout.tile_grid} != tile grid {tg}")
    if n_trials < 1:
        raise UserInputError(f"n_trials must be >= 1, got {n_trials}")
    cost_model = CostModel.from_layout(layout) if layout is not None else CostModel.density_only(tg)
    tables = recall_tables(tile_mass, tg)[None]  # [1, S, Ft, Ht, Wt]
    config = SolverConfig(recall, mean_over_samples)
    frames = tg.frames
    # cut k in [1, frames]; a cut equal to frames means "no cut"
    spaces = {f"frame_cut_{k}": list(range(1, frames + 1)) for k in range(max_groups - 1)}
    cut_sets = frames ** (max_groups - 1)
    solutions: dict[tuple[int, ...], HeadSolution] = {}

    def objective(trial: optuna.Trial) -> float:
        raw = [trial.suggest_int(name, 1, frames) for name in spaces]
        cuts = tuple(sorted({c for c in raw if c < frames}))
        if cuts not in solutions:
            solver = LayerSolver(cost_model, cuts, max_options)
            solutions[cuts] = solver.solve(tables, config, exact=True)[0]
        return solutions[cuts].cost

    if not spaces:
        solutions[()] = LayerSolver(cost_model, (), max_options).solve(tables, config, exact=True)[
            0
        ]
        return solutions[()]
    # A throwaway in-memory study per head: keep its per-trial log lines out of the caller's way.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = (
                optuna.samplers.BruteForceSampler(seed=seed)
                if cut_sets <= n_trials
                else optuna.samplers.TPESampler(seed=seed)
            )
        study = optuna.create_study(sampler=sampler, direction="minimize")
        study.enqueue_trial({name: frames for name in spaces})
        study.optimize(objective, n_trials=min(n_trials, cut_sets))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return min(solutions.values(), key=lambda s: s.cost)


def optimize_head(
    tile_mass: torch.Tensor,
    tile_grid: Grid | tuple[int, int, int],
    recall: float,
    *,
    n_trials: int = 30,
    seed: int = 0,
    mean_over_samples: bool = False,
    layout: TileLayout | None = None,
    max_groups: int = 3,
    max_options: int = DEFAULT_MAX_OPTIONS,
) -> HeadPattern:
    """The cheapest pattern of the family with recall >= `recall` on every sample.

    tile_mass [S, nq, nk] (or [nq, nk]), tiles frame-major over tile_grid (Ft, Ht, Wt); rows
    sum to 1. Cost is the density (kept share of tile pairs) unless `layout` is given, then
    kernel blocks over dense blocks, padding and prefix included. `mean_over_samples` constrains
    the mean over samples instead of every sample. `max_groups` bounds the frame groups;
    `n_trials` bounds the cut sets tried (see `solve_head`). `max_options` bounds the window
    options per group (`WindowOptions`: near windows first, then wrapped ones and bands while
    they fit). Returns dense when nothing cheaper meets the threshold.
    """
    return solve_head(
        tile_mass,
        tile_grid,
        recall,
        n_trials=n_trials,
        seed=seed,
        mean_over_samples=mean_over_samples,
        layout=layout,
        max_groups=max_groups,
        max_options=max_options,
    ).pattern
