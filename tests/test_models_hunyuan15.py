"""HunyuanVideo 1.5 (`HunyuanVideo15Transformer3DModel`) at toy size, built in code.

As tests/test_adapters.py does for the other families: q and k handed to the hook equal an
independent recomputation after RoPE, the profiler's attention leaves the output unchanged, a
different attention changes it, and the text (its real image, ByT5 and Qwen tokens, placed
after the video) reaches the hook as the prefix while padded text is left out. Then the runtime:
a config of dense patterns reproduces the model exactly, a sparse one changes it, and context
parallelism is refused in one line.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel
from test_adapters import _capture_inputs, _check_adapter, rotate_pairs

import compact_search
from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, uniform_config
from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape
from compact_search.models.adapters import get_adapter
from compact_search.patterns import HeadPattern

FRAMES, HEIGHT, WIDTH = 2, 4, 6  # latent grid (patch 1): 48 video tokens


def hunyuan15_case(text_mask: torch.Tensor, byt5_mask: torch.Tensor):
    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=24,
        text_embed_2_dim=8,
        image_embed_dim=8,
        rope_axes_dim=(4, 6, 6),
    ).eval()
    batch = text_mask.shape[0]
    inputs = {
        "hidden_states": torch.randn(batch, 4, FRAMES, HEIGHT, WIDTH),
        "timestep": torch.tensor([500.0] * batch),
        "encoder_hidden_states": torch.randn(batch, text_mask.shape[1], 24),
        "encoder_attention_mask": text_mask,
        "encoder_hidden_states_2": torch.randn(batch, byt5_mask.shape[1], 8),
        "encoder_attention_mask_2": byt5_mask,
        "image_embeds": torch.zeros(batch, 3, 8),  # text-to-video: image tokens masked out
        "return_dict": False,
    }
    return model, inputs


MASKS = [
    (torch.tensor([[1, 1, 1, 1, 1]]), torch.tensor([[1, 1]])),
    (torch.tensor([[1, 1, 1, 0, 0]]), torch.tensor([[1, 0]])),
    (torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]), torch.tensor([[1, 1], [0, 0]])),
]
IDS = ["unpadded", "padded", "batch-ragged"]


@pytest.mark.parametrize(("text_mask", "byt5_mask"), MASKS, ids=IDS)
def test_hunyuan15_adapter_records_rope_qk_and_keeps_output(text_mask, byt5_mask):
    model, inputs = hunyuan15_case(text_mask, byt5_mask)
    layer = 1
    attn = get_adapter("hunyuanvideo15").attention_modules(model)[layer]
    seen, hook = _capture_inputs(attn)
    with torch.no_grad():
        reference = model(**inputs)[0]
    hook.remove()
    kwargs = seen["kwargs"]
    video, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    cos, sin = kwargs["image_rotary_emb"]  # [N, D], pairs share an angle
    with torch.no_grad():
        heads = attn.heads
        q = torch.cat(
            [
                attn.norm_q(attn.to_q(video).unflatten(2, (heads, -1))),
                attn.norm_added_q(attn.add_q_proj(text).unflatten(2, (heads, -1))),
            ],
            dim=1,
        ).transpose(1, 2)
        k = torch.cat(
            [
                attn.norm_k(attn.to_k(video).unflatten(2, (heads, -1))),
                attn.norm_added_k(attn.add_k_proj(text).unflatten(2, (heads, -1))),
            ],
            dim=1,
        ).transpose(1, 2)
    q, k = q.double(), k.double()
    n = video.shape[1]
    assert n == FRAMES * HEIGHT * WIDTH
    q[:, :, :n] = rotate_pairs(q[:, :, :n], cos[:, 0::2], sin[:, 0::2])
    k[:, :, :n] = rotate_pairs(k[:, :, :n], cos[:, 0::2], sin[:, 0::2])
    # The hook sees [video + the last sample's real text]: its ByT5 and Qwen tokens.
    real = n + int(text_mask[-1].sum() + byt5_mask[-1].sum())
    _check_adapter(
        model,
        inputs,
        reference,
        "hunyuanvideo15",
        layer=layer,
        q=q[-1:, :, :real],
        k=k[-1:, :, :real],
    )


def test_tile_mass_recorder_leaves_hunyuan15_output_unchanged():
    from compact_search.profiling.capture import TileMassRecorder

    model, inputs = hunyuan15_case(*MASKS[1])
    with torch.no_grad():
        reference = model(**inputs)[0]
    adapter = get_adapter("hunyuanvideo15")
    grid = Grid(FRAMES, HEIGHT, WIDTH)
    recorder = TileMassRecorder(grid, (TileShape(1, 2, 3),), adapter.prefix_at)
    recorder.start_step(frozenset(range(adapter.num_layers(model))))
    with torch.no_grad(), adapter.install(model, recorder):
        out = model(**inputs)[0]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert recorder.prefix_tokens == 3 + 1  # real Qwen + ByT5 tokens
    for per_tile in recorder.take().values():
        mass = per_tile[TileShape(1, 2, 3)]  # [H, 8, 8]: tile grid 2x2x2
        torch.testing.assert_close(mass.sum(-1), torch.ones(2, 8), atol=1e-5, rtol=0)


def config_for(model, pattern: HeadPattern, prefix_tokens: int):
    spec = ModelSpec("hunyuan15-toy", "hunyuanvideo15", 2, 2, 16)
    geometry = GeometrySpec(
        Grid(FRAMES, HEIGHT, WIDTH), TileShape(1, 2, 3), 8, prefix_tokens, "end"
    )
    return uniform_config(spec, geometry, StepSchedule(4, 0, (0,)), pattern)


@pytest.mark.parametrize(("text_mask", "byt5_mask"), MASKS[1:], ids=IDS[1:])
def test_dense_patterns_reproduce_hunyuan15_and_sparse_ones_change_it(text_mask, byt5_mask):
    model, inputs = hunyuan15_case(text_mask, byt5_mask)
    with torch.no_grad():
        reference = model(**inputs)[0]
    prefix = int((text_mask.sum(1) + byt5_mask.sum(1)).max())
    handle = compact_search.apply(model, config_for(model, HeadPattern.dense(), prefix))
    handle.set_step(1)
    with torch.no_grad():
        dense = model(**inputs)[0]
    handle.revert()
    assert handle.calls["sparse"] == 2 * (1 if text_mask.shape[0] == 1 else 2)
    torch.testing.assert_close(dense, reference, atol=1e-5, rtol=1e-5)
    handle = compact_search.apply(model, config_for(model, HeadPattern.local(0, 0, 0), prefix))
    handle.set_step(1)
    with torch.no_grad():
        sparse = model(**inputs)[0]
    handle.revert()
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, reference, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], reference)


def test_hunyuan15_refuses_context_parallelism_in_one_line():
    from types import SimpleNamespace

    model, _ = hunyuan15_case(*MASKS[0])
    with get_adapter("hunyuanvideo15").install(model, lambda *a: None) as handle:
        processor = handle.modules[0].processor
        with pytest.raises(UserInputError, match="runs HunyuanVideo 1.5 without context") as info:
            processor._parallel_config = SimpleNamespace(context_parallel_config=object())
    assert "\n" not in str(info.value)


def test_hunyuan15_processor_matches_diffusers_on_padded_text_rows_too():
    """Both streams of one block, padded text queries included (the model drops them later, so
    the output test cannot see them): equal to diffusers' processor."""
    from compact_search.models.hunyuan15 import HunyuanVideo15AttnProcessor
    from compact_search.models.wan import dense_attention

    model, inputs = hunyuan15_case(*MASKS[2])
    attn = model.transformer_blocks[0].attn
    seen, hook = _capture_inputs(attn)
    with torch.no_grad():
        model(**inputs)
        hook.remove()
        kwargs = seen["kwargs"]
        expected = attn.processor(attn, **kwargs)
        got = HunyuanVideo15AttnProcessor(0, dense_attention)(attn, **kwargs)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
