"""Model-level search on synthetic profiles: study, result file, report, budget, resume, CLI."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from cli import app
from compact_search.geometry import Grid, TileLayout
from compact_search.patterns import density, recall
from compact_search.search import (
    BudgetTarget,
    SearchConfig,
    load_search_result,
    optimize_profile,
)
from compact_search.search.run import apply_budget
from compact_search.search.study import frame_cuts, schedule_of
from compact_search.search.synthetic import (
    FAR_KINDS,
    PLANTED_KINDS,
    SyntheticProfile,
    planted_pattern,
)

REPO = Path(__file__).resolve().parents[1]


def small_profile(**overrides) -> SyntheticProfile:
    settings = dict(
        grid=(16, 24, 32),
        tiles=[(2, 6, 8), (4, 4, 8)],
        num_layers=3,
        num_heads=4,
        num_steps=20,
        steps=(2, 6, 10, 14, 18),
    )
    return SyntheticProfile(**{**settings, **overrides})


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    profile = small_profile()
    config = SearchConfig(n_trials=8, workers=1, seed=0)
    return profile, run_dir, optimize_profile(profile, run_dir, config)


def test_every_head_meets_recall_and_beats_greedy(searched):
    profile, _, result = searched
    tile_grid = Grid(*result.tile_grid)
    assert len(result.heads) == len(result.buckets) * 3 * 4
    for bucket_index, bucket in enumerate(result.buckets):
        for layer in range(3):
            mass = profile.sample_tile_mass(layer, result.tile, list(bucket.steps))
            for head in range(4):
                found = result.head(bucket_index, layer, head)
                kept = recall(found.pattern.tile_mask(tile_grid), mass[:, head])
                assert kept.mean.min() >= result.recall - 1e-6
                assert found.recall_min == pytest.approx(float(kept.mean.min()), abs=1e-5)
                assert found.recall_worst_tile == pytest.approx(float(kept.worst.min()), abs=1e-5)
                assert found.cost <= found.greedy_cost + 1e-12
                if not found.pattern.is_dense:
                    mask = found.pattern.tile_mask(tile_grid)
                    assert found.density == pytest.approx(float(density(mask)), abs=1e-6)
                levels = [entry.level for entry in found.front]
                assert levels == sorted(levels)
                assert all(e.recall_min >= e.level - 1e-6 for e in found.front)
                lower = found.at_recall(0.8)
                assert lower.recall_min >= 0.8 - 1e-6
                assert lower.cost <= found.at_recall(result.recall).cost + 1e-12


def test_result_file_and_report(searched):
    _, run_dir, result = searched
    assert load_search_result(run_dir) == result
    for name in ("heads.csv", "heads.md", "pareto.png", "kinds.png", "study.db"):
        assert (run_dir / name).stat().st_size > 0, name
    assert result.dense_steps <= result.buckets[0].start
    assert result.buckets[-1].stop == result.num_steps
    assert all(a.stop == b.start for a, b in zip(result.buckets, result.buckets[1:], strict=False))
    assert 0 < result.objective <= 1


def test_search_is_seeded_and_resumes_from_storage(searched, tmp_path):
    """Same storage and config: finished trials are kept and only the missing ones run."""
    profile, run_dir, result = searched
    more = optimize_profile(profile, run_dir, SearchConfig(n_trials=10, workers=1, seed=0))
    assert more.study["trials_completed"] == 10
    assert more.objective <= result.objective + 1e-12


def test_budget_mode_hits_target_density(searched):
    _, _, result = searched
    target = 0.9 * float(np.mean([h.density for h in result.heads]))
    budgeted = apply_budget(result, BudgetTarget(target))
    weights = np.array([b.stop - b.start for b in budgeted.buckets], dtype=float)
    weights /= weights.sum()
    per_bucket = [
        np.mean([h.density for h in budgeted.heads if h.bucket == b])
        for b in range(len(budgeted.buckets))
    ]
    assert float(np.dot(weights, per_bucket)) <= target + 1e-9
    assert budgeted.budget["reached"] <= target + 1e-9


def test_schedule_needs_a_profiled_step_in_every_bucket():
    schedule, violation = schedule_of(0, [2], [2, 6, 10, 14], 2, 20)
    assert violation == 0
    assert schedule.bounds == ((0, 8), (8, 20))
    assert schedule.samples == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert schedule_of(7, [1], [2, 6, 10, 14], 2, 20)[0] is None  # bucket 0 lost its steps
    assert schedule_of(0, [2, 2], [2, 6, 10, 14], 1, 20)[0] is None  # an empty bucket


def test_schedule_with_a_searched_warm_up():
    """The warm-up steps become bucket 0 at their own threshold, when a profiled step is in
    them; with none there they stay dense."""
    schedule, _ = schedule_of(7, [], [2, 6, 10, 14], 2, 20, warmup_recall=0.97)
    assert schedule.dense_steps == 0
    assert schedule.bounds == ((0, 7), (7, 20))
    assert schedule.samples == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert schedule.recall == (0.97, None)
    dense, _ = schedule_of(2, [], [2, 6, 10, 14], 2, 20, warmup_recall=0.97)
    assert dense.dense_steps == 2 and dense.bounds == ((2, 20),) and not dense.recall
    # the default: sparse for a warm-up of given length, dense for a searched one
    assert SearchConfig(dense_steps=6).warmup_recall == 0.97
    assert SearchConfig().warmup_recall is None
    assert SearchConfig(dense_steps=6, warmup_recall=None).warmup_recall is None


def test_sparse_warm_up_end_to_end(tmp_path):
    """--warmup-recall: bucket 0 covers the warm-up, its heads keep the higher threshold on its
    samples (or stay dense), the model costs less than with a dense warm-up, export writes the
    per-bucket thresholds and check gates bucket 0 at its own."""
    from compact_search.check import check_config
    from compact_search.config import CompactConfig, HeadEntry
    from compact_search.export import build_config, measure

    profile = small_profile(num_layers=1, steps=(2, 6, 10, 14))
    common = dict(
        n_trials=2, workers=1, num_buckets=1, dense_steps=8, max_options=109, tiles=((4, 4, 8),)
    )
    dense = optimize_profile(
        profile, tmp_path / "dense", SearchConfig(warmup_recall=None, **common)
    )
    sparse = optimize_profile(
        profile, tmp_path / "sparse", SearchConfig(warmup_recall=0.97, **common)
    )
    assert dense.dense_steps == 8 and dense.buckets[0].start == 8
    assert sparse.dense_steps == 0
    assert [(b.start, b.stop, b.steps, b.recall) for b in sparse.buckets][0] == (0, 8, (2, 6), 0.97)
    assert sparse.bucket_recall(1) == 0.9
    assert sparse.objective < dense.objective
    tile_grid = Grid(*sparse.tile_grid)
    mass = profile.sample_tile_mass(0, sparse.tile, [2, 6])
    for head in range(4):
        found = sparse.head(0, 0, head)
        kept = recall(found.pattern.tile_mask(tile_grid), mass[:, head]).mean
        assert kept.min() >= 0.97 - 1e-6
    config, below = measure(build_config(sparse, profile), sparse, profile)
    assert not below
    assert config.schedule.bucket_recall == (0.97, 0.9) and config.version == 2
    assert check_config(config, profile).passed
    # a bucket-0 head that keeps 0.9 but not 0.97 fails the gate at 0.97 and passes at 0.9
    layer, head, weak = next(
        (h.layer, h.head, e.pattern)
        for h in sparse.heads
        if h.bucket == 0
        for e in h.front
        if 0.9 <= e.recall_min < 0.97 - 1e-3
    )
    heads = [list(row) for row in config.heads[0]]
    heads[layer][head] = HeadEntry(weak)
    edited = CompactConfig(
        config.model,
        config.geometry,
        config.schedule,
        (tuple(tuple(row) for row in heads), *config.heads[1:]),
        config.provenance,
    )
    report = check_config(edited, profile, statistic="min")
    assert [(h.bucket, h.layer, h.head) for h in report.failed_heads] == [(0, layer, head)]
    assert report.bucket_recall == {0: 0.97, 1: 0.9}
    assert check_config(edited, profile, statistic="min", min_recall=0.9).passed


def test_frame_cuts():
    assert frame_cuts(1, "geometric", 6) == ()
    assert frame_cuts(6, "linear", 6) == frame_cuts(9, "geometric", 6) == (1, 2, 3, 4, 5)
    assert frame_cuts(3, "linear", 21) == (7, 14)
    for groups in range(1, 9):
        for spacing in ("geometric", "linear"):
            cuts = frame_cuts(groups, spacing, 7)
            assert len(cuts) == min(groups, 7) - 1
            assert list(cuts) == sorted(set(cuts)) and all(0 < c < 7 for c in cuts)


def test_planted_heads_at_model_level_cost_at_most_planted(tmp_path):
    """With the finest frame groups every planted head, the far ones (opposite edge, ring)
    included, is found at <= 1.1x its planted cost and never dearer than greedy."""
    profile = small_profile(
        diffuse_until=0.0, steps=(10, 14, 18), num_heads=6, kinds=PLANTED_KINDS + FAR_KINDS
    )
    assert {k for row in profile.head_kinds for k, _ in row} >= set(FAR_KINDS)
    config = SearchConfig(n_trials=2, workers=1, num_buckets=1, dense_steps=0, tiles=((2, 6, 8),))
    result = optimize_profile(profile, tmp_path, config)
    layout = TileLayout(profile.grid, result.tile, block_size=config.block_size)
    tile_grid = Grid(*result.tile_grid)
    for head in result.heads:
        kind, scale = profile.head_kinds[head.layer][head.head]
        planted = planted_pattern(kind, tile_grid, scale).tile_mask(tile_grid)
        assert head.cost <= 1.1 * float(layout.cost(planted)), (kind, head.cost)
        assert head.cost <= head.greedy_cost + 1e-12


def test_two_workers_and_journal_storage_agree_with_one(tmp_path):
    profile = small_profile(num_layers=2)
    # the near and wrapped windows only: this test is about workers, not the window family
    config = SearchConfig(n_trials=3, workers=1, dense_steps=0, tiles=((2, 6, 8),), max_options=109)
    one = optimize_profile(profile, tmp_path / "one", config)
    two = optimize_profile(
        profile,
        tmp_path / "two",
        SearchConfig(n_trials=3, workers=2, dense_steps=0, tiles=((2, 6, 8),), max_options=109),
        storage=f"journal:{tmp_path / 'journal.log'}",
    )
    assert [h.cost for h in one.heads] == pytest.approx([h.cost for h in two.heads])


KILLED_SEARCH = textwrap.dedent(
    """
    import sys
    from compact_search.search import SearchConfig, optimize_profile
    from compact_search.search.synthetic import SyntheticProfile

    if __name__ == "__main__":
        profile = SyntheticProfile(
            grid=(16, 24, 32), tiles=[(2, 6, 8)], num_layers=2, num_heads=3, num_steps=20,
            steps=(2, 6, 10, 14, 18),
        )
        config = SearchConfig(n_trials=100000, workers=1, max_options=109)
        optimize_profile(profile, sys.argv[1], config)
    """
)


def completed_trials(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as connection:
            rows = connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'")
            return rows.fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def test_killed_search_resumes_without_losing_trials(tmp_path):
    script = tmp_path / "search.py"
    script.write_text(KILLED_SEARCH)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, str(script), str(run_dir)], env=env)
    db = run_dir / "study.db"
    deadline = time.monotonic() + 90
    while completed_trials(db) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = completed_trials(db)
    assert before >= 3, "the search did not finish three trials before the kill"
    profile = SyntheticProfile(
        grid=(16, 24, 32), tiles=[(2, 6, 8)], num_layers=2, num_heads=3, num_steps=20,
        steps=(2, 6, 10, 14, 18),
    )  # fmt: skip
    config = SearchConfig(n_trials=before + 2, workers=1, max_options=109)
    result = optimize_profile(profile, run_dir, config)
    assert result.study["trials_completed"] == before + 2
    study = optuna.load_study(study_name=result.study["name"], storage=f"sqlite:///{db}")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == before + 2


def test_cli_rejects_bad_input(tmp_path):
    runner = CliRunner()
    both = runner.invoke(
        app,
        ["optimize", str(tmp_path), "--out", str(tmp_path / "run"), "--target-density", "0.3",
         "--target-cost", "0.3"],
    )  # fmt: skip
    assert both.exit_code != 0
    missing = subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", "optimize", str(tmp_path / "nowhere"),
         "--out", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 2
    assert "error" in missing.stderr
