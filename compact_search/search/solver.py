"""Per-head solver: the cheapest pattern of the family for fixed frame groups, all heads at once.

With the frame groups fixed, a pattern is one option per group (none, one window, or the union
of two; see `WindowOptions`), and a pattern's recall per sample and its cost are sums
of per-group option values (offset tables). So the search is a multiple-choice knapsack with one
recall constraint per sample. Option values for every head, sample, group and option come from
prefix-summed offset tables in one vectorised step ([H, S, G, O]); then one of two solvers:

- fast (default; what every model-level trial runs), vectorised over heads:
  1. Lagrangian: every group independently maximises price * mean recall - cost; the price is
     bisected per head to the cheapest setting meeting the constraint (the LP hull solution);
  2. repair: repeatedly switch the single group option that saves the most cost while every
     sample stays >= tau (any option, unions of two windows included);
  3. the greedy baseline competes; the cheaper wins, so the result never costs more than greedy
     (repairing greedy too was measured to add nothing at 14B scale, for 30% more time).
- exact (reference; `optimize_head` uses it), head by head: per group only the Pareto front of
  options in (cost, recall) survives; groups are merged by Cartesian sums with the same filter,
  dropping partial patterns that cannot reach the threshold even with the remaining groups'
  best, or that already cost more than greedy. With the mean over samples as the constraint
  this is exact. With "every sample >= tau" the worst sample is not additive over groups;
  keeping the mean front and the worst-sample front together is a tight heuristic there.

Measured on planted heads the fast solver lands within a few percent of the exact one at 100-300x
less time per head (BENCHMARKS.md, "Search").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compact_search.errors import UserInputError
from compact_search.patterns import FrameGroup, HeadPattern
from compact_search.search.greedy import RECALL_EPS, constraint_measure, greedy_shrink
from compact_search.search.offsets import (
    DEFAULT_MAX_OPTIONS,
    CostModel,
    WindowOptions,
    density_table,
    frame_groups_of,
    group_rect_sums,
)

# Recall levels at which every head's Pareto front is reported (export picks among them).
# Bisection steps over log10(price) in [-6, 6]: the price settles to ~1e-3 relative.
LAGRANGE_STEPS = 24
DEFAULT_FRONT_LEVELS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)


@dataclass(frozen=True)
class SolverConfig:
    """What one solve needs besides the tables: the threshold and how samples combine."""

    recall: float
    mean_over_samples: bool = False
    front_levels: tuple[float, ...] = ()  # empty: no front (faster; used inside trials)

    def __post_init__(self) -> None:
        if not 0.0 <= self.recall <= 1.0:
            raise UserInputError(f"recall must lie in [0, 1], got {self.recall}")
        if any(not 0.0 <= level <= 1.0 for level in self.front_levels):
            raise UserInputError(f"front levels must lie in [0, 1], got {self.front_levels}")
        object.__setattr__(self, "front_levels", tuple(sorted(set(self.front_levels))))


@dataclass(frozen=True)
class FrontPoint:
    """One point of a head's Pareto front: the cheapest pattern with recall >= level."""

    level: float
    recall_mean: float  # mean over samples
    recall_min: float  # worst sample
    cost: float
    density: float
    pattern: HeadPattern


@dataclass(frozen=True)
class HeadSolution:
    pattern: HeadPattern
    cost: float
    density: float
    sample_recall: np.ndarray  # [S] mean-over-query-tiles recall per sample
    greedy_pattern: HeadPattern
    greedy_cost: float
    front: tuple[FrontPoint, ...] = field(default=())


@dataclass(frozen=True)
class _Candidates:
    """Partial or whole patterns of one head: one option index per merged group."""

    cost: np.ndarray  # [n]
    recall: np.ndarray  # [n, S]
    choice: np.ndarray  # [n, g] option indices


def _pareto(cand: _Candidates, both_fronts: bool) -> _Candidates:
    """Keep candidates that raise the best mean (and, if asked, worst-sample) recall of all
    cheaper ones."""
    order = np.lexsort((-cand.recall.mean(axis=1), cand.cost))
    cost, recall, choice = cand.cost[order], cand.recall[order], cand.choice[order]
    keep = _running_max_mask(recall.mean(axis=1))
    if both_fronts:
        keep |= _running_max_mask(recall.min(axis=1))
    return _Candidates(cost[keep], recall[keep], choice[keep])


def pattern_of(choice: np.ndarray, options: WindowOptions, groups) -> HeadPattern:
    """Option indices [G] -> canonical HeadPattern (equal neighbours merged, trailing skips cut)."""
    merged: list[list] = []
    for (start, stop), option in zip(groups, choice, strict=True):
        rects = options.windows[option]
        if merged and merged[-1][2] == rects:
            merged[-1][1] = stop
        else:
            merged.append([start, stop, rects])
    while len(merged) > 1 and not merged[-1][2]:
        merged.pop()
    return HeadPattern(tuple(FrameGroup(a, b, r) for a, b, r in merged))


class LayerSolver:
    """Solves every head of one table stack for one geometry (tile grid, cost model, groups)."""

    def __init__(
        self,
        cost_model: CostModel,
        cuts: tuple[int, ...],
        max_options: int = DEFAULT_MAX_OPTIONS,
    ):
        self.cost_model = cost_model
        tg = cost_model.tile_grid
        self.groups = frame_groups_of(tuple(cuts), tg.frames)
        self.options = WindowOptions.of(tg.height, tg.width, max_options)
        self.cost_sums = group_rect_sums(cost_model.per_offset, self.groups)  # [G, n+1]
        self.option_cost = self.options.values(self.cost_sums)  # [G, O]
        self.option_density = self.options.values(
            group_rect_sums(density_table(tg), self.groups)
        )  # [G, O]
        self.cost_order = np.argsort(self.option_cost, axis=1, kind="stable")  # [G, O]
        self.full_option = 1 + (tg.height - 1) * tg.width + (tg.width - 1)  # Rect(Ht-1, Wt-1)

    def solve(
        self, tables: np.ndarray, config: SolverConfig, *, exact: bool = False
    ) -> list[HeadSolution]:
        """Recall tables [H, S, Ft, Ht, Wt] -> one HeadSolution per head.

        `exact=False` (the default) runs the vectorised Lagrangian solver with local repair;
        `exact=True` merges per-group Pareto fronts head by head (slower, the reference).
        """
        if tables.shape[2:] != self.cost_model.tile_grid.as_tuple():
            raise ValueError(f"tables {tables.shape} do not fit {self.cost_model.tile_grid}")
        recall_sums = group_rect_sums(tables, self.groups)  # [H, S, G, n+1]
        option_recall = self.options.values(recall_sums)  # [H, S, G, O]
        greedy = greedy_shrink(
            recall_sums, self.cost_sums, self.options, config.recall, config.mean_over_samples
        )  # [H, G]
        if exact:
            masks = self._group_fronts(option_recall, config.mean_over_samples)
            solutions = []
            for h in range(tables.shape[0]):
                recall_h = option_recall[h]
                best, fronts = self._exact_choices(recall_h, masks[h], greedy[h], config)
                solutions.append(self._solution(recall_h, best, greedy[h], fronts, config))
            return solutions
        best = self._fast_choices(option_recall, greedy, config.recall, config.mean_over_samples)
        fronts = [
            self._repair(
                option_recall,
                self._lagrangian(option_recall, level, config.mean_over_samples),
                level,
                config.mean_over_samples,
            )
            for level in config.front_levels
        ]
        return [
            self._solution(option_recall[h], best[h], greedy[h], [f[h] for f in fronts], config)
            for h in range(tables.shape[0])
        ]

    def head_costs(self, tables: np.ndarray, config: SolverConfig) -> np.ndarray:
        """Recall tables [H, S, Ft, Ht, Wt] -> [H] cost of each head's pattern (fast solver).

        What a search trial needs: no patterns, no fronts.
        """
        recall_sums = group_rect_sums(tables, self.groups)  # [H, S, G, n+1]
        option_recall = self.options.values(recall_sums)  # [H, S, G, O]
        greedy = greedy_shrink(
            recall_sums, self.cost_sums, self.options, config.recall, config.mean_over_samples
        )
        best = self._fast_choices(option_recall, greedy, config.recall, config.mean_over_samples)
        g_idx = np.arange(len(self.groups))[None, :]
        cost = self.option_cost[g_idx, best].sum(axis=1) + self.cost_model.constant
        return np.minimum(cost, self.cost_model.dense_cost)

    def _fast_choices(
        self, option_recall: np.ndarray, greedy: np.ndarray, tau: float, mean_only: bool
    ) -> np.ndarray:
        """[H, G]: the repaired Lagrangian solution, or the greedy one where that is cheaper."""
        fast = self._repair(
            option_recall, self._lagrangian(option_recall, tau, mean_only), tau, mean_only
        )
        g_idx = np.arange(len(self.groups))[None, :]
        fast_cheaper = self.option_cost[g_idx, fast].sum(1) < self.option_cost[g_idx, greedy].sum(1)
        return np.where(fast_cheaper[:, None], fast, greedy)

    def _choice_measure(
        self, option_recall: np.ndarray, choice: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Choices [H, G] -> (recall per sample [H, S], cost [H]) without the constant."""
        h_idx = np.arange(choice.shape[0])[:, None]
        g_idx = np.arange(choice.shape[1])[None, :]
        recall = option_recall[h_idx, :, g_idx, choice].sum(axis=1)  # [H, G, S] -> [H, S]
        return recall, self.option_cost[g_idx, choice].sum(axis=1)

    def _lagrangian(self, option_recall: np.ndarray, tau: float, mean_only: bool) -> np.ndarray:
        """[H, G] choices: every group maximises price * recall - cost on its own, the price
        bisected per head to the cheapest one meeting the constraint (the LP hull solution)."""
        mean_recall = option_recall.mean(axis=1)  # [H, G, O]
        num_heads = option_recall.shape[0]

        def choose(price: np.ndarray) -> np.ndarray:
            return np.argmax(price[:, None, None] * mean_recall - self.option_cost[None], axis=2)

        def feasible(price: np.ndarray) -> np.ndarray:
            recall, _ = self._choice_measure(option_recall, choose(price))
            return constraint_measure(recall, mean_only) >= tau - RECALL_EPS

        low = np.full(num_heads, -6.0)  # log10 of the price
        high = np.full(num_heads, 6.0)
        for _ in range(LAGRANGE_STEPS):
            mid = (low + high) / 2
            ok = feasible(10.0**mid)
            high = np.where(ok, mid, high)
            low = np.where(ok, low, mid)
        return choose(10.0**high)

    def _repair(
        self, option_recall: np.ndarray, choice: np.ndarray, tau: float, mean_only: bool
    ) -> np.ndarray:
        """Local search: repeatedly switch the one group option that saves the most cost while
        the constraint holds (any option, unions of two windows included). Infeasible starts move to
        the full pattern first."""
        choice = choice.copy()
        num_heads, num_groups = choice.shape
        recall, cost = self._choice_measure(option_recall, choice)
        broken = constraint_measure(recall, mean_only) < tau - RECALL_EPS
        choice[broken] = self.full_option
        recall, cost = self._choice_measure(option_recall, choice)
        active = np.ones(num_heads, dtype=bool)
        g_idx = np.arange(num_groups)[None, :]
        while active.any():
            rows = np.nonzero(active)[0]
            current = option_recall[rows[:, None], :, g_idx, choice[rows]]  # [h, G, S]
            # [h, S, G, O]: recall after switching group g to option o
            switched = (
                recall[rows, :, None, None]
                - current.transpose(0, 2, 1)[..., None]
                + option_recall[rows]
            )
            saving = (
                self.option_cost[g_idx, choice[rows]][..., None] - self.option_cost[None]
            )  # [h, G, O]
            # reduce over the sample axis in place (a transposed view reduces several times slower)
            measure = switched.mean(axis=1) if mean_only else switched.min(axis=1)  # [h, G, O]
            ok = measure >= tau - RECALL_EPS
            gain = np.where(ok & (saving > 1e-12), saving, 0.0).reshape(len(rows), -1)
            best = gain.argmax(axis=1)
            moving = gain[np.arange(len(rows)), best] > 0
            active[rows[~moving]] = False
            rows, best = rows[moving], best[moving]
            g, o = np.divmod(best, self.options.count)
            choice[rows, g] = o
            recall[rows], cost[rows] = self._choice_measure(option_recall[rows], choice[rows])
        return choice

    def _group_fronts(self, option_recall: np.ndarray, mean_only: bool) -> np.ndarray:
        """[H, G, O] bool in cost order: options on a group's Pareto front, per head."""
        order = self.cost_order  # [G, O]
        g_idx = np.arange(order.shape[0])[:, None]
        # [H, S, G, O] -> [H, G, O, S] in cost order
        sorted_recall = option_recall[:, :, g_idx, order].transpose(0, 2, 3, 1)
        keep = _running_max_mask(sorted_recall.mean(axis=-1))
        if not mean_only:
            keep |= _running_max_mask(sorted_recall.min(axis=-1))
        return keep

    def _exact_choices(
        self,
        option_recall: np.ndarray,  # [S, G, O]
        front_mask: np.ndarray,  # [G, O] in cost order
        greedy_choice: np.ndarray,  # [G]
        config: SolverConfig,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One head by merging group fronts: (best choice [G], one choice per front level)."""
        num_samples, num_groups, _ = option_recall.shape
        mean_only = config.mean_over_samples
        levels = (config.recall, *config.front_levels)
        g_all = np.arange(num_groups)
        greedy_cost = float(self.option_cost[g_all, greedy_choice].sum())
        cost_bound = np.inf if config.front_levels else greedy_cost + 1e-12
        best_per_group = option_recall.max(axis=2)  # [S, G]
        # the most recall groups g+1.. can still add, per sample: [G, S]
        rest = np.cumsum(best_per_group[:, ::-1], axis=1)[:, ::-1]
        rest = np.concatenate([rest[:, 1:], np.zeros((num_samples, 1))], axis=1).T
        cand = _Candidates(np.zeros(1), np.zeros((1, num_samples)), np.zeros((1, 0), np.int64))
        for g in range(num_groups):
            opts = self.cost_order[g][front_mask[g]]  # [m]
            cost = (cand.cost[:, None] + self.option_cost[g, opts][None, :]).reshape(-1)
            recall = cand.recall[:, None, :] + option_recall[:, g, opts].T[None, :, :]
            choice = np.concatenate(
                [np.repeat(cand.choice, len(opts), axis=0), np.tile(opts, len(cand.cost))[:, None]],
                axis=1,
            )
            recall = recall.reshape(-1, num_samples)
            reach = constraint_measure(recall + rest[g], mean_only) >= min(levels) - RECALL_EPS
            keep = reach & (cost <= cost_bound)
            cand = _pareto(_Candidates(cost[keep], recall[keep], choice[keep]), not mean_only)
        measure = constraint_measure(cand.recall, mean_only)

        def cheapest(level: float, fallback: np.ndarray) -> np.ndarray:
            ok = np.nonzero(measure >= level - RECALL_EPS)[0]
            if not len(ok):
                return fallback
            pick = ok[np.argmin(cand.cost[ok])]
            return cand.choice[pick]

        best = cheapest(config.recall, greedy_choice)
        if self.option_cost[g_all, best].sum() > greedy_cost:
            best = greedy_choice
        full = np.full(num_groups, self.full_option)
        return best, [cheapest(level, full) for level in config.front_levels]

    def _solution(
        self,
        option_recall: np.ndarray,  # [S, G, O]
        choice: np.ndarray,  # [G]
        greedy_choice: np.ndarray,  # [G]
        front_choices: list[np.ndarray],
        config: SolverConfig,
    ) -> HeadSolution:
        """Choices -> patterns, exact costs and recalls; dense wherever it is no dearer."""
        g_all = np.arange(len(self.groups))
        dense_cost = self.cost_model.dense_cost

        def measured(option: np.ndarray) -> tuple[HeadPattern, float, float, np.ndarray]:
            cost = float(self.option_cost[g_all, option].sum()) + self.cost_model.constant
            if cost >= dense_cost:
                recall = option_recall[:, g_all, self.full_option].sum(axis=1)  # [S]
                return HeadPattern.dense(), dense_cost, 1.0, recall
            density = float(self.option_density[g_all, option].sum())
            recall = option_recall[:, g_all, option].sum(axis=1)  # [S]
            return pattern_of(option, self.options, self.groups), cost, density, recall

        pattern, cost, density, recall = measured(choice)
        greedy_pattern, greedy_cost, _, _ = measured(greedy_choice)
        front: list[FrontPoint] = []
        for level, option in zip(config.front_levels, front_choices, strict=True):
            p, c, d, r = measured(option)
            if not front or p != front[-1].pattern:
                front.append(FrontPoint(level, float(r.mean()), float(r.min()), c, d, p))
        return HeadSolution(
            pattern=pattern,
            cost=cost,
            density=density,
            sample_recall=recall,
            greedy_pattern=greedy_pattern,
            greedy_cost=greedy_cost,
            front=tuple(front),
        )


def _running_max_mask(values: np.ndarray) -> np.ndarray:
    """[..., O] -> bool: entries above the running max of the entries before them."""
    best_before = np.maximum.accumulate(values, axis=-1)
    best_before = np.concatenate(
        [np.full((*values.shape[:-1], 1), -np.inf), best_before[..., :-1]], axis=-1
    )
    return values > best_before + 1e-12
