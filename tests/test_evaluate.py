"""evaluate: metrics, and dense vs compact on a small random-weight built-in pipeline."""

import math

import pytest
import torch

from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, uniform_config
from compact_search.evaluate import evaluate_config, psnr, ssim
from compact_search.geometry import TileShape
from compact_search.patterns import HeadPattern


def test_psnr_and_ssim_on_known_inputs():
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 4, 16, 16, generator=gen)
    assert torch.isinf(psnr(ref, ref)).all()
    assert torch.allclose(ssim(ref, ref), torch.ones(2))
    shifted = (ref + 0.1).clamp(0, 1)
    noisy = (ref + 0.1 * torch.randn(ref.shape, generator=gen)).clamp(0, 1)
    # a constant offset of 0.1 has MSE <= 0.01 -> PSNR >= 20 dB
    assert (psnr(shifted, ref) >= 20).all()
    assert (ssim(noisy, ref) < 0.99).all() and (ssim(noisy, ref) > 0).all()
    much_noisier = (ref + 0.4 * torch.randn(ref.shape, generator=gen)).clamp(0, 1)
    assert (ssim(much_noisier, ref) < ssim(noisy, ref)).all()
    assert (psnr(much_noisier, ref) < psnr(noisy, ref)).all()


@pytest.fixture(scope="module")
def small_pipeline():
    """A small random-weight built-in pipeline, as the adapter registry hands models out."""
    from compact_search.models.adapters import get_adapter
    from compact_search.models.tiny.builtin import tiny_loaded_model
    from compact_search.models.tiny.pipeline import (
        TinyModelConfig,
        TinyVideoPipeline,
        build_models,
    )

    torch.manual_seed(0)
    config = TinyModelConfig(num_layers=2, num_heads=2, head_dim=32, ffn_dim=64)
    transformer, text_encoder = build_models(config)
    return tiny_loaded_model(
        get_adapter("wan"), TinyVideoPipeline(config, transformer, text_encoder)
    )


def config_for(model, patterns, dense_steps):
    grid = model.grid
    return uniform_config(
        ModelSpec("tiny-random", "wan", 2, 2, 32),
        GeometrySpec(grid, TileShape(2, 4, 8), block_size=64),
        StepSchedule(num_steps=3, dense_steps=dense_steps, bucket_starts=(dense_steps,)),
        patterns,
    )


def test_dense_config_matches_dense_run(small_pipeline, tmp_path):
    config = config_for(small_pipeline, [HeadPattern.dense()] * 2, dense_steps=0)
    report = evaluate_config(
        small_pipeline, config, ["a red circle moves left"], seed=3, num_steps=3, out_dir=tmp_path
    )
    assert report.mean_psnr_db > 60 or math.isinf(report.mean_psnr_db)
    assert report.mean_ssim > 0.999
    assert report.compact_attention_s > 0 and report.dense_attention_s > 0
    assert (tmp_path / "prompt00_dense_vs_compact.gif").stat().st_size > 0


def test_sparse_config_changes_the_video_and_warmup_limits_it(small_pipeline):
    sparse = [HeadPattern.local(0, 0, 0)] * 2
    no_warmup = evaluate_config(
        small_pipeline,
        config_for(small_pipeline, sparse, 0),
        ["a blue square moves up"],
        num_steps=3,
    )
    warmup = evaluate_config(
        small_pipeline,
        config_for(small_pipeline, sparse, 2),
        ["a blue square moves up"],
        num_steps=3,
    )
    assert math.isfinite(no_warmup.mean_psnr_db)
    # two dense steps out of three leave less room for sparse attention to change the output
    assert warmup.mean_psnr_db > no_warmup.mean_psnr_db


@pytest.mark.slow
def test_compiled_evaluation_gives_the_eager_videos_with_one_graph_per_bucket(small_pipeline):
    """evaluate --compile: the repeated blocks compiled in place (fullgraph), a warm-up pass per
    run, the same videos as eager, and 3 graphs: the dense run, the compact run's dense steps and
    its one bucket."""
    from torch._dynamo.testing import CompileCounterWithBackend

    config = config_for(small_pipeline, [HeadPattern.local(0, 0, 0)] * 2, dense_steps=1)
    prompts = ["a blue square moves up"]
    eager = evaluate_config(small_pipeline, config, prompts, seed=5, num_steps=3)
    counter = CompileCounterWithBackend("eager")  # dynamo's graphs; AOT: tests/test_compile.py
    compiled = evaluate_config(
        small_pipeline, config, prompts, seed=5, num_steps=3, compile_backend=counter
    )
    for transformer in small_pipeline.transformers:  # back to eager for the other tests
        for block in transformer.blocks:
            block._compiled_call_impl = None
    assert counter.frame_count == 3
    assert compiled.mean_psnr_db == pytest.approx(eager.mean_psnr_db, abs=1e-3)
    assert compiled.dense_attention_s is None and compiled.compact_attention_s is None
    assert set(compiled.extra["warmup_s"]) == {"dense", "compact"}
