"""Adapters on small random-weight diffusers transformers built in code (no downloads).

For each adapter: the hook sees q, k after RoPE equal to an independent recomputation, returning
dense attention leaves the model output unchanged, returning anything else changes it, and
revert() restores the original processors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    WanTransformer3DModel,
)

from compact_search.models.adapters import adapter_for, get_adapter


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Independent RoPE: interleaved pairs as complex numbers times cos + i sin. x [B, H, N, D];
    cos, sin [N, D/2]."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    rotated = pairs * torch.complex(cos.double(), sin.double())
    return torch.view_as_real(rotated).flatten(-2)


class Recorder:
    """attention_fn recording q, k per layer and returning dense SDPA (or a poisoned output)."""

    def __init__(self, poison: bool = False):
        self.q, self.k, self.poison = {}, {}, poison

    def __call__(self, layer, q, k, v):
        self.q[layer], self.k[layer] = q, k
        out = F.scaled_dot_product_attention(q, k, v)
        return out + 1.0 if self.poison else out


def _capture_inputs(module):
    seen = {}

    def hook(_module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1)).transpose(1, 2)  # [B, N, C] -> [B, H, N, D]


# --- Wan ----------------------------------------------------------------------------------------


def wan_case():
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        rope_max_seq_len=32,
    ).eval()
    inputs = {
        "hidden_states": torch.randn(1, 4, 3, 8, 8),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 5, 24),
        "return_dict": False,
    }
    return model, inputs


def test_wan_adapter_records_rope_qk_and_keeps_output():
    model, inputs = wan_case()
    attn = model.blocks[1].attn1
    seen, hook = _capture_inputs(attn)
    with torch.no_grad():
        reference = model(**inputs)[0]
    hook.remove()
    x, _, _, (freqs_cos, freqs_sin) = seen["args"]  # rotary freqs [1, N, 1, D]
    cos, sin = freqs_cos[0, :, 0, 0::2], freqs_sin[0, :, 0, 1::2]  # [N, D/2]
    with torch.no_grad():
        q = rotate_pairs(_heads(attn.norm_q(attn.to_q(x)), attn.heads), cos, sin)
        k = rotate_pairs(_heads(attn.norm_k(attn.to_k(x)), attn.heads), cos, sin)
    _check_adapter(model, inputs, reference, "wan", layer=1, q=q, k=k)


# --- CogVideoX ----------------------------------------------------------------------------------


def cogvideox_case():
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=24,
        num_layers=2,
        sample_width=16,
        sample_height=16,
        sample_frames=9,
        patch_size=2,
        max_text_seq_length=6,
        use_rotary_positional_embeddings=True,
    ).eval()
    frames, n = 3, 3 * 4 * 4  # latent frames (9 - 1) / 4 + 1, 8x8 latents / patch 2
    angles = torch.randn(n, 8)  # [N, D/2]
    cos = torch.repeat_interleave(angles.cos(), 2, dim=-1)  # [N, D], pairs share an angle
    sin = torch.repeat_interleave(angles.sin(), 2, dim=-1)
    inputs = {
        "hidden_states": torch.randn(1, frames, 4, 8, 8),
        "encoder_hidden_states": torch.randn(1, 6, 24),
        "timestep": torch.tensor([500]),
        "image_rotary_emb": (cos, sin),
        "return_dict": False,
    }
    return model, inputs, angles


def test_cogvideox_adapter_records_rope_qk_and_keeps_output():
    model, inputs, angles = cogvideox_case()
    attn = model.transformer_blocks[1].attn1
    seen, hook = _capture_inputs(attn)
    with torch.no_grad():
        reference = model(**inputs)[0]
    hook.remove()
    video, text = seen["kwargs"]["hidden_states"], seen["kwargs"]["encoder_hidden_states"]
    joint = torch.cat([text, video], dim=1)
    with torch.no_grad():
        q = attn.norm_q(_heads(attn.to_q(joint), attn.heads)).double()
        k = attn.norm_k(_heads(attn.to_k(joint), attn.heads)).double()
    text_len = text.shape[1]
    q[:, :, text_len:] = rotate_pairs(q[:, :, text_len:], angles.cos(), angles.sin())
    k[:, :, text_len:] = rotate_pairs(k[:, :, text_len:], angles.cos(), angles.sin())
    _check_adapter(model, inputs, reference, "cogvideox", layer=1, q=q, k=k)


# --- HunyuanVideo -------------------------------------------------------------------------------


def hunyuan_case(text_mask: torch.Tensor):
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=24,
        pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
    ).eval()
    batch = text_mask.shape[0]
    inputs = {
        "hidden_states": torch.randn(batch, 4, 2, 8, 8),
        "timestep": torch.tensor([500] * batch),
        "encoder_hidden_states": torch.randn(batch, text_mask.shape[1], 24),
        "encoder_attention_mask": text_mask,
        "pooled_projections": torch.randn(batch, 8),
        "guidance": torch.tensor([4000.0] * batch),
        "return_dict": False,
    }
    return model, inputs


@pytest.mark.parametrize(
    "text_mask",
    [
        torch.tensor([[1, 1, 1, 1, 1]]),
        torch.tensor([[1, 1, 1, 0, 0]]),
        torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
    ],
    ids=["unpadded", "padded", "batch-ragged"],
)
@pytest.mark.parametrize("layer", [0, 1], ids=["dual-stream", "single-stream"])
def test_hunyuan_adapter_records_rope_qk_and_keeps_output(text_mask, layer):
    model, inputs = hunyuan_case(text_mask)
    attn = get_adapter("hunyuanvideo").attention_modules(model)[layer]
    seen, hook = _capture_inputs(attn)
    with torch.no_grad():
        reference = model(**inputs)[0]
    hook.remove()
    kwargs = seen["kwargs"]
    video, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    cos, sin = kwargs["image_rotary_emb"]  # [N, D], pairs share an angle
    with torch.no_grad():
        if attn.add_q_proj is None:
            joint = torch.cat([video, text], dim=1)
            q = attn.norm_q(attn.to_q(joint).unflatten(2, (attn.heads, -1))).transpose(1, 2)
            k = attn.norm_k(attn.to_k(joint).unflatten(2, (attn.heads, -1))).transpose(1, 2)
        else:
            q = torch.cat(
                [
                    attn.norm_q(attn.to_q(video).unflatten(2, (attn.heads, -1))),
                    attn.norm_added_q(attn.add_q_proj(text).unflatten(2, (attn.heads, -1))),
                ],
                dim=1,
            ).transpose(1, 2)
            k = torch.cat(
                [
                    attn.norm_k(attn.to_k(video).unflatten(2, (attn.heads, -1))),
                    attn.norm_added_k(attn.add_k_proj(text).unflatten(2, (attn.heads, -1))),
                ],
                dim=1,
            ).transpose(1, 2)
    q, k = q.double(), k.double()
    n = video.shape[1]
    q[:, :, :n] = rotate_pairs(q[:, :, :n], cos[:, 0::2], sin[:, 0::2])
    k[:, :, :n] = rotate_pairs(k[:, :, :n], cos[:, 0::2], sin[:, 0::2])
    # The hook sees the real tokens only ([video + valid text]); the last sample's length.
    real = n + int(text_mask[-1].sum())
    _check_adapter(
        model,
        inputs,
        reference,
        "hunyuanvideo",
        layer=layer,
        q=q[-1:, :, :real],
        k=k[-1:, :, :real],
    )


# --- shared checks ------------------------------------------------------------------------------


def _check_adapter(model, inputs, reference, name, *, layer, q, k):
    adapter = get_adapter(name)
    assert adapter_for(model) is adapter
    originals = [m.processor for m in adapter.attention_modules(model)]
    recorder = Recorder()
    with torch.no_grad(), adapter.install(model, recorder):
        out = model(**inputs)[0]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert [m.processor for m in adapter.attention_modules(model)] == originals
    torch.testing.assert_close(recorder.q[layer][-1:].double(), q[-1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recorder.k[layer][-1:].double(), k[-1:], atol=1e-5, rtol=1e-5)
    # The hook is on the path: a different attention output changes the model output.
    with torch.no_grad(), adapter.install(model, Recorder(poison=True)):
        poisoned = model(**inputs)[0]
    assert not torch.allclose(poisoned, reference, atol=1e-3)


@pytest.mark.parametrize("name", ["wan", "cogvideox", "hunyuanvideo"])
def test_tile_mass_recorder_leaves_output_unchanged(name):
    """The profiler's own attention_fn through each adapter: same output, tile mass recorded for
    the video tokens of every layer, rows summing to 1."""
    from compact_search.geometry import Grid, TileShape
    from compact_search.profiling.capture import TileMassRecorder

    if name == "wan":
        (model, inputs), grid = wan_case(), Grid(3, 4, 4)
    elif name == "cogvideox":
        (model, inputs, _), grid = cogvideox_case(), Grid(3, 4, 4)
    else:
        (model, inputs), grid = hunyuan_case(torch.tensor([[1, 1, 1, 0, 0]])), Grid(2, 4, 4)
    with torch.no_grad():
        reference = model(**inputs)[0]
    adapter = get_adapter(name)
    tiles = (TileShape(1, 2, 2), TileShape(grid.frames, 4, 4))
    recorder = TileMassRecorder(grid, tiles, adapter.prefix_at)
    recorder.start_step(frozenset(range(adapter.num_layers(model))))
    with torch.no_grad(), adapter.install(model, recorder):
        out = model(**inputs)[0]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    masses = recorder.take()
    assert sorted(masses) == list(range(adapter.num_layers(model)))
    for per_tile in masses.values():
        for tile, mass in per_tile.items():
            nt = (grid.frames // tile.frames) * (4 // tile.height) * (4 // tile.width)
            assert mass.shape == (2, nt, nt)
            torch.testing.assert_close(mass.sum(-1), torch.ones(2, nt), atol=1e-5, rtol=0)
