"""The adapter registry and its plug-ins: built-in sources, loading, running, fidelity, prompts."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, uniform_config
from compact_search.errors import UserInputError
from compact_search.evaluate import evaluate_config, evaluation_prompts
from compact_search.geometry import Grid, TileShape
from compact_search.models.adapters import (
    builtin_sources,
    get_adapter,
    load_model,
    source_identity,
)
from compact_search.models.tiny.builtin import heldout_prompts, score_fidelity, tiny_loaded_model
from compact_search.models.tiny.data import (
    prompt_attributes,
    render_scenes,
    sample_scene_specs,
)
from compact_search.models.tiny.pipeline import TinyModelConfig, TinyVideoPipeline, build_models
from compact_search.patterns import HeadPattern
from compact_search.profiling import load_run_profile

RANDOM_PROFILE = """
name = "random"
[model]
source = "builtin:tiny-random"
adapter = "{adapter}"
dtype = "float32"
[sampling]
height = 16
width = 16
frames = 4
steps = 3
guidance = 4.0
prompts = ["a red circle moves left slowly over a plain grey background", "anything at all"]
seeds = [5]
[capture]
steps = [1]
tiles = [[1, 4, 4]]
"""


def random_profile(tmp_path, adapter: str = "wan"):
    path = tmp_path / "random.toml"
    path.write_text(RANDOM_PROFILE.format(adapter=adapter))
    return load_run_profile(path)


def small_pipeline(num_layers: int = 2, seed: int = 0) -> TinyVideoPipeline:
    torch.manual_seed(seed)
    config = TinyModelConfig(
        num_layers=num_layers, num_heads=2, head_dim=32, ffn_dim=64, num_frames=2, height=8, width=8
    )
    transformer, text_encoder = build_models(config)
    return TinyVideoPipeline(config, transformer, text_encoder)


def test_the_built_in_models_are_registered_by_the_wan_adapter():
    assert builtin_sources() == {"builtin:tiny": "wan", "builtin:tiny-random": "wan"}
    assert get_adapter("wan").builtin("builtin:tiny").source == "builtin:tiny"
    assert get_adapter("cogvideox").builtin("builtin:tiny") is None


def test_a_built_in_source_under_another_adapter_is_one_line(tmp_path):
    with pytest.raises(UserInputError, match=r"model\.adapter: builtin:tiny-random is a model of "):
        random_profile(tmp_path, adapter="cogvideox")


def test_source_identity_keeps_the_values_earlier_captures_recorded(tmp_path):
    """Captures store sha256(run profile : source identity) to refuse resuming over other
    weights; the identity is the same bytes as before the registry owned it."""
    from compact_search.models.tiny.pipeline import CONFIG_FILE, WEIGHTS_DIR

    assert (
        source_identity("builtin:tiny-random") == hashlib.sha256(b"builtin:tiny-random").hexdigest()
    )
    shipped = b"builtin:tiny" + (WEIGHTS_DIR / CONFIG_FILE).read_bytes()
    assert source_identity("builtin:tiny") == hashlib.sha256(shipped).hexdigest()
    folder = tmp_path / "pipe"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "vae" / "weights.bin").write_bytes(b"\0" * 10)
    expected = hashlib.sha256(str(folder).encode())
    expected.update(b"model_index.json:{}")
    expected.update(b"vae/weights.bin:10")
    assert source_identity(str(folder)) == expected.hexdigest()


def test_tiny_random_loads_at_the_run_profile_size_and_reports_its_steps(tmp_path):
    settings = random_profile(tmp_path)
    model = load_model(settings, torch.device("cpu"))
    assert model.adapter is get_adapter("wan") and model.output == "video"
    assert model.grid == Grid(4, 8, 8)
    assert (model.num_layers, model.num_heads, model.head_dim) == (6, 4, 64)
    steps = []
    videos = model.run(
        ["a red circle moves left"], seed=1, num_steps=3, guidance_scale=4.0, on_step=steps.append
    )
    assert steps == [0, 1, 2, 3] and videos.shape == (1, 3, 4, 16, 16)
    assert videos.min() >= 0 and videos.max() <= 1


def test_an_exception_in_on_step_stops_sampling_there():
    model = tiny_loaded_model(get_adapter("wan"), small_pipeline())
    calls = []

    def attention(layer, q, k, v):
        calls.append(layer)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def stop_at_one(step: int) -> None:
        if step == 1:
            raise KeyboardInterrupt

    with model.install(attention), pytest.raises(KeyboardInterrupt):
        model.run(["x"], seed=0, num_steps=5, guidance_scale=4.0, on_step=stop_at_one)
    assert calls == [0, 1]  # step 0 only: one batched guidance call through both layers


def test_install_routes_every_transformer_and_reverts_exactly():
    first, second = small_pipeline(seed=0), small_pipeline(seed=1)
    adapter = get_adapter("wan")
    model = dataclasses.replace(
        tiny_loaded_model(adapter, first), transformers=(first.transformer, second.transformer)
    )
    modules = [m for t in model.transformers for m in adapter.attention_modules(t)]
    originals = [m.processor for m in modules]
    seen = []
    with model.install(lambda layer, q, k, v: seen.append(layer) or q):
        assert all(m.processor is not o for m, o in zip(modules, originals, strict=True))
        for pipeline in (first, second):
            pipeline(["x"], num_steps=1, guidance_scale=1.0)
    assert seen == [0, 1, 0, 1]
    assert [m.processor for m in modules] == originals
    with pytest.raises(ValueError, match="attention differs"):
        dataclasses.replace(model, transformers=(first.transformer, small_pipeline(3).transformer))


def test_fidelity_reads_the_prompt_grammar_and_scores_ground_truth_videos():
    specs = sample_scene_specs(6, torch.Generator().manual_seed(3), split="all")
    videos = render_scenes(specs)  # [6, 3, F, H, W]: what the prompts describe, exactly
    prompts = [spec.prompt for spec in specs]
    report = score_fidelity(videos, prompts)
    assert report.correct == [True] * 6 and report.scores["all_three"] == 1.0
    assert report.scores["count"] == 6
    swapped = score_fidelity(videos.flip(0), prompts)
    wrong = [
        spec for spec, back in zip(specs, specs[::-1], strict=True) if spec.colour != back.colour
    ]
    assert wrong and swapped.scores["colour"] < 1.0
    assert prompt_attributes("a red circle moves left").direction == "left"
    assert prompt_attributes("a fox runs") is None
    assert score_fidelity(videos[:1], ["a fox runs"]) is None


def test_evaluation_prompts_are_the_plug_ins_held_out_ones_or_the_run_profiles(tmp_path):
    settings = random_profile(tmp_path)
    model = tiny_loaded_model(get_adapter("wan"), small_pipeline())
    specs = sample_scene_specs(3, torch.Generator().manual_seed(1234), split="held_out")
    assert heldout_prompts(3, 1234) == [s.prompt for s in specs]  # what evaluate sampled before
    assert evaluation_prompts(model, settings.prompts, 3, 1234) == [s.prompt for s in specs]
    bare = dataclasses.replace(model, heldout_prompts=None)
    assert evaluation_prompts(bare, settings.prompts, 1, 1234) == [settings.prompts[0]]


def test_evaluate_refuses_a_pipeline_that_returns_latents():
    model = dataclasses.replace(
        tiny_loaded_model(get_adapter("wan"), small_pipeline()), output="latent"
    )
    config = uniform_config(
        ModelSpec("tiny-random", "wan", 2, 2, 32),
        GeometrySpec(model.grid, TileShape(1, 4, 4), block_size=16),
        StepSchedule(num_steps=2, dense_steps=0, bucket_starts=(0,)),
        HeadPattern.dense(),
    )
    with pytest.raises(UserInputError, match="evaluate compares videos.*returns latents"):
        evaluate_config(model, config, ["x"])


def test_evaluate_cli_names_rescale_and_rescale_runs(tmp_path, capsys):
    """A config for another token grid: one line that names --rescale (exit 2); with --rescale
    the shipped model runs it and says what rescaling does to recall."""
    from cli_runner import run

    config = uniform_config(
        ModelSpec("builtin:tiny", "wan", 6, 4, 64),
        GeometrySpec(Grid(8, 8, 8), TileShape(2, 4, 4), block_size=32),
        StepSchedule(num_steps=2, dense_steps=1, bucket_starts=(1,)),
        HeadPattern.local(1, 1, 1),
    )
    path = tmp_path / "other-grid.json"
    path.write_text(json.dumps(config.to_json()))
    common = ("evaluate", "--config", path, "--prompts", "1", "--steps", "2", "--guidance", "1")
    common += ("--out", tmp_path)
    capsys.readouterr()
    assert run(*common) == 2
    error = capsys.readouterr().err
    assert "compact-search evaluate --rescale" in error and len(error.strip().splitlines()) == 1
    assert run(*common, "--rescale", "--format", "table") == 0
    assert "rescaled from grid" in capsys.readouterr().out
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["extra"]["notes"] and report["dense_fidelity"] is not None
