"""`compact-search evaluate` on saved random-weight Wan, CogVideoX and HunyuanVideo pipeline
folders (built as tests/test_real_pipeline_folder.py builds them, sampled at 2 steps).

Per folder: a config that runs every step dense gives the dense videos exactly (inf dB); one whose
patterns keep every tile gives them up to the kernel's float rounding; a sparse one changes them
(finite PSNR); a second run reads every sample from the cache; the report's keys are there.
On the Wan folder: a SIGKILLed run resumes from its finished samples, and bad input is one line
with exit code 2.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run
from test_real_pipeline_folder import CASES, PROMPTS, profile_toml

from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, save_config, uniform_config
from compact_search.evaluate import EvaluateOptions, run_evaluation
from compact_search.geometry import TileShape
from compact_search.models.adapters import load_model
from compact_search.patterns import HeadPattern
from compact_search.profiling import load_run_profile

REPO = Path(__file__).resolve().parent.parent
STEPS = 2
# 64x64 pixels, 5 frames: grid 2x4x4 (the VAE decode dominates the CPU time; it grows with pixels)
SIZE = {"height": 64, "width": 64, "frames": 5}


def write_config(
    model, prefix_tokens: int, path: Path, pattern: HeadPattern, dense_steps: int, steps=STEPS
):
    """A config of `pattern` in every head, over `steps` steps of which the first `dense_steps`
    run dense (a run of STEPS steps maps its steps onto those by position)."""
    config = uniform_config(
        ModelSpec("test", model.adapter.name, model.num_layers, model.num_heads, model.head_dim),
        GeometrySpec(
            model.grid,
            TileShape(1, 2, 2),
            block_size=16,
            prefix_tokens=prefix_tokens,
            prefix_at=model.adapter.prefix_at,
        ),
        StepSchedule(num_steps=steps, dense_steps=dense_steps, bucket_starts=(dense_steps,)),
        pattern,
    )
    save_config(config, path)
    return path


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def folder(request, tmp_path_factory):
    """The saved folder, its run profile, and three configs: all steps dense, every tile kept,
    and a sparse local window."""
    case = request.param
    root = tmp_path_factory.mktemp(f"evaluate-{case.name}")
    case.build(root / "pipe")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "one-prompt.txt").write_text(PROMPTS[0] + "\n")
    toml = profile_toml(case, root / "pipe", case.name, "prompts.txt", 0, **SIZE).replace(
        "steps = 6", f"steps = {STEPS}"
    )
    toml = toml.replace("steps = [0, 2, 4]", "steps = [0]")
    (root / "model.toml").write_text(toml)
    model = load_model(load_run_profile(root / "model.toml"), torch.device("cpu"))
    prefix = case.prefix_tokens
    configs = {
        # 4 steps, 3 dense: a 2-step run's steps 0 and 1 sit at positions 0 and 2, both dense.
        "all-dense": write_config(
            model, prefix, root / "all-dense.json", HeadPattern.local(0, 0, 0), 3, steps=4
        ),
        "keep-all": write_config(model, prefix, root / "keep-all.json", HeadPattern.dense(), 0),
        "sparse": write_config(model, prefix, root / "sparse.json", HeadPattern.local(0, 0, 0), 0),
    }
    return case, root, configs


def options(root: Path) -> EvaluateOptions:
    # A prompt of the profile's: the configs' prefix is its text length (HunyuanVideo).
    return EvaluateOptions(prompts_file=root / "one-prompt.txt", seeds=(7,))


def test_dense_keep_all_and_sparse_configs_and_the_cache(folder):
    case, root, configs = folder
    settings = load_run_profile(root / "model.toml")
    paths = [configs["all-dense"], configs["keep-all"], configs["sparse"]]
    out = root / "out"
    first = run_evaluation(settings, paths, out, torch.device("cpu"), options(root))
    dense, keep, sparse = first.reports
    assert math.isinf(dense.mean_psnr_db) and dense.mean_ssim == pytest.approx(1.0)
    assert all(math.isinf(v) for p in dense.prompts for v in p.psnr_per_frame_db)
    assert keep.mean_psnr_db > 60 and keep.mean_ssim > 0.9999
    assert math.isfinite(sparse.mean_psnr_db) and sparse.mean_psnr_db < keep.mean_psnr_db
    decoded_frames = len(dense.prompts[0].psnr_per_frame_db)
    assert decoded_frames >= settings.frames - 1  # CogVideoX's VAE decodes 4 frames a latent
    assert all(len(p.psnr_per_frame_db) == decoded_frames for p in sparse.prompts)
    assert [p.seed for p in sparse.prompts] == [7]
    assert first.cache == {"folder": str(out / "cache"), "hits": 0, "misses": 4}
    assert dense.dense_timing["text_encode_s"] > 0 and dense.dense_timing["decode_s"] > 0
    assert len(dense.prompts) == 1 and (out / "psnr_per_frame.png").stat().st_size > 0
    for report in first.reports:
        for prompt in report.prompts:
            assert Path(prompt.preview).stat().st_size > 0
            assert Path(prompt.preview_mp4).stat().st_size > 0

    report = json.loads((out / "evaluation.json").read_text())
    assert report["format"] == "compact-search/evaluation" and report["version"] == 1
    assert [c["label"] for c in report["configs"]] == ["all-dense", "keep-all", "sparse"]
    assert report["configs"][0]["mean_psnr_db"] == "inf"  # JSON has no inf
    assert report["evaluated_prompts"] == PROMPTS[:1]
    assert report["samples"] == [{"prompts": PROMPTS[:1], "seed": 7}]
    assert report["adapter"] == case.adapter and report["num_steps"] == STEPS

    second = run_evaluation(settings, paths[2:], out, torch.device("cpu"), options(root))
    assert second.cache["misses"] == 0 and second.cache["hits"] == 2
    again = second.reports[0]
    assert again.mean_psnr_db == sparse.mean_psnr_db
    assert again.dense_timing["cached_samples"] == 1
    assert again.compact_timing["cached_samples"] == 1


def test_latents_decode_to_what_the_pipeline_itself_returns(folder):
    """samples.to_videos on the latents equals the pipeline's own output_type="pt" video."""
    from compact_search.samples import to_videos

    _case, root, _configs = folder
    settings = load_run_profile(root / "model.toml")
    model = load_model(settings, torch.device("cpu"))
    model.pipeline.set_progress_bar_config(disable=True)
    latents = model.run(PROMPTS[:1], seed=5, num_steps=1, guidance_scale=1.0)
    videos = to_videos(model, latents, settings.frames)  # [1, 3, F, H, W]
    reference = model.pipeline(
        prompt=PROMPTS[:1],
        height=settings.height,
        width=settings.width,
        num_frames=settings.frames,
        num_inference_steps=1,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).frames  # [1, F, 3, H, W]
    torch.testing.assert_close(videos, reference.permute(0, 2, 1, 3, 4).float())


@pytest.mark.parametrize("folder", CASES[:1], indirect=True, ids=["wan"])
def test_a_killed_evaluate_resumes_from_its_finished_samples(folder):
    """SIGKILL once the first dense video is on disk; the next run samples only the rest."""
    _case, root, configs = folder
    out = root / "killed"
    args = [sys.executable, "-m", "cli", "evaluate", str(root / "model.toml")]
    args += ["--config", str(configs["sparse"]), "--prompts", str(root / "prompts.txt")]
    args += ["--seeds", "3", "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(args, cwd=root, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "cache").glob("*.safetensors")) and time.monotonic() < deadline:
            assert process.poll() is None, "evaluate ended before it was killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    finished = len(list((out / "cache").glob("*.safetensors")))
    assert 1 <= finished < 2 * len(PROMPTS)
    assert not (out / "evaluation.json").exists()
    settings = load_run_profile(root / "model.toml")
    resumed = run_evaluation(
        settings,
        [configs["sparse"]],
        out,
        torch.device("cpu"),
        EvaluateOptions(prompts_file=root / "prompts.txt", seeds=(3,)),
    )
    assert resumed.cache["hits"] == finished
    assert resumed.cache["misses"] == 2 * len(PROMPTS) - finished
    assert math.isfinite(resumed.reports[0].mean_psnr_db)


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("folder", CASES[:1], indirect=True, ids=["wan"])
def test_bad_input_is_one_line_with_exit_code_2(folder, tmp_path, capsys):
    _case, root, configs = folder
    base = ("evaluate", root / "model.toml", "--config", configs["sparse"], "--out", tmp_path)

    def failure(*extra) -> str:
        capsys.readouterr()
        assert run(*base, *extra) == 2
        return error_line(capsys.readouterr().err)

    assert "no such file" in failure("--prompts", tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    assert "holds no prompt" in failure("--prompts", tmp_path / "empty.txt")
    assert "--seeds" in failure("--prompts", root / "prompts.txt", "--seeds", "1,2,3")
    assert "--backend must be one of" in failure("--backend", "cudnn")

    model = load_model(load_run_profile(root / "model.toml"), torch.device("cpu"))
    other_grid = type(model.grid)(2, 4, 6)
    config = uniform_config(
        ModelSpec("test", "wan", model.num_layers, model.num_heads, model.head_dim),
        GeometrySpec(other_grid, TileShape(1, 4, 4), block_size=16),
        StepSchedule(num_steps=STEPS, dense_steps=0, bucket_starts=(0,)),
        HeadPattern.local(0, 0, 0),
    )
    save_config(config, tmp_path / "other-grid.json")
    capsys.readouterr()
    mismatch = ("evaluate", root / "model.toml", "--config", tmp_path / "other-grid.json")
    assert run(*mismatch, "--prompts", root / "prompts.txt", "--out", tmp_path) == 2
    assert "--rescale" in error_line(capsys.readouterr().err)

    gone = (root / "model.toml").read_text().replace(str(root / "pipe"), str(tmp_path / "gone"))
    (root / "gone.toml").write_text(gone)
    capsys.readouterr()
    assert run("evaluate", root / "gone.toml", "--config", configs["sparse"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "model.source" in line and "does not exist" in line


def test_every_adapter_has_a_latent_decoder():
    from compact_search.models.adapters import ADAPTERS
    from compact_search.samples import LATENT_DECODERS

    assert set(LATENT_DECODERS) == set(ADAPTERS)
