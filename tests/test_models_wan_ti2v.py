"""Wan2.2 TI2V-5B's layout through the Wan adapter: one transformer, the Wan2.2 VAE (16x in
space: a residual VAE of patch 2 over 12 channels) and `expand_timesteps` (a timestep per
token). A saved random-weight pipeline at 128x128, 9 frames: latents 3x8x8, patch (1, 2, 2),
grid 3x4x4.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from cli_runner import run
from test_real_pipeline_folder import CASES, PROMPTS, build_wan, profile_toml

import compact_search
from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, uniform_config
from compact_search.geometry import Grid, TileShape
from compact_search.models.adapters import get_adapter
from compact_search.patterns import HeadPattern
from compact_search.profiling import load_profile

GRID = (3, 4, 4)
STEPS = 4


def build_ti2v(folder: Path) -> None:
    """build_wan's pipeline with the Wan2.2 VAE's compression and per-token timesteps."""
    build_wan(folder)
    pipe = diffusers.WanPipeline.from_pretrained(str(folder))
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    components = {k: v for k, v in pipe.components.items() if k != "vae"}
    diffusers.WanPipeline(**components, vae=vae, expand_timesteps=True).save_pretrained(folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ti2v")
    build_ti2v(root / "pipe")
    return root


def generate(pipe) -> np.ndarray:
    """The denoised latents (the VAE's decode adds time, not coverage)."""
    return (
        pipe(
            PROMPTS[0],
            height=128,
            width=128,
            num_frames=9,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
        .frames[0]
        .numpy()
    )


def test_ti2v_profile_reads_the_16x_grid(folder):
    (folder / "prompts.txt").write_text(PROMPTS[0] + "\n")
    toml = profile_toml(CASES[0], folder / "pipe", "ti2v", "prompts.txt", 0)
    toml = toml.replace("[[1, 4, 4], [3, 4, 4], [1, 8, 8]]", "[[1, 2, 2], [3, 2, 2]]")
    (folder / "model.toml").write_text(toml)
    assert run("profile", folder / "model.toml", "--out", folder / "profile") == 0
    profile = load_profile(folder / "profile")
    assert profile.grid.as_tuple() == GRID and profile.step_experts is None
    mass = profile.sample_tile_mass(0, tile=(1, 2, 2))  # [3 steps, H, 12, 12]
    assert mass.shape == (3, 2, 12, 12) and torch.isfinite(mass).all()


def test_ti2v_apply_follows_the_steps_and_reverts_exactly(folder):
    pipe = diffusers.WanPipeline.from_pretrained(str(folder / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    dense = generate(pipe)
    spec = ModelSpec("ti2v-toy", "wan", 2, 2, 16)
    geometry = GeometrySpec(Grid(*GRID), TileShape(1, 2, 2), 4)
    config = uniform_config(
        spec, geometry, StepSchedule(STEPS, 1, (1,)), HeadPattern.local(0, 0, 0)
    )
    handle = compact_search.apply(pipe, config)
    video = generate(pipe)
    handle.revert()
    # 1 dense step, 3 sparse, 2 calls per step (guidance), 2 layers
    assert handle.calls == {"dense": 1 * 2 * 2, "sparse": 3 * 2 * 2}
    assert np.isfinite(video).all() and np.abs(video - dense).max() > 1e-3
    modules = get_adapter("wan").attention_modules(pipe.transformer)
    assert all(type(m.processor).__name__ == "WanAttnProcessor" for m in modules)
    assert np.array_equal(generate(pipe), dense)
