"""Wan2.2's two experts: a saved random-weight WanPipeline with `transformer_2` and a
`boundary_ratio`, taken through profile -> optimize -> export -> check -> apply.

The pipeline runs `transformer` at timesteps >= boundary_ratio x 1000 and `transformer_2` below.
With UniPC (flow shift 3) over 6 steps the timesteps are 999, 937, 857, 750, 600, 376, so at
boundary_ratio 0.8 steps 0-2 run the high-noise expert and 3-5 the low-noise one; the profile
captures steps 0, 2 (first expert) and 4 (second).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from cli_runner import run
from test_real_pipeline_folder import (
    CASES,
    HELD_OUT,
    PROMPTS,
    SIZE,
    STEPS,
    build_wan,
    profile_toml,
)

import compact_search
from compact_search.config import CompactConfig, load_config
from compact_search.errors import ConfigError, UserInputError
from compact_search.models.adapters import get_adapter, load_model
from compact_search.profiling import load_profile, load_run_profile

BOUNDARY_RATIO = 0.8
FIRST, SECOND = (0, 1, 2), (3, 4, 5)  # the steps each expert runs
WAN = CASES[0]
EXPERTS = ("transformer", "transformer_2")


def build_wan22(folder: Path) -> None:
    """build_wan's pipeline plus a second expert (other random weights) and the boundary."""
    build_wan(folder)
    pipe = diffusers.WanPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    torch.manual_seed(1)
    second = diffusers.WanTransformer3DModel.from_config(pipe.transformer.config)
    pipe = diffusers.WanPipeline(
        **{k: v for k, v in pipe.components.items() if k != "transformer_2"},
        transformer_2=second,
        boundary_ratio=BOUNDARY_RATIO,
    )
    pipe.save_pretrained(folder)


def expert_toml(folder: Path, name: str, prompts_file: str, seed: int) -> str:
    """The folder test's profile without its whole-frame tile (a tile grid of 3x1x1 keeps
    everything): the search can only find sparsity with tiles smaller than a frame."""
    text = profile_toml(WAN, folder, name, prompts_file, seed)
    return text.replace("[[1, 4, 4], [3, 4, 4], [1, 8, 8]]", "[[1, 4, 4], [3, 4, 4]]")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wan22")
    build_wan22(root / "pipe")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "heldout.txt").write_text("\n".join(HELD_OUT) + "\n")
    (root / "model.toml").write_text(expert_toml(root / "pipe", "wan22", "prompts.txt", 0))
    (root / "heldout.toml").write_text(
        expert_toml(root / "pipe", "wan22-heldout", "heldout.txt", 100)
    )
    assert run("profile", root / "model.toml", "--out", root / "runs/model/profile") == 0
    assert run("profile", root / "heldout.toml", "--out", root / "runs/heldout/profile") == 0
    search = ("--trials", "4", "--workers", "1", "--block-size", "16", "--recall", "0.9")
    assert (
        run("optimize", root / "runs/model/profile", "--out", root / "runs/model/run", *search) == 0
    )
    assert run("export", root / "runs/model/run", "--out", root / "config.json") == 0
    return root


def load_pipeline(root: Path) -> diffusers.WanPipeline:
    pipe = diffusers.WanPipeline.from_pretrained(str(root / "pipe"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> np.ndarray:
    return (
        pipe(
            PROMPTS[0],
            height=SIZE["height"],
            width=SIZE["width"],
            num_frames=SIZE["frames"],
            num_inference_steps=STEPS,
            guidance_scale=WAN.guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",  # the VAE's decode adds time, not coverage
        )
        .frames[0]
        .numpy()
    )


def test_the_loader_hands_over_both_experts_and_their_steps(workspace):
    model = load_model(load_run_profile(workspace / "model.toml"), torch.device("cpu"))
    assert model.experts == EXPERTS
    assert model.transformers == (model.pipeline.transformer, model.pipeline.transformer_2)
    assert model.expert_of_steps(STEPS) == ("transformer",) * 3 + ("transformer_2",) * 3
    # 4 steps: timesteps 999, 900, 750, 500
    assert model.expert_of_steps(4) == ("transformer",) * 2 + ("transformer_2",) * 2


def test_profile_captures_each_expert_on_its_steps(workspace):
    profile = load_profile(workspace / "runs/model/profile")
    assert profile.step_experts == ["transformer"] * 3 + ["transformer_2"] * 3
    assert profile.experts == list(EXPERTS) and profile.steps == [0, 2, 4]
    first, second = (profile.expert_view(name) for name in EXPERTS)
    assert (first.steps, second.steps) == ([0, 2], [4])
    assert len({profile.fingerprint, first.fingerprint, second.fingerprint}) == 3
    mass = second.sample_tile_mass(1, tile=(1, 4, 4))  # [S = 1 step x 2 prompts, H, 12, 12]
    assert mass.shape == (2, 2, 12, 12) and torch.isfinite(mass).all()
    with pytest.raises(UserInputError, match="no expert 'transformer_3'"):
        profile.expert_view("transformer_3")
    late = dataclasses.replace(profile, step_experts=["transformer"] * 5 + ["transformer_2"])
    with pytest.raises(UserInputError, match="transformer_2 runs steps 5..5 and none of them"):
        late.expert_view("transformer_2")


def test_profile_records_the_expert_that_runs_each_step(workspace):
    """The tile mass of step 4 comes from transformer_2: recomputed with transformer_2 given
    transformer's weights, the capture changes at step 4 only."""
    from compact_search.profiling.capture import run_profile

    settings = load_run_profile(workspace / "model.toml")
    original = load_profile(workspace / "runs/model/profile")
    pipe = load_pipeline(workspace)
    swapped = workspace / "swapped"
    pipe.transformer_2.load_state_dict(pipe.transformer.state_dict())
    pipe.save_pretrained(swapped)
    settings = type(settings).from_json({**settings.to_json(), "source": str(swapped)})
    result = run_profile(settings, workspace / "runs/swapped", progress=False)
    changed = load_profile(result.path)
    for step, same in ((0, True), (2, True), (4, False)):
        a = original.sample_tile_mass(1, tile=(1, 4, 4), steps=[step])
        b = changed.sample_tile_mass(1, tile=(1, 4, 4), steps=[step])
        assert torch.equal(a, b) is same, step


def test_a_step_on_another_expert_than_predicted_fails_in_one_line(workspace, monkeypatch):
    from compact_search.models import diffusers_folder
    from compact_search.profiling.capture import run_profile

    monkeypatch.setattr(
        diffusers_folder, "boundary_experts", lambda pipe, count, num_steps: (0,) * num_steps
    )
    settings = load_run_profile(workspace / "model.toml")
    with pytest.raises(UserInputError, match="step 3 ran on transformer_2, but the model says"):
        run_profile(settings, workspace / "runs/mispredicted", progress=False)


def test_optimize_searches_each_expert_on_its_own_steps(workspace):
    run_dir = workspace / "runs/model/run"
    first = json.loads((run_dir / "search.json").read_text())
    second = json.loads((run_dir / "expert-transformer_2/search.json").read_text())
    assert first["study"]["expert"] == "transformer"
    assert first["study"]["experts"] == {"transformer_2": "expert-transformer_2"}
    assert second["study"]["expert"] == "transformer_2"
    first_steps = [s for b in first["buckets"] for s in b["steps"]]
    second_steps = [s for b in second["buckets"] for s in b["steps"]]
    assert set(first_steps) <= {0, 2} and second_steps == [4]


def test_export_writes_both_experts_and_check_gates_both(workspace):
    config = load_config(workspace / "config.json")
    assert list(config.expert_configs()) == list(EXPERTS)
    assert json.loads((workspace / "config.json").read_text())["version"] == 3
    second = config.experts["transformer_2"]
    assert second.geometry.grid == config.geometry.grid
    for expert in config.expert_configs().values():
        entries = [e for bucket in expert.heads for layer in bucket for e in layer]
        assert all(e.stats["recall_min"] >= 0.9 - 1e-6 for e in entries if "recall_min" in e.stats)
    held_out = workspace / "runs/heldout/profile"
    report_path = workspace / "check.json"
    args = ("--format", "json", "--output", report_path)
    assert run("check", "--config", workspace / "config.json", "--profile", held_out, *args) == 0
    report = json.loads(report_path.read_text())
    assert report["passed"] and set(report["experts"]) == {"transformer_2"}
    assert {h["expert"] for h in report["heads"]} == {"transformer"}
    assert {h["expert"] for h in report["experts"]["transformer_2"]["heads"]} == {"transformer_2"}
    # A profile of one transformer cannot gate a config of two.
    from compact_search.check import check_config

    with pytest.raises(UserInputError, match="the profile is of one transformer"):
        check_config(
            load_config(workspace / "config.json"),
            load_profile(held_out).expert_view("transformer"),
        )


def test_export_precision_fp8_holds_for_every_expert(workspace, capsys):
    path = workspace / "fp8.json"
    capsys.readouterr()
    assert run("export", workspace / "runs/model/run", "--out", path, "--precision", "fp8") == 0
    captured = capsys.readouterr()
    assert "precision fp8" in captured.out
    # The search's block size 16 is not an 8-bit kernel's: the export says the runtime runs bf16.
    assert "precision fp8 at block size 16" in captured.err and "as bf16" in captured.err
    written = json.loads(path.read_text())
    assert written["precision"] == "fp8"
    assert [e.get("precision") for e in written["experts"]] == [None]  # set once, at the top
    config = load_config(path)
    assert list(config.expert_configs()) == list(EXPERTS)
    assert {c.precision for c in config.expert_configs().values()} == {"fp8"}
    assert load_config(workspace / "config.json").precision == "bf16"


def test_check_fails_a_second_expert_that_misses_its_recall(workspace, capsys):
    """Gating the second expert is not a formality: with its patterns replaced by a skipping
    pattern it fails, while the first expert's heads still pass."""
    from compact_search.check import check_config
    from compact_search.config import HeadEntry
    from compact_search.patterns import HeadPattern

    config = load_config(workspace / "config.json")
    second = config.experts["transformer_2"]
    own = HeadPattern.local(0, 0, 0)  # the query tile alone
    heads = tuple(
        tuple(tuple(HeadEntry(own) for _ in layer) for layer in bucket) for bucket in second.heads
    )
    broken = CompactConfig(second.model, second.geometry, second.schedule, heads, second.provenance)
    report = check_config(
        config.with_experts({"transformer_2": broken}),
        load_profile(workspace / "runs/heldout/profile"),
    )
    assert not report.passed
    assert report.failed_heads and {h.expert for h in report.failed_heads} == {"transformer_2"}
    # The command: exit 1, the failing heads named by expert in the table and in JUnit.
    path = workspace / "broken.json"
    path.write_text(json.dumps(config.with_experts({"transformer_2": broken}).to_json()))
    held_out = workspace / "runs/heldout/profile"
    capsys.readouterr()
    assert run("check", "--config", path, "--profile", held_out) == 1
    out = capsys.readouterr().out
    checked, failed = len(report.all_heads), len(report.failed_heads)
    assert checked == len(report.heads) + len(report.experts["transformer_2"].heads)
    assert f"FAIL: {checked - failed}/{checked} heads pass" in out
    assert "transformer_2: mean density" in out
    junit = workspace / "check.xml"
    args = ("--format", "junit", "--output", junit)
    assert run("check", "--config", path, "--profile", held_out, *args) == 1
    text = junit.read_text()
    assert (
        'name="bucket0.layer0.head0"' in text
        and 'name="transformer_2.bucket0.layer0.head0"' in text
    )


def test_apply_installs_both_experts_and_reverts_both(workspace):
    pipe = load_pipeline(workspace)
    attention = get_adapter("wan").attention_modules
    originals = {name: [m.processor for m in attention(getattr(pipe, name))] for name in EXPERTS}
    dense = generate(pipe)

    handle = compact_search.apply(pipe, str(workspace / "config.json"))
    seen = {name: [] for name in EXPERTS}  # the step each expert's handle assigns to its calls
    hooks = [
        getattr(pipe, name).register_forward_pre_hook(
            lambda _m, _a, name=name: seen[name].append(handle.handles[name].tracker.step)
        )
        for name in EXPERTS
    ]
    video = generate(pipe)
    for hook in hooks:
        hook.remove()
    installed = {name: [m.processor for m in attention(getattr(pipe, name))] for name in EXPERTS}
    handle.revert()

    assert seen == {"transformer": [0, 0, 1, 1, 2, 2], "transformer_2": [3, 3, 4, 4, 5, 5]}
    for name, steps in zip(EXPERTS, (FIRST, SECOND), strict=True):
        expert = handle.handles[name]
        schedule = expert.config.schedule
        dense_calls = sum(schedule.bucket_for_step(s, STEPS) is None for s in steps) * 2
        assert expert.calls == {"dense": dense_calls * 2, "sparse": (6 - dense_calls) * 2}
        assert all(p not in originals[name] for p in installed[name])
    assert handle.handles["transformer_2"].calls["sparse"] > 0
    assert np.isfinite(video).all() and np.abs(video - dense).max() > 1e-3
    for name in EXPERTS:
        assert [m.processor for m in attention(getattr(pipe, name))] == originals[name]
    assert np.array_equal(generate(pipe), dense)


def one_expert_config(workspace) -> Path:
    """The first expert's patterns alone: a config as exported for a one-transformer model."""
    config = load_config(workspace / "config.json")
    path = workspace / "first-only.json"
    path.write_text(json.dumps(config.with_experts({}).to_json()))
    return path


def test_a_one_transformer_config_says_which_expert_stays_dense(workspace):
    pipe = load_pipeline(workspace)
    path = one_expert_config(workspace)
    assert json.loads(path.read_text())["version"] < 3
    with pytest.raises(UserInputError, match="transformer_2 stays dense") as info:
        compact_search.apply(pipe, str(path))
    assert "\n" not in str(info.value) and "dense_experts=True" in str(info.value)
    attention = get_adapter("wan").attention_modules
    second = [m.processor for m in attention(pipe.transformer_2)]
    with pytest.warns(UserWarning, match="transformer_2 stays dense"):
        handle = compact_search.apply(pipe, str(path), dense_experts=True)
    assert handle.notes == [
        "compact-search: the config holds patterns for transformer only; transformer_2 stays dense"
    ]
    assert list(handle.handles) == ["transformer"]
    assert [m.processor for m in attention(pipe.transformer_2)] == second
    generate(pipe)
    handle.revert()
    assert handle.calls["sparse"] > 0


def test_a_one_transformer_config_is_checked_on_its_expert_steps(workspace):
    from compact_search.check import check_config

    config = load_config(one_expert_config(workspace))
    report = check_config(config, load_profile(workspace / "runs/heldout/profile"))
    assert report.passed and not report.experts
    assert report.samples_per_bucket and sum(report.samples_per_bucket.values()) <= 2 * 2
    assert any("transformer_2" in note and "stay dense" in note for note in report.notes)


def test_a_config_of_experts_needs_version_3_and_a_pipeline_with_them(workspace):
    obj = json.loads((workspace / "config.json").read_text())
    with pytest.raises(ConfigError, match="experts: needs config version 3"):
        CompactConfig.from_json({**obj, "version": 2}, "c.json")
    renamed = json.loads(json.dumps(obj))
    renamed["experts"][0]["transformer"] = "transformer"
    with pytest.raises(ConfigError, match=r"experts\[0\].transformer"):
        CompactConfig.from_json(renamed, "c.json")
    broken = json.loads(json.dumps(obj))
    del broken["experts"][0]["schedule"]
    with pytest.raises(ConfigError, match=r"c.json: experts\[0\]: schedule: missing"):
        CompactConfig.from_json(broken, "c.json")
    config = load_config(workspace / "config.json")
    assert CompactConfig.from_json(config.to_json()).to_json() == config.to_json()
    wan21 = diffusers.WanPipeline.from_pretrained(
        str(workspace / "pipe"), transformer_2=None, boundary_ratio=None
    )
    with pytest.raises(UserInputError, match="transformer_2, which this WanPipeline does not"):
        compact_search.apply(wan21, config)
    # One expert's patterns on a bare transformer: that expert's config.
    handle = compact_search.apply(wan21.transformer, config.expert_configs()["transformer_2"])
    assert handle.config.schedule == config.experts["transformer_2"].schedule
    handle.revert()


def test_a_pipeline_without_step_callback_or_guidance_argument_is_followed(workspace, monkeypatch):
    """HunyuanVideo 1.5's pipeline takes neither `callback_on_step_end` nor `guidance_scale`
    (its guider holds the scale): the loader then counts the scheduler's steps and hands the
    guider the profile's scale for the call. Exercised on this folder with both hidden."""
    from diffusers import ClassifierFreeGuidance

    from compact_search.models import diffusers_folder

    real = diffusers_folder.call_parameters
    monkeypatch.setattr(
        diffusers_folder,
        "call_parameters",
        lambda pipe: real(pipe) - {"callback_on_step_end", "guidance_scale"},
    )
    model = load_model(load_run_profile(workspace / "model.toml"), torch.device("cpu"))
    guider = ClassifierFreeGuidance(guidance_scale=1.0)
    model.pipeline.guider = guider
    steps, scales = [], []

    def on_step(step: int) -> None:
        steps.append(step)
        scales.append(model.pipeline.guider.guidance_scale)

    latents = model.run(PROMPTS[:1], seed=0, num_steps=4, guidance_scale=3.5, on_step=on_step)
    assert steps == [0, 1, 2, 3, 4] and scales[1:] == [3.5] * 4
    assert model.pipeline.guider is guider and "step" not in model.pipeline.scheduler.__dict__
    assert torch.isfinite(latents).all()


def test_evaluate_runs_both_experts_of_the_exported_config(workspace):
    """`evaluate` on the two-expert folder: apply installs both experts, so the second expert's
    patterns change the video too (a copy of the config whose second expert keeps every key
    gives another PSNR; were the second expert left dense, the two would agree)."""
    from compact_search.config import HeadEntry, save_config
    from compact_search.evaluate import EvaluateOptions, run_evaluation
    from compact_search.patterns import HeadPattern

    config = load_config(workspace / "config.json")
    second = config.experts["transformer_2"]
    dense_heads = tuple(
        tuple(tuple(HeadEntry(HeadPattern.dense()) for _ in layer) for layer in bucket)
        for bucket in second.heads
    )
    second_dense = dataclasses.replace(second, heads=dense_heads)
    save_config(config.with_experts({"transformer_2": second_dense}), workspace / "first-only.json")
    settings = load_run_profile(workspace / "model.toml")
    (workspace / "one.txt").write_text(HELD_OUT[0] + "\n")
    both, first_only = run_evaluation(
        settings,
        [workspace / "config.json", workspace / "first-only.json"],
        workspace / "evaluate",
        torch.device("cpu"),
        EvaluateOptions(prompts_file=workspace / "one.txt", seeds=(3,)),
    ).reports
    assert math.isfinite(both.mean_psnr_db) and math.isfinite(first_only.mean_psnr_db)
    assert both.mean_psnr_db != pytest.approx(first_only.mean_psnr_db, abs=1e-3)
