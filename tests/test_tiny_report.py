"""Head-structure report: the minimal-density rule, and trained vs random weights."""

import pytest
import torch

from compact_search.models.tiny import load_tiny_pipeline
from compact_search.models.tiny.pipeline import shift_times
from compact_search.models.tiny.report import (
    head_structure_report,
    min_density_for_recall,
    random_weights_pipeline,
)
from compact_search.profiling import attention_tile_mass


def test_uniform_rows_need_the_recall_share_and_one_hot_rows_need_one_tile_each():
    uniform = torch.full((10, 10), 0.1)
    one_hot = torch.eye(10)
    assert float(min_density_for_recall(uniform, 0.9)) == pytest.approx(0.9)
    assert float(min_density_for_recall(one_hot, 0.9)) == pytest.approx(0.09)


def test_global_threshold_spends_tiles_where_mass_is():
    # Row 0 puts all mass on one tile, row 1 spreads it; recall 0.75 needs row 0's tile (0.5)
    # and half of row 1 (two of four tiles): 3 of 8 pairs. A fixed per-row top-k would need 4.
    mass = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert float(min_density_for_recall(mass, 0.75)) == pytest.approx(3 / 8)


def test_batched_heads_are_independent():
    mass = torch.stack([torch.eye(4), torch.full((4, 4), 0.25)])  # [H=2, 4, 4]
    assert min_density_for_recall(mass, 1.0).tolist() == [0.25, 1.0]


def test_time_shift_keeps_the_ends_and_moves_times_towards_noise():
    t = torch.linspace(0, 1, 11)
    shifted = shift_times(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > t[1:-1]).all()
    assert torch.equal(shift_times(t, 1.0), t)


def test_trained_heads_are_sparser_and_more_varied_than_random_heads():
    torch.set_num_threads(2)
    trained = load_tiny_pipeline("cpu")
    options = {
        "num_prompts": 1,
        "capture_steps": (0,),
        "num_steps": 1,
        "tile_mass_fn": attention_tile_mass,
    }
    learned = head_structure_report(trained, label="trained", **options)
    untrained = head_structure_report(random_weights_pipeline(trained), label="random", **options)
    assert learned.densities.shape == (6, 4)
    assert learned.mean < untrained.mean - 0.15
    assert learned.spread > 0.5
    assert untrained.spread < 0.1
    assert not untrained.passes
