"""The config's `precision` field: old configs load as bf16, fp8 and int8 round-trip, bad values
fail in one line naming the field, experts share the top level's precision."""

import json
from pathlib import Path

import pytest

from compact_search.config import (
    PRECISIONS,
    CompactConfig,
    GeometrySpec,
    ModelSpec,
    StepSchedule,
    load_config,
    save_config,
    uniform_config,
)
from compact_search.errors import ConfigError, UserInputError
from compact_search.geometry import Grid, TileShape
from compact_search.patterns import HeadPattern
from compact_search.runtime.apply import rescale_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-default.json"


def small_config(precision="bf16") -> CompactConfig:
    config = uniform_config(
        ModelSpec("m", "wan", 2, 3, 64),
        GeometrySpec(Grid(3, 8, 8), TileShape(1, 4, 4), block_size=64),
        StepSchedule(num_steps=6, dense_steps=1, bucket_starts=(1, 4)),
        [HeadPattern.local(0, 0, 0), HeadPattern.dense(), HeadPattern.local(1, 1, 0)],
    )
    return config if precision == "bf16" else config.with_precision(precision)


def test_the_config_names_the_runtimes_precisions():
    from compact_search.runtime.attention import PRECISIONS as RUNTIME_PRECISIONS

    assert PRECISIONS == RUNTIME_PRECISIONS


def test_a_config_without_the_field_loads_as_bf16_and_is_written_back_unchanged(tmp_path):
    text = DEFAULT_CONFIG.read_text()
    assert "precision" not in text
    config = load_config(DEFAULT_CONFIG)
    assert config.precision == "bf16" and config.version == 1
    save_config(config, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(text)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_8_bits_round_trip_at_the_same_version(tmp_path, precision):
    config = small_config(precision)
    obj = config.to_json()
    assert obj["precision"] == precision and obj["version"] == small_config().version == 1
    assert list(obj)[:3] == ["format", "version", "precision"]
    save_config(config, tmp_path / "c.json")
    loaded = load_config(tmp_path / "c.json")
    assert loaded == config and loaded.precision == precision
    # Written as bf16 explicitly, it loads as the same config as without the field.
    explicit = {**small_config().to_json(), "precision": "bf16"}
    assert CompactConfig.from_json(explicit) == small_config()


@pytest.mark.parametrize("value", ["int4", "FP8", "", 8, None, ["fp8"]])
def test_a_bad_precision_in_a_file_is_one_line_naming_the_field(tmp_path, value):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**small_config().to_json(), "precision": value}))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message == f"{path}: precision: expected one of bf16, fp8, int8, got {value!r}"
    assert "\n" not in message


@pytest.mark.parametrize("value", ["fp16", "INT8", None])
def test_a_bad_precision_in_code_is_refused(value):
    with pytest.raises(UserInputError, match="precision must be one of bf16, fp8, int8"):
        CompactConfig(*_fields(small_config()), precision=value)
    with pytest.raises(UserInputError, match="precision must be one of bf16, fp8, int8"):
        small_config().with_precision(value)


def _fields(config):
    return config.model, config.geometry, config.schedule, config.heads, config.provenance


def test_experts_share_the_top_level_precision():
    fp8 = small_config("fp8")
    both = fp8.with_experts({"transformer_2": fp8})
    assert {name: c.precision for name, c in both.expert_configs().items()} == {
        "transformer": "fp8",
        "transformer_2": "fp8",
    }
    obj = both.to_json()
    assert obj["version"] == 3 and obj["precision"] == "fp8"
    assert "precision" not in obj["experts"][0]  # once, at the top level
    assert CompactConfig.from_json(obj) == both
    assert CompactConfig.from_json(obj).experts["transformer_2"].precision == "fp8"
    # with_precision changes every expert at once
    back = both.with_precision("bf16")
    assert [c.precision for c in back.expert_configs().values()] == ["bf16", "bf16"]
    assert "precision" not in back.to_json()


def test_an_expert_with_its_own_precision_is_refused():
    with pytest.raises(UserInputError, match="expert 'transformer_2' has precision 'fp8'"):
        small_config().with_experts({"transformer_2": small_config("fp8")})
    obj = small_config("fp8").with_experts({"transformer_2": small_config("fp8")}).to_json()
    obj["experts"][0]["precision"] = "fp8"
    with pytest.raises(ConfigError, match=r"c.json: experts\[0\].precision: set once, at the top"):
        CompactConfig.from_json(obj, "c.json")


def test_rescaling_keeps_the_precision():
    rescaled, _note = rescale_config(small_config("fp8"), Grid(6, 8, 8))
    assert rescaled.precision == "fp8" and rescaled.geometry.grid == Grid(6, 8, 8)
