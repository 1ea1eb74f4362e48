"""Config round trip, every bad-config case, atomic writes."""

import json
import os

import pytest
import torch

from compact_search.config import (
    CompactConfig,
    GeometrySpec,
    HeadEntry,
    ModelSpec,
    StepSchedule,
    load_config,
    save_config,
    uniform_config,
)
from compact_search.errors import ConfigError, UserInputError
from compact_search.geometry import Grid, TileShape
from compact_search.patterns import FrameGroup, HeadPattern, Rect

MODEL = ModelSpec("toy", "wan", num_layers=2, num_heads=3, head_dim=64)
GEOMETRY = GeometrySpec(Grid(5, 9, 10), TileShape(2, 4, 4), block_size=32)  # tile grid 3x3x3
SCHEDULE = StepSchedule(num_steps=10, dense_steps=3, bucket_starts=(3, 7))
PATTERNS = [
    HeadPattern.dense(),
    HeadPattern.local(1, 1, 1),
    HeadPattern((FrameGroup(0, 1, (Rect(2, 0), Rect(0, 2))), FrameGroup(1, 3))),
]


@pytest.fixture
def config_file(tmp_path):
    config = uniform_config(MODEL, GEOMETRY, SCHEDULE, PATTERNS)
    path = tmp_path / "config.json"
    save_config(config, path)
    return path


def edit(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))
    return path


def test_round_trip(config_file):
    config = load_config(config_file)
    assert config.model == MODEL
    assert config.geometry == GEOMETRY
    assert config.schedule == SCHEDULE
    assert [config.pattern(1, 1, h) for h in range(3)] == PATTERNS
    assert CompactConfig.from_json(config.to_json()) == config
    masks = config.block_masks(0, 0)
    layout = GEOMETRY.layout()
    assert masks.shape == (3, layout.num_blocks, layout.num_blocks)
    assert masks[0].sum() == (layout.block_lengths > 0).sum() ** 2  # dense head


def test_schedule_buckets_and_rescaling():
    assert [SCHEDULE.bucket_for_step(s) for s in range(10)] == [None] * 3 + [0] * 4 + [1] * 3
    # a 20-step run maps by trajectory position: step 6 of 20 is position 3 of 10
    assert SCHEDULE.bucket_for_step(5, run_steps=20) is None
    assert SCHEDULE.bucket_for_step(6, run_steps=20) == 0
    assert SCHEDULE.bucket_for_step(14, run_steps=20) == 1
    assert SCHEDULE.bucket_range(1) == (7, 10)


def test_summary_reports_density_and_cost(config_file):
    summary = load_config(config_file).summary()
    assert 0 < summary["mean_density"] < 1
    assert summary["mean_cost"] > 0


BAD_EDITS = [
    ("format", lambda o: o.update(format="other"), "format: expected 'compact-search/config'"),
    ("version", lambda o: o.update(version=4), "version: expected 1, 2 or 3, got 4"),
    ("heads", lambda o: o["buckets"][0]["layers"][1].pop(), r"layers\[1\]: expected 3 heads"),
    ("layers", lambda o: o["model"].update(num_layers=3), r"buckets\[0\].layers: expected 3"),
    ("buckets", lambda o: o["buckets"].pop(), "buckets: expected 2 buckets"),
    ("grid", lambda o: o["geometry"].update(grid=[5, 9]), "geometry.grid: expected a list of 3"),
    (
        "kind",
        lambda o: o["buckets"][0]["layers"][0][0].update(pattern={"kind": "diagonal"}),
        "unknown pattern kind",
    ),
    (
        "negative-window",
        lambda o: o["buckets"][0]["layers"][0][1]["pattern"]["groups"][0].update(rects=[[-1, 1]]),
        "height must be an integer >= 0",
    ),
    (
        "oversize-window",
        lambda o: o["buckets"][0]["layers"][0][1]["pattern"]["groups"][0].update(rects=[[3, 1]]),
        "dh end 3 exceeds the largest tile distance 2",
    ),
    ("schedule", lambda o: o["schedule"].update(dense_steps=12), "dense_steps must be in"),
    (
        "band-in-v1",
        lambda o: o["buckets"][0]["layers"][0][1]["pattern"]["groups"][0].update(
            rects=[{"dh": [1, 2], "dw": [0, 1]}]
        ),
        "band or wrapped windows need config version 2",
    ),
    (
        "bucket-recall-in-v1",
        lambda o: o["schedule"].update(bucket_recall=[0.97, 0.9]),
        "schedule.bucket_recall: needs config version 2",
    ),
    (
        "bucket-recall-length",
        lambda o: o.update(version=2) or o["schedule"].update(bucket_recall=[0.97]),
        "bucket_recall needs one threshold per bucket",
    ),
    ("missing", lambda o: o.pop("model"), "model: missing"),
    # the reader's integer minimum, before anything else sees the value
    (
        "head-dim-0",
        lambda o: o["model"].update(head_dim=0),
        "model.head_dim: expected an integer >= 1, got 0",
    ),
    (
        "heads-0",
        lambda o: o["model"].update(num_heads=0),
        "model.num_heads: expected an integer >= 1, got 0",
    ),
    (
        "block-size-0",
        lambda o: o["geometry"].update(block_size=0),
        "geometry.block_size: expected an integer >= 1, got 0",
    ),
    (
        "prefix-negative",
        lambda o: o["geometry"].update(prefix_tokens=-1),
        "geometry.prefix_tokens: expected an integer >= 0, got -1",
    ),
    (
        "tile-0",
        lambda o: o["geometry"].update(tile=[2, 0, 4]),
        r"geometry.tile\[1\]: expected an integer >= 1, got 0",
    ),
    (
        "bool-head-dim",
        lambda o: o["model"].update(head_dim=True),
        "model.head_dim: expected an integer, got True",
    ),
    (
        "stats",
        lambda o: o["buckets"][0]["layers"][0][0].update(stats={"recall_mean": "high"}),
        "expected a finite number",
    ),
]


@pytest.mark.parametrize(("name", "change", "message"), BAD_EDITS, ids=[b[0] for b in BAD_EDITS])
def test_bad_configs_fail_in_one_line_naming_file_and_field(config_file, name, change, message):
    edit(config_file, change)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(config_file)
    text = str(info.value)
    assert str(config_file) in text and "\n" not in text


@pytest.mark.parametrize("content", ["", '{"format": "compact-search/config", "ver', "[1, 2]"])
def test_truncated_or_non_json(tmp_path, content):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(UserInputError, match=str(path)):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_config(tmp_path / "nope.json")


def test_interrupted_write_keeps_previous_file(config_file, monkeypatch):
    before = config_file.read_bytes()
    config = uniform_config(MODEL, GEOMETRY, SCHEDULE, HeadPattern.dense())

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UserInputError, match="No space left"):
        save_config(config, config_file)
    assert config_file.read_bytes() == before
    assert [p.name for p in config_file.parent.iterdir()] == ["config.json"]  # no temp left


def test_write_into_missing_or_read_only_folder(tmp_path, monkeypatch):
    config = uniform_config(MODEL, GEOMETRY, SCHEDULE, HeadPattern.dense())
    with pytest.raises(UserInputError, match="does not exist"):
        save_config(config, tmp_path / "missing" / "c.json")

    # CI runs as root, where permission bits do not stop writes: simulate the refusal.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(UserInputError, match="cannot write .*Permission denied"):
        save_config(config, tmp_path / "c.json")


def test_hand_built_config_mismatch():
    with pytest.raises(UserInputError, match="2 patterns for 3 heads"):
        uniform_config(MODEL, GEOMETRY, SCHEDULE, PATTERNS[:2])
    assert torch.equal(
        uniform_config(MODEL, GEOMETRY, SCHEDULE, PATTERNS).tile_masks(0, 0)[1],
        PATTERNS[1].tile_mask(Grid(3, 3, 3)),
    )


def test_versions_a_config_uses_the_lowest_that_expresses_it(tmp_path, config_file):
    """Near windows only: version 1, byte for byte what version-1 readers know. A band, a
    wrapped window or per-bucket thresholds: version 2, which this loader reads back."""
    assert json.loads(config_file.read_text())["version"] == 1
    far = HeadPattern((FrameGroup(0, 2, (Rect(1, 1, 0, 1, ("w",)), Rect(2, 0, 2))),))
    schedule = StepSchedule(10, 0, (0, 3, 7), bucket_recall=(0.97, 0.9, 0.9))
    for patterns, sched in ((PATTERNS[:2] + [far], SCHEDULE), (PATTERNS, schedule)):
        config = uniform_config(MODEL, GEOMETRY, sched, patterns)
        path = tmp_path / "v2.json"
        save_config(config, path)
        assert json.loads(path.read_text())["version"] == 2
        loaded = load_config(path)
        assert loaded == config
        assert torch.equal(loaded.tile_masks(0, 0), config.tile_masks(0, 0))
    assert load_config(path).schedule.recall_of(0, 0.9) == 0.97
    assert SCHEDULE.recall_of(0, 0.9) == 0.9


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ModelSpec("toy", "wan", 2, 3, 0), "model.head_dim must be an integer >= 1, got 0"),
        (lambda: ModelSpec("toy", "wan", 0, 3, 64), "model.num_layers must be an integer >= 1"),
        (lambda: ModelSpec("toy", "wan", 2, 2.0, 64), "model.num_heads must be an integer"),
        (lambda: ModelSpec("", "wan", 2, 3, 64), "model.name must be a non-empty string"),
        (
            lambda: GeometrySpec(Grid(5, 9, 10), TileShape(2, 4, 4), block_size=0),
            "geometry.block_size must be an integer >= 1, got 0",
        ),
        (
            lambda: GeometrySpec(Grid(5, 9, 10), TileShape(2, 4, 4), 32, prefix_tokens=-1),
            "geometry.prefix_tokens must be an integer >= 0, got -1",
        ),
        (
            lambda: GeometrySpec(Grid(5, 9, 10), TileShape(2, 4, 4), 32, prefix_at="middle"),
            "geometry.prefix_at must be 'start' or 'end'",
        ),
        (
            lambda: CompactConfig(
                MODEL, GEOMETRY, SCHEDULE, ((tuple(HeadEntry(p) for p in PATTERNS[:2]),) * 2,) * 2
            ),
            "bucket 0 layer 0: 2 heads, model has 3",
        ),
        (
            lambda: CompactConfig(
                MODEL, GEOMETRY, SCHEDULE, ((tuple(HeadEntry(p) for p in PATTERNS),) * 3,) * 2
            ),
            "bucket 0: 3 layers, model has 2",
        ),
        (
            lambda: CompactConfig(
                MODEL, GEOMETRY, SCHEDULE, ((tuple(HeadEntry(p) for p in PATTERNS),) * 2,)
            ),
            "1 buckets of patterns for 2 step buckets",
        ),
    ],
    ids=[
        "head-dim-0",
        "layers-0",
        "float-heads",
        "empty-name",
        "block-size-0",
        "prefix-negative",
        "prefix-at",
        "heads-per-layer",
        "layers-per-bucket",
        "buckets",
    ],
)
def test_configs_built_in_code_are_validated_like_the_json_reader(build, message):
    with pytest.raises(UserInputError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


def test_a_geometry_from_tuples_is_the_same_geometry():
    assert GeometrySpec((5, 9, 10), (2, 4, 4), block_size=32) == GEOMETRY
