"""evaluate: metrics, and dense vs compact on a small random-weight built-in pipeline."""

import math

import pytest
import torch

from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, uniform_config
from compact_search.evaluate import EvaluationReport, evaluate_config, psnr, ssim
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


def test_the_cli_path_gives_the_demo_paths_numbers_on_the_built_in_model(tmp_path):
    """`compact-search evaluate` (run_evaluation: one batch from --seed, the default) and
    evaluate_config (the demo) sample the same videos: the same PSNR, SSIM and fidelity."""
    from pathlib import Path

    from compact_search.config import save_config
    from compact_search.evaluate import EvaluateOptions, run_evaluation
    from compact_search.models.adapters import load_model
    from compact_search.profiling import load_run_profile

    (tmp_path / "random.toml").write_text(
        (Path(__file__).resolve().parents[1] / "profiles/tiny.toml")
        .read_text()
        .replace('"builtin:tiny"', '"builtin:tiny-random"')
        .replace("height = 32", "height = 16")
        .replace("width = 32", "width = 16")
        .replace("frames = 8", "frames = 4")
    )
    settings = load_run_profile(tmp_path / "random.toml")
    model = load_model(settings, torch.device("cpu"))
    config = uniform_config(
        ModelSpec("tiny-random", "wan", model.num_layers, model.num_heads, model.head_dim),
        GeometrySpec(model.grid, TileShape(1, 4, 4), block_size=16),
        StepSchedule(num_steps=2, dense_steps=0, bucket_starts=(0,)),
        HeadPattern.local(0, 0, 0),
    )
    save_config(config, tmp_path / "config.json")
    options = EvaluateOptions(prompt_count=2, seed=11, num_steps=2, guidance_scale=4.0)
    cli = run_evaluation(
        settings, [tmp_path / "config.json"], tmp_path, torch.device("cpu"), options
    )
    prompts = model.heldout_prompts(2, 11)
    demo = evaluate_config(model, config, prompts, seed=11, num_steps=2, guidance_scale=4.0)
    report = cli.reports[0]
    assert cli.prompts == prompts and "held-out" in cli.prompts_source
    assert report.mean_psnr_db == demo.mean_psnr_db and math.isfinite(demo.mean_psnr_db)
    assert report.mean_ssim == demo.mean_ssim
    assert report.compact_fidelity == demo.compact_fidelity is not None
    assert any("PyTorch reference" in note for note in report.extra["notes"])  # CPU


def test_per_frame_metrics_agree_with_per_video_ones():
    from compact_search.quality import psnr_per_frame, ssim_per_frame

    gen = torch.Generator().manual_seed(1)
    ref = torch.rand(2, 3, 5, 12, 11, generator=gen)
    test = ref.clone()
    test[:, :, 2] = (test[:, :, 2] + 0.05 * torch.randn(2, 3, 12, 11, generator=gen)).clamp(0, 1)
    frames = psnr_per_frame(test, ref)  # [2, 5]
    assert torch.isinf(frames[:, [0, 1, 3, 4]]).all() and torch.isfinite(frames[:, 2]).all()
    # one changed frame of five: the video's MSE is a fifth of that frame's (+ 10 log10 5 dB)
    torch.testing.assert_close(psnr(test, ref), frames[:, 2] + 10 * math.log10(5))
    torch.testing.assert_close(ssim_per_frame(test, ref).mean(dim=1), ssim(test, ref))
    assert (ssim_per_frame(test, ref)[:, 2] < 1).all()


def test_lpips_is_reported_missing_not_faked(monkeypatch, tmp_path):
    import compact_search.quality as quality

    monkeypatch.setattr(quality, "find_spec", lambda name: None)
    assert "lpips package is not installed" in quality.lpips_status()
    monkeypatch.setattr(quality, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert "AlexNet weights are not in" in quality.lpips_status()


def test_previews_are_labelled_dense_left_compact_right(tmp_path):
    from PIL import Image

    from compact_search.previews import save_gif, side_by_side

    grey = torch.full((3, 2, 32, 40), 0.5)
    grey[:, 1] = 0.6  # GIF writers merge identical frames
    frames = side_by_side(grey, grey, scale=2)
    assert frames[0].size == ((40 + 2 + 40) * 2, 64) and len(frames) == 2
    pixels = torch.tensor(list(frames[0].convert("L").getdata())).reshape(64, 164)
    left, right = pixels[:16, :80], pixels[:16, 84:]
    assert (left == 0).any() and (left > 200).any()  # white text on a black box, top-left
    assert (right == 0).any() and (right > 200).any()
    assert not torch.equal(left[:, :40], right[:, :40])  # "dense" and "compact" differ
    assert (pixels[40:, :] != 0).all()  # the rest of the frame is untouched
    path = save_gif(frames, tmp_path / "pair.gif")
    assert Image.open(path).n_frames == 2


@pytest.mark.parametrize(
    ("asked", "kernels", "ran"),
    [
        ("fp8", ("reference-fp8",), "fp8"),
        ("fp8", ("reference",), "bf16"),  # a float32 model: the 16-bit kernels after a warning
        ("fp8", ("triton-gluon-fp8", "triton-portable"), "fp8 and bf16"),
        ("bf16", ("triton-gluon",), "bf16"),
        ("fp8", (), "fp8"),  # every sample from the cache: nothing ran, the asked one stands
    ],
)
def test_a_report_names_the_precision_its_kernels_ran(asked, kernels, ran):
    report = EvaluationReport(
        [], math.nan, math.nan, None, None, None, None, 0.0, 0.0, 1.0, "cpu", 2, 0,
        precision=asked, kernels=kernels,
    )  # fmt: skip
    assert report.ran_precision == ran
