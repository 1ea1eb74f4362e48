"""SkyReels-V2 (`SkyReelsV2Transformer3DModel`, Wan-derived) through the `skyreels-v2` adapter.

At toy size, built in code: q and k after RoPE equal an independent recomputation, the
profiler's attention leaves the output unchanged, another attention changes it; a saved
random-weight `SkyReelsV2Pipeline` (the Wan parts: UMT5, Wan VAE, UniPC) is profiled, dense
patterns reproduce its videos exactly and sparse ones change them, revert restores them; the
diffusion-forcing causal mask and context parallelism are refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from cli_runner import run
from test_adapters import _capture_inputs, _check_adapter, _heads, rotate_pairs
from test_real_pipeline_folder import (
    CASES,
    HEAD_DIM,
    HEADS,
    LAYERS,
    PROMPTS,
    SIZE,
    offline_tokenizer,
    profile_toml,
    t5_config,
)

import compact_search
from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, uniform_config
from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape
from compact_search.models.adapters import get_adapter
from compact_search.patterns import HeadPattern
from compact_search.profiling import load_profile

STEPS = 3


def skyreels_transformer(**extra) -> diffusers.SkyReelsV2Transformer3DModel:
    return diffusers.SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=LAYERS,
        rope_max_seq_len=32,
        **extra,
    )


def small_inputs(frames: int = 3) -> dict:
    return {
        "hidden_states": torch.randn(1, 4, frames, 8, 8),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 5, 16),
        "return_dict": False,
    }


def test_skyreels_adapter_records_rope_qk_and_keeps_output():
    torch.manual_seed(0)
    model, inputs = skyreels_transformer().eval(), small_inputs()
    attn = model.blocks[1].attn1
    seen, hook = _capture_inputs(attn)
    with torch.no_grad():
        reference = model(**inputs)[0]
    hook.remove()
    x, _, _, (freqs_cos, freqs_sin) = seen["args"]
    cos, sin = freqs_cos[0, :, 0, 0::2], freqs_sin[0, :, 0, 1::2]  # [N, D/2]
    with torch.no_grad():
        q = rotate_pairs(_heads(attn.norm_q(attn.to_q(x)), attn.heads), cos, sin)
        k = rotate_pairs(_heads(attn.norm_k(attn.to_k(x)), attn.heads), cos, sin)
    _check_adapter(model, inputs, reference, "skyreels-v2", layer=1, q=q, k=k)


def test_diffusion_forcing_masks_and_context_parallelism_are_refused_in_one_line():
    torch.manual_seed(0)
    model = skyreels_transformer(num_frame_per_block=3).eval()
    adapter = get_adapter("skyreels-v2")
    with adapter.install(model, lambda *a: None) as handle, torch.no_grad():
        with pytest.raises(UserInputError, match="without its diffusion-forcing causal mask") as a:
            model(**small_inputs(frames=3))
        with pytest.raises(UserInputError, match="runs SkyReels-V2 without context") as b:
            handle.modules[0].processor._parallel_config = SimpleNamespace(
                context_parallel_config=object()
            )
    assert "\n" not in str(a.value) + str(b.value)


def build_skyreels(folder: Path) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = offline_tokenizer()
    torch.manual_seed(0)
    diffusers.SkyReelsV2Pipeline(
        tokenizer=tokenizer,
        text_encoder=UMT5EncoderModel(t5_config(UMT5Config, len(tokenizer))),
        vae=diffusers.AutoencoderKLWan(
            base_dim=4,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        ),
        transformer=skyreels_transformer(),
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0
        ),
    ).save_pretrained(folder)


def generate(pipe) -> np.ndarray:
    return pipe(
        PROMPTS[0],
        height=SIZE["height"],
        width=SIZE["width"],
        num_frames=SIZE["frames"],
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames[0]


def test_skyreels_folder_is_profiled_and_applied(tmp_path, monkeypatch):
    # The pipeline cleans prompts with ftfy (not installed here): an identity stands in.
    from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2

    monkeypatch.setattr(
        pipeline_skyreels_v2, "ftfy", SimpleNamespace(fix_text=lambda t: t), raising=False
    )
    build_skyreels(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    toml = profile_toml(CASES[0], tmp_path / "pipe", "skyreels", "prompts.txt", 0)
    (tmp_path / "model.toml").write_text(toml.replace('adapter = "wan"', 'adapter = "skyreels-v2"'))
    assert run("profile", tmp_path / "model.toml", "--out", tmp_path / "profile") == 0
    profile = load_profile(tmp_path / "profile")
    assert profile.grid.as_tuple() == (3, 8, 8) and profile.prefix_tokens == 0

    pipe = diffusers.SkyReelsV2Pipeline.from_pretrained(str(tmp_path / "pipe"))
    pipe.set_progress_bar_config(disable=True)
    reference = generate(pipe)
    spec = ModelSpec("skyreels-toy", "skyreels-v2", LAYERS, HEADS, HEAD_DIM)
    geometry = GeometrySpec(Grid(3, 8, 8), TileShape(1, 4, 4), 16)
    schedule = StepSchedule(STEPS, 0, (0,))
    videos = {}
    for name, pattern in (("dense", HeadPattern.dense()), ("local", HeadPattern.local(0, 0, 0))):
        handle = compact_search.apply(pipe, uniform_config(spec, geometry, schedule, pattern))
        videos[name] = generate(pipe)
        handle.revert()
        assert handle.calls["sparse"] == STEPS * 2 * LAYERS  # every call ran the kernel path
    np.testing.assert_allclose(videos["dense"], reference, atol=1e-4)  # fp32 rounding only
    assert np.abs(videos["local"] - reference).max() > 1e-3
    assert np.array_equal(generate(pipe), reference)
