"""Procedural data of the tiny model: the grammar, the splits, and detector agreement."""

import pytest
import torch

from compact_search.models.tiny import data
from compact_search.models.tiny.detector import detect, detect_batch, score_detections


def test_detector_agrees_with_generator_on_ground_truth():
    specs = data.sample_scene_specs(400, torch.Generator().manual_seed(11), split="all")
    score = score_detections(detect_batch(data.render_scenes(specs)), specs)
    assert score.all_three >= 0.99, score


def test_occluded_scenes_are_drawn_and_still_detected():
    specs = data.sample_scene_specs(400, torch.Generator().manual_seed(12), split="all")
    occluded = [s for s in specs if s.occluded]
    assert len(occluded) >= 40
    score = score_detections(detect_batch(data.render_scenes(occluded)), occluded)
    assert score.all_three >= 0.97, score


def test_detector_finds_nothing_in_a_background_only_video():
    spec = data.sample_scene_specs(1, torch.Generator().manual_seed(3))[0]
    video = data.render_scenes([spec])[0]
    background_only = video.clamp(max=0.5)  # [3, F, H, W], no bright saturated pixel left
    assert detect(background_only).colour is None


def test_training_split_never_shows_held_out_triples():
    generator = torch.Generator().manual_seed(5)
    train = data.sample_scene_specs(500, generator, split="train")
    held_out = data.sample_scene_specs(100, generator, split="held_out")
    assert all((s.colour, s.shape, s.direction) not in data.HELD_OUT_TRIPLES for s in train)
    assert all((s.colour, s.shape, s.direction) in data.HELD_OUT_TRIPLES for s in held_out)
    # Every colour, shape and direction still appears in training.
    assert {s.colour for s in train} == set(data.OBJECT_COLOURS)
    assert {s.shape for s in train} == set(data.SHAPES)
    assert {s.direction for s in train} == set(data.DIRECTIONS)


def test_render_shape_range_and_determinism():
    specs_a = data.sample_scene_specs(8, torch.Generator().manual_seed(9))
    specs_b = data.sample_scene_specs(8, torch.Generator().manual_seed(9))
    assert specs_a == specs_b
    video = data.render_scenes(specs_a)
    assert video.shape == (8, 3, data.NUM_FRAMES, data.HEIGHT, data.WIDTH)
    assert float(video.min()) >= 0.0 and float(video.max()) <= 1.0
    assert torch.equal(video, data.render_scenes(specs_b))


def test_prompt_names_every_attribute():
    spec = data.SceneSpec(
        colour="red",
        shape="circle",
        direction="left",
        speed="quickly",
        texture="striped",
        tint="blue",
        pan="up",
        occluded=True,
        size=5.0,
        start_x=20.0,
        start_y=16.0,
        texture_period=6.0,
        stripes_vertical=True,
        bar_position=10.0,
    )
    assert spec.prompt == (
        "a red circle moves left quickly over a striped blue background "
        "while the camera pans up, passing behind a grey bar"
    )


def test_scene_spec_rejects_unknown_values():
    with pytest.raises(ValueError, match="colour"):
        data.SceneSpec(
            "purple",
            "circle",
            "left",
            "slowly",
            "plain",
            "grey",
            "still",
            False,
            5.0,
            16.0,
            16.0,
            6.0,
            True,
            0.0,
        )


@pytest.mark.parametrize("axis_directions", [("left", "right"), ("up", "down")])
def test_positions_do_not_reveal_the_direction(axis_directions):
    """Opposite directions cover the same positions (the path midpoint is direction-free), so
    where the object is in one frame says little about its direction: frame order must."""
    specs = data.sample_scene_specs(3000, torch.Generator().manual_seed(5), split="all")
    midpoints: dict[str, list[float]] = {d: [] for d in axis_directions}
    for spec in specs:
        if spec.direction not in midpoints:
            continue
        dx, dy = data.DIRECTIONS[spec.direction]
        half_travel = data.SPEEDS[spec.speed] * (data.NUM_FRAMES - 1) / 2
        start = spec.start_x if dx else spec.start_y
        midpoints[spec.direction].append(start + (dx or dy) * half_travel)
    first, second = (torch.tensor(midpoints[d]) for d in axis_directions)
    assert len(first) > 300 and len(second) > 300
    assert abs(first.mean() - second.mean()) < 0.5
    assert abs(first.min() - second.min()) < 1.0 and abs(first.max() - second.max()) < 1.0
    # Every path stays in frame.
    extent = data.WIDTH if axis_directions[0] == "left" else data.HEIGHT
    for spec in specs:
        if spec.direction in axis_directions:
            dx, dy = data.DIRECTIONS[spec.direction]
            start = spec.start_x if dx else spec.start_y
            end = start + (dx or dy) * data.SPEEDS[spec.speed] * (data.NUM_FRAMES - 1)
            assert spec.size < min(start, end) and max(start, end) < extent - spec.size
