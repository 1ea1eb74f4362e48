"""Wan2.2-I2V-A14B's layout through the Wan adapter: a saved random-weight
`WanImageToVideoPipeline` with two experts (`transformer`, `transformer_2`, switched at
`boundary_ratio`), no image encoder (Wan2.2 conditions on the image through the VAE only), and
transformers that read 2 x 4 latent channels + 4 mask channels: the noisy latents, the
first-frame mask the pipeline folds into `vae_scale_factor_temporal` channels, and the VAE
latents of the image followed by zero frames.

At 128x128, 9 frames the grid is 3x8x8 (build_wan's VAE and patch). UniPC (flow shift 3) over
6 steps at boundary_ratio 0.8 runs steps 0-2 on `transformer` and 3-5 on `transformer_2`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from cli_runner import run
from PIL import Image
from test_real_pipeline_folder import (
    CASES,
    GRID,
    HEAD_DIM,
    HEADS,
    HELD_OUT,
    LAYERS,
    PROMPTS,
    SIZE,
    build_wan,
    error_line,
    profile_toml,
)

import compact_search
from compact_search.config import (
    GeometrySpec,
    ModelSpec,
    StepSchedule,
    load_config,
    uniform_config,
)
from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape
from compact_search.models.adapters import get_adapter, load_model
from compact_search.patterns import HeadPattern
from compact_search.profiling import load_profile, load_run_profile

BOUNDARY_RATIO = 0.8
STEPS = 6
EXPERTS = ("transformer", "transformer_2")
EXPERT_STEPS = {"transformer": [0, 0, 1, 1, 2, 2], "transformer_2": [3, 3, 4, 4, 5, 5]}
GUIDANCE = 5.0


def build_wan22_i2v(folder: Path) -> None:
    """build_wan's text encoder, tokenizer, VAE and scheduler with two image-conditioned
    experts, saved as a WanImageToVideoPipeline without image encoder or image processor."""
    build_wan(folder)
    t2v = diffusers.WanPipeline.from_pretrained(str(folder))
    # Latents, the image's latents, and the mask of 4 (the VAE's temporal factor) channels.
    in_channels = 2 * t2v.vae.config.z_dim + t2v.vae_scale_factor_temporal
    experts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        experts.append(
            diffusers.WanTransformer3DModel.from_config(
                t2v.transformer.config, in_channels=in_channels
            )
        )
    pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=t2v.tokenizer,
        text_encoder=t2v.text_encoder,
        vae=t2v.vae,
        scheduler=t2v.scheduler,
        image_processor=None,
        image_encoder=None,
        transformer=experts[0],
        transformer_2=experts[1],
        boundary_ratio=BOUNDARY_RATIO,
    )
    pipe.save_pretrained(folder)


def conditioning_image(path: Path, seed: int = 0) -> Path:
    """A random RGB picture of the sampling size, saved as PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE["height"], SIZE["width"], 3))
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def no_ftfy():
    """diffusers' I2V pipeline cleans prompts with ftfy even when it is not installed (as
    here): an identity stands in."""
    from diffusers.pipelines.wan import pipeline_wan_i2v

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            pipeline_wan_i2v, "ftfy", SimpleNamespace(fix_text=lambda t: t), raising=False
        )
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wan22-i2v")
    build_wan22_i2v(root / "pipe")
    conditioning_image(root / "first-frame.png")
    return root


@pytest.fixture(scope="module")
def dense(workspace) -> np.ndarray:
    """The latents of the stock pipeline from the profile's picture."""
    latents = generate(load_pipeline(workspace), Image.open(workspace / "first-frame.png"))
    assert np.isfinite(latents).all()
    return latents


def load_pipeline(root: Path) -> diffusers.WanImageToVideoPipeline:
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(root / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, image: Image.Image) -> np.ndarray:
    """The denoised latents [C, F, H, W] (the VAE's decode adds time, not coverage)."""
    return (
        pipe(
            image=image,
            prompt=PROMPTS[0],
            height=SIZE["height"],
            width=SIZE["width"],
            num_frames=SIZE["frames"],
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
        .frames[0]
        .numpy()
    )


def both_experts_config(pattern: HeadPattern):
    """`pattern` on every head of both experts, no dense warm-up: every attention call of the
    run goes through the runtime."""
    spec = ModelSpec("wan2.2-i2v-toy", "wan", LAYERS, HEADS, HEAD_DIM)
    geometry = GeometrySpec(Grid(*GRID), TileShape(1, 4, 4), 16)
    first = uniform_config(spec, geometry, StepSchedule(STEPS, 0, (0, 2)), pattern)
    second = uniform_config(spec, geometry, StepSchedule(STEPS, 0, (0,)), pattern)
    return first.with_experts({"transformer_2": second})


def test_the_fixture_is_wan22_i2v_shaped(workspace):
    pipe = load_pipeline(workspace)
    assert type(pipe).__name__ == "WanImageToVideoPipeline"
    assert pipe.image_encoder is None and pipe.image_processor is None
    assert pipe.config.boundary_ratio == BOUNDARY_RATIO
    for name in EXPERTS:
        config = getattr(pipe, name).config
        assert (config.in_channels, config.out_channels, config.image_dim) == (12, 4, None)
    assert not torch.equal(pipe.transformer.proj_out.weight, pipe.transformer_2.proj_out.weight)


def run_recorded(pipe, handle, image) -> tuple[np.ndarray, dict, dict]:
    """Generate with `handle` installed; per expert the step of each transformer call and
    the (layer, bucket) of each self-attention call the runtime served."""
    steps = {name: [] for name in EXPERTS}
    attended = {name: [] for name in EXPERTS}
    hooks = []
    for name in EXPERTS:
        expert = handle.handles[name]
        hooks.append(
            getattr(pipe, name).register_forward_pre_hook(
                lambda _m, _a, expert=expert, name=name: steps[name].append(expert.tracker.step)
            )
        )
        for layer, module in enumerate(get_adapter("wan").attention_modules(getattr(pipe, name))):
            hooks.append(
                module.register_forward_pre_hook(
                    lambda _m, _a, expert=expert, name=name, layer=layer: attended[name].append(
                        (layer, expert.current_bucket())
                    )
                )
            )
    try:
        video = generate(pipe, image)
    finally:
        for hook in hooks:
            hook.remove()
    return video, steps, attended


def test_apply_runs_both_experts_sparse_and_keeps_dense_numbers(workspace, dense):
    """With every tile kept (`global_`) the runtime's kernel serves each self-attention call of
    both experts and the latents match dense; with the query tile alone they differ."""
    pipe = load_pipeline(workspace)
    image = Image.open(workspace / "first-frame.png")
    attention = get_adapter("wan").attention_modules
    originals = {name: [m.processor for m in attention(getattr(pipe, name))] for name in EXPERTS}

    keep_all = both_experts_config(HeadPattern.global_(Grid(3, 2, 2)))
    handle = compact_search.apply(pipe, keep_all)
    full, steps, attended = run_recorded(pipe, handle, image)
    handle.revert()
    assert steps == EXPERT_STEPS
    # 3 steps x 2 calls (guidance) x 2 layers per expert, all sparse
    for name in EXPERTS:
        assert handle.handles[name].calls == {"dense": 0, "sparse": 3 * 2 * LAYERS}
        assert None not in {bucket for _, bucket in attended[name]}
        assert [layer for layer, _ in attended[name]] == [0, 1] * 3 * 2
    assert {b for _, b in attended["transformer"]} == {0, 1}
    np.testing.assert_allclose(full, dense, rtol=0, atol=2e-4 * np.abs(dense).max())

    local = both_experts_config(HeadPattern.local(0, 0, 0))
    handle = compact_search.apply(pipe, local)
    sparse, steps, _ = run_recorded(pipe, handle, image)
    handle.revert()
    assert steps == EXPERT_STEPS
    assert np.isfinite(sparse).all() and np.abs(sparse - dense).max() > 1e-3
    # Both experts' patterns count: the second expert alone sparse changes step 3 onwards.
    second_only = keep_all.with_experts({"transformer_2": local.experts["transformer_2"]})
    handle = compact_search.apply(pipe, second_only)
    mixed = generate(pipe, image)
    handle.revert()
    assert np.abs(mixed - dense).max() > 1e-3 and np.abs(mixed - sparse).max() > 1e-3

    for name in EXPERTS:
        assert [m.processor for m in attention(getattr(pipe, name))] == originals[name]


def i2v_toml(folder: Path, name: str, prompts_file: str, seed: int, image: str | None) -> str:
    """The folder test's profile with the conditioning image (relative to the .toml), without
    its whole-frame tile (with tiles smaller than a frame the search can find sparsity)."""
    text = profile_toml(CASES[0], folder, name, prompts_file, seed)
    text = text.replace("[[1, 4, 4], [3, 4, 4], [1, 8, 8]]", "[[1, 4, 4], [3, 4, 4]]")
    if image is None:
        return text
    return text.replace(f"seeds = [{seed}]\n", f"seeds = [{seed}]\nimage = {json.dumps(image)}\n")


@pytest.fixture(scope="module")
def profiled(workspace) -> Path:
    """The I2V folder through the CLI: profile (one training prompt, one held-out), optimize
    (a few trials), export."""
    root = workspace
    (root / "prompts.txt").write_text(PROMPTS[0] + "\n")
    (root / "heldout.txt").write_text(HELD_OUT[0] + "\n")
    (root / "model.toml").write_text(
        i2v_toml(root / "pipe", "wan22-i2v", "prompts.txt", 0, "first-frame.png")
    )
    (root / "heldout.toml").write_text(
        i2v_toml(root / "pipe", "wan22-i2v-heldout", "heldout.txt", 100, "first-frame.png")
    )
    assert run("profile", root / "model.toml", "--out", root / "runs/model/profile") == 0
    assert run("profile", root / "heldout.toml", "--out", root / "runs/heldout/profile") == 0
    search = ("--trials", "3", "--workers", "1", "--block-size", "16", "--recall", "0.9")
    assert (
        run("optimize", root / "runs/model/profile", "--out", root / "runs/model/run", *search) == 0
    )
    assert run("export", root / "runs/model/run", "--out", root / "config.json") == 0
    return root


def test_the_loader_samples_from_the_profile_image(workspace, dense):
    """The loader's run is the pipeline's own call with the profile's picture: the same latents,
    and another picture gives others."""
    settings = load_run_profile(
        write_toml(
            workspace,
            "direct.toml",
            i2v_toml(workspace / "pipe", "d", "p.txt", 0, "first-frame.png"),
        )
    )
    assert settings.image == str(workspace / "first-frame.png")
    model = load_model(settings, torch.device("cpu"))
    assert model.experts == EXPERTS
    assert model.expert_of_steps(STEPS) == ("transformer",) * 3 + ("transformer_2",) * 3
    latents = model.run([PROMPTS[0]], seed=0, num_steps=STEPS, guidance_scale=GUIDANCE)
    np.testing.assert_array_equal(latents[0].numpy(), dense)
    other = Image.open(conditioning_image(workspace / "other.png", seed=1))
    assert np.abs(generate(load_pipeline(workspace), other) - dense).max() > 1e-3


def write_toml(root: Path, name: str, text: str) -> Path:
    (root / "p.txt").write_text(PROMPTS[0] + "\n")
    (root / name).write_text(text)
    return root / name


def test_profile_captures_both_experts_of_the_i2v_folder(profiled):
    profile = load_profile(profiled / "runs/model/profile")
    assert profile.grid.as_tuple() == GRID and profile.prefix_tokens == 0
    assert profile.step_experts == ["transformer"] * 3 + ["transformer_2"] * 3
    assert profile.experts == list(EXPERTS) and profile.steps == [0, 2, 4]
    second = profile.expert_view("transformer_2")
    mass = second.sample_tile_mass(1, tile=(1, 4, 4))  # [1 step x 1 prompt, H, 12, 12]
    assert mass.shape == (1, HEADS, 12, 12) and torch.isfinite(mass).all()


def test_export_check_and_apply_the_i2v_config(profiled, dense):
    config = load_config(profiled / "config.json")
    assert list(config.expert_configs()) == list(EXPERTS)
    report = profiled / "check.json"
    args = ("--config", profiled / "config.json", "--format", "json", "--output", report)
    # On the profiled prompt every head keeps its recall (export measured it there); on the
    # held-out one, searched from a single prompt, within 0.05 of it.
    assert run("check", "--profile", profiled / "runs/model/profile", *args) == 0
    held_out = profiled / "runs/heldout/profile"
    assert run("check", "--profile", held_out, *args, "--tolerance", "0.05") == 0
    checked = json.loads(report.read_text())
    assert checked["passed"] and set(checked["experts"]) == {"transformer_2"}
    assert {h["expert"] for h in checked["experts"]["transformer_2"]["heads"]} == {"transformer_2"}

    pipe = load_pipeline(profiled)
    image = Image.open(profiled / "first-frame.png")
    handle = compact_search.apply(pipe, str(profiled / "config.json"))
    video, steps, attended = run_recorded(pipe, handle, image)
    handle.revert()
    assert steps == EXPERT_STEPS
    for name in EXPERTS:
        schedule = handle.handles[name].config.schedule
        # per step the bucket (None: a dense warm-up step) of its 2 calls x 2 layers
        buckets = [schedule.bucket_for_step(s, STEPS) for s in sorted(set(steps[name]))]
        assert [b for _, b in attended[name]] == [b for b in buckets for _ in range(2 * LAYERS)]
    assert handle.handles["transformer_2"].calls["sparse"] > 0
    assert np.isfinite(video).all() and np.abs(video - dense).max() > 1e-3
    assert np.array_equal(generate(pipe, image), dense)


def profile_error(root: Path, toml: str, capsys) -> str:
    """`profile` of `toml`: exit 2 and its one error line."""
    path = root / "bad.toml"
    path.write_text(toml)
    capsys.readouterr()
    assert run("profile", path, "--out", root / "runs/bad") == 2
    return error_line(capsys.readouterr().err)


def test_image_errors_are_one_line(workspace, tmp_path, capsys):
    folder = workspace / "pipe"
    (workspace / "p.txt").write_text(PROMPTS[0] + "\n")
    line = profile_error(workspace, i2v_toml(folder, "i2v", "p.txt", 0, None), capsys)
    assert "sampling.image: WanImageToVideoPipeline generates video from an image" in line
    assert "set sampling.image to a picture file" in line
    line = profile_error(workspace, i2v_toml(folder, "i2v", "p.txt", 0, "missing.png"), capsys)
    assert f"sampling.image: no such file: {workspace / 'missing.png'}" in line
    (workspace / "notes.png").write_text("not a picture")
    line = profile_error(workspace, i2v_toml(folder, "i2v", "p.txt", 0, "notes.png"), capsys)
    assert f"sampling.image: {workspace / 'notes.png'} is not an image file PIL can read" in line
    line = profile_error(workspace, i2v_toml(folder, "i2v", "p.txt", 0, "."), capsys)
    assert "sampling.image: cannot read" in line
    assert not (workspace / "runs/bad").exists()  # refused before anything is written
    for bad in ('""', "3"):
        text = i2v_toml(folder, "i2v", "p.txt", 0, None).replace("seeds = [0]", f"image = {bad}")
        (workspace / "typed.toml").write_text(text)
        with pytest.raises(UserInputError, match="sampling.image: must be a file path, got"):
            load_run_profile(workspace / "typed.toml")

    build_wan(tmp_path / "t2v")
    text = i2v_toml(tmp_path / "t2v", "t2v", "p.txt", 0, str(workspace / "first-frame.png"))
    line = profile_error(workspace, text, capsys)
    assert "WanPipeline generates video from text only and takes no image" in line
    assert "remove sampling.image" in line


def test_a_built_in_model_refuses_an_image(workspace, capsys):
    text = f"""name = "tiny-i2v"
[model]
source = "builtin:tiny-random"
[sampling]
height = 32
width = 32
frames = 8
steps = 2
prompts = ["a red circle"]
image = {json.dumps(str(workspace / "first-frame.png"))}
[capture]
steps = [0]
tiles = [[1, 4, 4]]
"""
    line = profile_error(workspace, text, capsys)
    assert "sampling.image: builtin:tiny-random generates video from text only" in line


def test_a_resume_with_another_image_is_refused(profiled, capsys):
    """The fingerprint holds the picture's bytes: the same path with another picture is other
    settings; the same picture again resumes (here: is complete)."""
    out = profiled / "runs/model/profile"
    assert run("profile", profiled / "model.toml", "--out", out) == 0
    picture = profiled / "first-frame.png"
    original = picture.read_bytes()
    try:
        conditioning_image(picture, seed=7)
        capsys.readouterr()
        assert run("profile", profiled / "model.toml", "--out", out) == 2
        assert "holds a profile with other settings" in error_line(capsys.readouterr().err)
    finally:
        picture.write_bytes(original)
    settings = load_run_profile(profiled / "model.toml")
    assert settings.fingerprint() != dataclasses.replace(settings, image=None).fingerprint()
    assert "image" not in dataclasses.replace(settings, image=None).to_json()


def test_evaluate_samples_again_for_another_picture(profiled):
    """`evaluate` on the I2V folder: the cache serves a rerun with the same picture and not one
    with another picture under the same profile."""
    from compact_search.evaluate import EvaluateOptions, run_evaluation

    root = profiled
    (root / "one.txt").write_text(PROMPTS[0] + "\n")
    options = EvaluateOptions(prompts_file=root / "one.txt", seeds=(3,))
    out = root / "eval"
    config = [root / "config.json"]
    settings = load_run_profile(root / "model.toml")
    first = run_evaluation(settings, config, out, torch.device("cpu"), options)
    assert first.cache["hits"] == 0 and first.cache["misses"] == 2  # dense, compact
    assert np.isfinite(first.reports[0].mean_psnr_db)
    again = run_evaluation(settings, config, out, torch.device("cpu"), options)
    assert again.cache["hits"] == 2 and again.cache["misses"] == 0
    conditioning_image(root / "second-frame.png", seed=5)
    other = write_toml(
        root,
        "other.toml",
        i2v_toml(root / "pipe", "wan22-i2v", "prompts.txt", 0, "second-frame.png"),
    )
    moved = run_evaluation(load_run_profile(other), config, out, torch.device("cpu"), options)
    assert moved.cache["hits"] == 0 and moved.cache["misses"] == 2
    assert moved.reports[0].mean_psnr_db != first.reports[0].mean_psnr_db
