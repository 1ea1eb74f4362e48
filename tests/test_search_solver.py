"""Offset tables, the per-head solvers and the greedy baseline, on planted and random heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_search.geometry import Grid, TileLayout
from compact_search.patterns import FrameGroup, HeadPattern, Rect, density, recall
from compact_search.search import optimize_head, solve_head
from compact_search.search.offsets import (
    WINDOW_TIERS,
    CostModel,
    WindowOptions,
    group_rect_sums,
    recall_tables,
)
from compact_search.search.solver import LayerSolver, SolverConfig
from compact_search.search.synthetic import (
    FAR_KINDS,
    PLANTED_KINDS,
    planted_pattern,
    planted_tile_mass,
)

TILE_GRID = Grid(6, 5, 8)
TAU = 0.9


def random_mass(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mass = torch.rand(shape, generator=gen) ** 4  # peaky rows
    return mass / mass.sum(-1, keepdim=True)


@st.composite
def windows(draw, height: int = 4, width: int = 5):
    """Near windows, bands and wrapped windows that fit a height x width tile grid."""
    wrap = tuple(a for a in ("h", "w") if draw(st.booleans()) and draw(st.booleans()))
    end_h = draw(st.integers(0, height // 2 if "h" in wrap else height - 1))
    end_w = draw(st.integers(0, width // 2 if "w" in wrap else width - 1))
    start_h = draw(st.integers(0, end_h)) if draw(st.booleans()) else 0
    start_w = draw(st.integers(0, end_w)) if draw(st.booleans()) else 0
    return Rect(end_h, end_w, start_h, start_w, wrap)


patterns_strategy = st.lists(
    st.tuples(st.integers(1, 3), st.lists(windows(), max_size=2)),
    min_size=1,
    max_size=3,
)


def build_pattern(spec) -> HeadPattern:
    groups, start = [], 0
    for length, rects in spec:
        groups.append(FrameGroup(start, start + length, tuple(rects)))
        start += length
    return HeadPattern(tuple(groups))


@settings(max_examples=40, deadline=None)
@given(spec=patterns_strategy, seed=st.integers(0, 10))
def test_offset_tables_match_masks(spec, seed):
    """Table sums equal recall, density and kernel cost computed on the full tile mask."""
    tile_grid = Grid(4, 4, 5)
    layout = TileLayout((7, 15, 18), (2, 4, 4), block_size=16, prefix_tokens=20)
    assert layout.tile_grid == tile_grid
    pattern = build_pattern(spec)
    mask = pattern.tile_mask(tile_grid)
    mass = random_mass((3, tile_grid.num_tokens, tile_grid.num_tokens), seed)
    table = recall_tables(mass, tile_grid)  # [3, Ft, Ht, Wt]
    kept = kept_offsets(pattern, tile_grid)
    np.testing.assert_allclose((table * kept).sum((1, 2, 3)), recall(mask, mass).mean, atol=1e-6)
    cost_model = CostModel.from_layout(layout)
    cost = (cost_model.per_offset * kept).sum() + cost_model.constant
    assert cost == pytest.approx(float(layout.cost(mask)), abs=1e-9)
    dense_only = CostModel.density_only(tile_grid)
    assert (dense_only.per_offset * kept).sum() == pytest.approx(float(density(mask)), abs=1e-6)
    # The dense pattern costs the padded full mask the kernel runs, not the unpadded 1.0.
    full = torch.ones(tile_grid.num_tokens, tile_grid.num_tokens, dtype=torch.bool)
    assert cost_model.dense_cost == pytest.approx(float(layout.cost(full)), abs=1e-9)
    assert cost_model.dense_cost > 1.0  # 7x15x18 in 2x4x4 tiles pads its 16-token blocks


def kept_offsets(pattern: HeadPattern, tile_grid: Grid) -> np.ndarray:
    """[Ft, Ht, Wt] bool: the offsets a pattern keeps, straight from its definition."""
    ft, ht, wt = tile_grid.as_tuple()
    kept = np.zeros((ft, ht, wt), dtype=bool)
    d_h, d_w = np.arange(ht), np.arange(wt)
    for group in pattern.groups:
        for rect in group.rects:
            dist_h = np.minimum(d_h, ht - d_h) if "h" in rect.wrap else d_h
            dist_w = np.minimum(d_w, wt - d_w) if "w" in rect.wrap else d_w
            in_h = (dist_h >= rect.h_from) & (dist_h <= rect.height)
            in_w = (dist_w >= rect.w_from) & (dist_w <= rect.width)
            kept[group.start : min(group.stop, ft)] |= in_h[:, None] & in_w[None, :]
    return kept


def test_near_tier_is_the_classic_family():
    """None, every near window and every crossing pair, at the greedy baseline's indices."""
    options = WindowOptions(3, 4, max_options=31)
    assert options.count == 1 + 12 + 3 * 6
    assert options.tiers == ["near"]
    assert options.windows[1 + 2 * 4 + 3] == (Rect(2, 3),)
    assert WindowOptions(3, 4).tiers == list(WINDOW_TIERS)


@pytest.mark.parametrize("shape", [(3, 4), (4, 4), (2, 5), (1, 3), (5, 6)], ids=str)
def test_option_values_match_their_windows(shape):
    """Every option's O(1) box sum equals the table summed over its windows' kept offsets, and
    no two options keep the same offsets."""
    ht, wt = shape
    options = WindowOptions(ht, wt)
    tile_grid = Grid(2, ht, wt)
    table = np.random.default_rng(0).random((3, 2, ht, wt))  # [S, Ft, Ht, Wt]
    values = options.values(group_rect_sums(table, ((0, 2),)))[:, 0]  # [S, O]
    kept_sets = set()
    for o, rects in enumerate(options.windows):
        kept = kept_offsets(HeadPattern((FrameGroup(0, 2, rects),)), tile_grid)
        kept_sets.add(kept.tobytes())
        np.testing.assert_allclose(values[:, o], (table * kept).sum((1, 2, 3)), atol=1e-12)
    assert len(kept_sets) == options.count


def test_tiers_join_whole_within_the_budget():
    full = WindowOptions(4, 4)
    assert full.count <= 3000 and full.tiers == list(WINDOW_TIERS)
    smaller = WindowOptions(4, 4, max_options=400)
    assert smaller.tiers == ["near", "wrapped", "half-wrapped"]
    assert smaller.windows == full.windows[: smaller.count]
    assert all(r.h_from == 0 and r.w_from == 0 for rects in smaller.windows for r in rects)


def brute_force_cost(table, cost_table, cuts, tau, mean_over_samples):
    """Cheapest option combination by enumeration (tiny grids only)."""
    tile_grid = Grid(*cost_table.shape)
    solver = LayerSolver(CostModel(tile_grid, cost_table, 0.0, 1.0), cuts)
    option_recall = solver.options.values(group_rect_sums(table, solver.groups))  # [S, G, O]
    assert len(solver.groups) == 2
    # every pair of options of the two groups: [S, O, O]
    recall_sum = option_recall[:, 0, :, None] + option_recall[:, 1, None, :]
    cost = solver.option_cost[0][:, None] + solver.option_cost[1][None, :]
    measure = recall_sum.mean(0) if mean_over_samples else recall_sum.min(0)
    feasible = cost[measure >= tau - 1e-9]
    return min(float(feasible.min()) if feasible.size else np.inf, 1.0)


@pytest.mark.parametrize("mean_over_samples", [True, False], ids=["mean", "every-sample"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_solver_matches_brute_force(seed, mean_over_samples):
    tile_grid = Grid(3, 3, 3)
    mass = random_mass((3, tile_grid.num_tokens, tile_grid.num_tokens), seed)
    tables = recall_tables(mass, tile_grid)
    cost_model = CostModel.density_only(tile_grid)
    config = SolverConfig(0.8, mean_over_samples)
    solver = LayerSolver(cost_model, (1,))
    exact = solver.solve(tables[None], config, exact=True)[0]
    fast = solver.solve(tables[None], config)[0]
    expected = brute_force_cost(tables, cost_model.per_offset, (1,), 0.8, mean_over_samples)
    if mean_over_samples:
        assert exact.cost == pytest.approx(expected, abs=1e-9)
    assert expected - 1e-9 <= exact.cost <= 1.05 * expected
    assert expected - 1e-9 <= fast.cost <= 1.1 * expected
    for solution in (exact, fast):
        mask = solution.pattern.tile_mask(tile_grid)
        kept = recall(mask, mass).mean
        measure = kept.mean() if mean_over_samples else kept.min()
        assert measure >= 0.8 - 1e-6
        assert solution.cost <= solution.greedy_cost + 1e-12


@pytest.fixture(scope="module")
def planted():
    """Five planted heads (one per kind), 4 noisy samples each, 95% of mass on the pattern."""
    patterns = [planted_pattern(kind, TILE_GRID) for kind in PLANTED_KINDS]
    inside = torch.tensor([0.95, 0.95, 0.95, 0.95])
    mass = planted_tile_mass(
        patterns, TILE_GRID, inside, noise=0.5, generator=torch.Generator().manual_seed(7)
    )  # [S, H, nq, nk]
    return patterns, mass


@pytest.mark.parametrize("kind", PLANTED_KINDS)
def test_optimize_head_recovers_planted_heads(planted, kind):
    patterns, mass = planted
    h = PLANTED_KINDS.index(kind)
    head_mass = mass[:, h]  # [S, nq, nk]
    planted_cost = float(density(patterns[h].tile_mask(TILE_GRID)))
    assert recall(patterns[h].tile_mask(TILE_GRID), head_mass).mean.min() >= 0.95 - 1e-5
    solution = solve_head(head_mass, TILE_GRID, TAU, n_trials=40, seed=0)
    mask = solution.pattern.tile_mask(TILE_GRID)
    found = recall(mask, head_mass).mean  # [S]
    assert found.min() >= TAU - 1e-6, f"{kind}: recall {found.tolist()} below {TAU}"
    assert solution.cost == pytest.approx(float(density(mask)), abs=1e-6)
    assert solution.cost <= 1.1 * planted_cost, f"{kind}: {solution.cost} vs {planted_cost}"
    assert solution.cost <= solution.greedy_cost + 1e-12
    assert optimize_head(head_mass, TILE_GRID, TAU, n_trials=40, seed=0) == solution.pattern


def test_optimize_head_mean_over_samples_is_never_dearer(planted):
    _, mass = planted
    every = solve_head(mass[:, 3], TILE_GRID, TAU, n_trials=10)
    mean = solve_head(mass[:, 3], TILE_GRID, TAU, n_trials=10, mean_over_samples=True)
    assert mean.cost <= every.cost + 1e-12
    assert recall(mean.pattern.tile_mask(TILE_GRID), mass[:, 3]).mean.mean() >= TAU - 1e-6


def test_optimize_head_with_layout_counts_blocks():
    """With a layout the cost is the kernel's block cost, prefix and padding included."""
    layout = TileLayout((12, 10, 16), (2, 2, 2), block_size=8, prefix_tokens=8)
    tile_grid = layout.tile_grid
    patterns = [planted_pattern("local", tile_grid)]
    mass = planted_tile_mass(patterns, tile_grid, torch.tensor([0.95, 0.95]))[:, 0]
    solution = solve_head(mass, tile_grid, TAU, n_trials=5, layout=layout)
    assert solution.cost == pytest.approx(float(layout.cost(solution.pattern.tile_mask(tile_grid))))


def test_unreachable_threshold_gives_dense():
    mass = random_mass((2, TILE_GRID.num_tokens, TILE_GRID.num_tokens), 0)
    assert optimize_head(mass, TILE_GRID, 1.0, n_trials=3).is_dense


def test_fast_solver_close_to_exact_on_many_heads():
    """The vectorised solver the model search uses stays within 10% of the exact one."""
    kinds = [planted_pattern(k, TILE_GRID, s) for k in PLANTED_KINDS for s in (0.7, 1.3)]
    inside = torch.tensor([0.97, 0.93, 0.9, 0.95])
    mass = planted_tile_mass(kinds, TILE_GRID, inside, generator=torch.Generator().manual_seed(3))
    tables = np.moveaxis(recall_tables(mass, TILE_GRID), 0, 1)  # [H, S, ...]
    solver = LayerSolver(CostModel.density_only(TILE_GRID), (1, 3))
    config = SolverConfig(0.85)
    fast = solver.solve(tables, config)
    exact = solver.solve(tables, config, exact=True)
    costs = solver.head_costs(tables, config)
    for h, (f, e) in enumerate(zip(fast, exact, strict=True)):
        assert f.sample_recall.min() >= 0.85 - 1e-9
        assert f.cost <= 1.1 * e.cost + 1e-9
        assert f.cost <= f.greedy_cost + 1e-12
        assert costs[h] == pytest.approx(f.cost)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 1000),
    tau=st.floats(0.3, 0.99),
    cuts=st.sampled_from([(), (1,), (2,), (1, 2)]),
    mean_over_samples=st.booleans(),
)
def test_solvers_always_meet_the_constraint(seed, tau, cuts, mean_over_samples):
    """On random heads both solvers return patterns that really keep tau (checked on the
    full masks) and never cost more than greedy."""
    tile_grid = Grid(3, 3, 4)
    mass = random_mass((2, 3, tile_grid.num_tokens, tile_grid.num_tokens), seed)  # [H, S, ...]
    tables = recall_tables(mass, tile_grid)
    solver = LayerSolver(CostModel.density_only(tile_grid), cuts)
    config = SolverConfig(tau, mean_over_samples)
    for exact in (False, True):
        for h, solution in enumerate(solver.solve(tables, config, exact=exact)):
            kept = recall(solution.pattern.tile_mask(tile_grid), mass[h]).mean
            measure = kept.mean() if mean_over_samples else kept.min()
            assert measure >= tau - 1e-5
            assert solution.cost <= solution.greedy_cost + 1e-12
            greedy_kept = recall(solution.greedy_pattern.tile_mask(tile_grid), mass[h]).mean
            greedy_measure = greedy_kept.mean() if mean_over_samples else greedy_kept.min()
            assert greedy_measure >= tau - 1e-5


FAR_GRID = Grid(5, 4, 4)  # 4 x 4 tiles a frame, as the built-in model's demo tile


@pytest.mark.parametrize("kind", FAR_KINDS)
def test_optimize_head_recovers_far_heads(kind):
    """Heads that attend the opposite edge or a ring: found at <= 1.1x the planted cost,
    never dearer than greedy, while the near windows alone pay far more."""
    pattern = planted_pattern(kind, FAR_GRID)
    assert pattern.uses_far_windows
    mass = planted_tile_mass(
        [pattern], FAR_GRID, torch.full((4,), 0.95), generator=torch.Generator().manual_seed(5)
    )[:, 0]  # [S, nq, nk]
    planted_cost = float(density(pattern.tile_mask(FAR_GRID)))
    solution = solve_head(mass, FAR_GRID, TAU, n_trials=10, seed=0)
    assert recall(solution.pattern.tile_mask(FAR_GRID), mass).mean.min() >= TAU - 1e-6
    assert solution.cost <= 1.1 * planted_cost, f"{kind}: {solution.cost} vs {planted_cost}"
    assert solution.cost <= solution.greedy_cost + 1e-12
    near_only = solve_head(mass, FAR_GRID, TAU, n_trials=10, seed=0, max_options=1)
    assert near_only.cost > 1.2 * planted_cost
