"""apply(..., precision=): the 8-bit path through the runtime on a small built-in model (CPU,
bf16 weights, head dim 64, block 64: what the 8-bit kernels take)."""

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, uniform_config
from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape
from compact_search.patterns import HeadPattern
from compact_search.runtime.apply import apply
from compact_search.runtime.attention import recorded_kernels

SPARSE_STEP = 2  # of 4: bucket 0 (steps 1-3); step 0 runs dense


def tiny_pipeline(seed=0):
    from compact_search.models.tiny.pipeline import TinyModelConfig, TinyVideoPipeline, build_models

    torch.manual_seed(seed)
    # Grid 4 x 8 x 8 = 256 tokens (patch 1 x 2 x 2).
    config = TinyModelConfig(
        num_layers=2, num_heads=2, head_dim=64, ffn_dim=64, num_frames=4, height=16, width=16
    )
    transformer, text_encoder = build_models(config)
    return TinyVideoPipeline(config, transformer.to(torch.bfloat16), text_encoder)


@pytest.fixture(scope="module")
def pipeline():
    return tiny_pipeline()


def config_for(pipeline, precision="bf16"):
    # 32-token tiles in 64-token blocks: every tile is padded, so padded keys are masked.
    config = uniform_config(
        ModelSpec("tiny-random", "wan", 2, 2, 64),
        GeometrySpec(Grid(*pipeline.grid), TileShape(1, 4, 8), block_size=64),
        StepSchedule(num_steps=4, dense_steps=1, bucket_starts=(1,)),
        [HeadPattern.local(0, 0, 0), HeadPattern.dense()],
    )
    return config.with_precision(precision)


@torch.no_grad()
def velocity(pipeline, transformer=None) -> torch.Tensor:
    """One transformer call on fixed inputs: [1, 3, 4, 16, 16] in fp32."""
    gen = torch.Generator().manual_seed(1)
    noisy = torch.randn(1, 3, 4, 16, 16, generator=gen).to(torch.bfloat16)
    text = pipeline.encode_prompts(["a red circle moves left"]).to(torch.bfloat16)
    t = torch.tensor([0.5], dtype=torch.bfloat16)
    model = transformer if transformer is not None else pipeline.transformer
    out = model(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=text)
    return out[0].float()


def run_at(pipeline, config, **options):
    """(output, kernels recorded, handle) of one sparse-step call with `config` applied."""
    handle = apply(pipeline.transformer, config, grid=pipeline.grid, **options)
    try:
        handle.set_step(SPARSE_STEP)
        with recorded_kernels() as kernels:
            out = velocity(pipeline)
    finally:
        handle.revert()
    return out, kernels, handle


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_fp8_quantizes_yet_stays_close_to_bf16(pipeline):
    bf16, bf16_kernels, bf16_handle = run_at(pipeline, config_for(pipeline))
    again, _, _ = run_at(pipeline, config_for(pipeline))
    fp8, fp8_kernels, fp8_handle = run_at(pipeline, config_for(pipeline), precision="fp8")
    assert torch.equal(bf16, again)  # the difference below is the 8-bit path's, not noise
    assert bf16_kernels == ["reference"] * 2 and fp8_kernels == ["reference-fp8"] * 2
    assert bf16_handle.precision == "bf16" and fp8_handle.precision == "fp8"
    assert torch.isfinite(fp8).all()
    assert not torch.equal(fp8, bf16)
    assert cosine(fp8, bf16) > 0.99


def test_int8_runs_its_own_emulation_and_lands_closer_to_bf16_than_fp8(pipeline):
    bf16, _, _ = run_at(pipeline, config_for(pipeline))
    fp8, _, _ = run_at(pipeline, config_for(pipeline), precision="fp8")
    int8, kernels, handle = run_at(pipeline, config_for(pipeline, "int8"))
    assert kernels == ["reference-int8"] * 2
    assert handle.precision == "int8" and "precision='int8'" in repr(handle)
    assert torch.isfinite(int8).all() and not torch.equal(int8, fp8)
    assert (int8 - bf16).norm() < (fp8 - bf16).norm()


def test_the_configs_precision_runs_and_an_explicit_one_wins(pipeline):
    _, kernels, handle = run_at(pipeline, config_for(pipeline, "fp8"))
    assert handle.precision == "fp8" and kernels == ["reference-fp8"] * 2
    assert "precision='fp8'" in repr(handle)
    _, kernels, handle = run_at(pipeline, config_for(pipeline, "fp8"), precision="bf16")
    assert handle.precision == "bf16" and kernels == ["reference"] * 2
    assert "precision='bf16'" in repr(handle)


def test_dense_warm_up_steps_run_sdpa_whatever_the_precision(pipeline):
    handle = apply(pipeline.transformer, config_for(pipeline), grid=pipeline.grid, precision="fp8")
    handle.set_step(0)
    with recorded_kernels() as kernels:
        velocity(pipeline)
    handle.revert()
    assert kernels == [] and handle.calls == {"dense": 2, "sparse": 0}


@pytest.mark.parametrize("value", ["int4", "FP8", 8])
def test_a_bad_precision_is_refused_before_anything_is_installed(pipeline, value):
    originals = [block.attn1.processor for block in pipeline.transformer.blocks]
    with pytest.raises(UserInputError, match="apply: precision must be one of bf16, fp8, int8"):
        apply(pipeline.transformer, config_for(pipeline), grid=pipeline.grid, precision=value)
    assert [block.attn1.processor for block in pipeline.transformer.blocks] == originals


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_compiled_8_bit_blocks_run_without_graph_breaks_and_match_eager(precision):
    pipeline = tiny_pipeline()
    config = config_for(pipeline, precision)
    eager, _, _ = run_at(pipeline, config)
    handle = apply(pipeline.transformer, config, grid=pipeline.grid)
    handle.set_step(SPARSE_STEP)
    counter = CompileCounterWithBackend("aot_eager")
    pipeline.transformer.compile_repeated_blocks(fullgraph=True, backend=counter)
    with recorded_kernels() as kernels:
        compiled = velocity(pipeline)  # fullgraph=True: a graph break would raise
    handle.revert()
    assert counter.frame_count == 1
    assert kernels == [f"reference-{precision}"] * 2
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)


def test_every_expert_runs_the_one_precision():
    first, second = tiny_pipeline(0), tiny_pipeline(1)
    pipe = SimpleNamespace(
        components={"transformer": first.transformer, "transformer_2": second.transformer},
        transformer=first.transformer,
        transformer_2=second.transformer,
        grid=first.grid,
    )
    config = config_for(first, "fp8")
    config = config.with_experts({"transformer_2": config})
    handle = apply(pipe, config)
    try:
        assert handle.precision == "fp8" and "precision='fp8'" in repr(handle)
        assert {n: h.precision for n, h in handle.handles.items()} == {
            "transformer": "fp8",
            "transformer_2": "fp8",
        }
        handle.set_step(SPARSE_STEP)
        with recorded_kernels() as kernels:
            velocity(second, second.transformer)
        assert kernels == ["reference-fp8"] * 2
    finally:
        handle.revert()
    override = apply(pipe, config, precision="bf16")
    override.revert()
    assert override.precision == "bf16"
    assert [h.precision for h in override.handles.values()] == ["bf16", "bf16"]
