"""Wan2.2-I2V-A14B's layout through the Wan adapter: a saved random-weight
`WanImageToVideoPipeline` with two experts (`transformer`, `transformer_2`, switched at
`boundary_ratio`), no image encoder (Wan2.2 conditions on the image through the VAE only), and
transformers that read 2 x 4 latent channels + 4 mask channels: the noisy latents, the VAE
latents of the image followed by zero frames, and the first-frame mask the pipeline folds into
`vae_scale_factor_temporal` channels.

At 128x128, 9 frames the grid is 3x8x8 (build_wan's VAE and patch). UniPC (flow shift 3) over
6 steps at boundary_ratio 0.8 runs steps 0-2 on `transformer` and 3-5 on `transformer_2`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from test_real_pipeline_folder import GRID, HEAD_DIM, HEADS, LAYERS, PROMPTS, SIZE, build_wan

import compact_search
from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, uniform_config
from compact_search.geometry import Grid, TileShape
from compact_search.models.adapters import get_adapter
from compact_search.patterns import HeadPattern

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


def test_apply_runs_both_experts_sparse_and_keeps_dense_numbers(workspace):
    """With every tile kept (`global_`) the runtime's kernel serves each self-attention call of
    both experts and the latents match dense; with the query tile alone they differ."""
    pipe = load_pipeline(workspace)
    image = Image.open(workspace / "first-frame.png")
    attention = get_adapter("wan").attention_modules
    originals = {name: [m.processor for m in attention(getattr(pipe, name))] for name in EXPERTS}
    dense = generate(pipe, image)
    assert np.isfinite(dense).all()

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
    assert np.array_equal(generate(pipe, image), dense)
