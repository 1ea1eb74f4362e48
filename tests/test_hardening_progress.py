"""One progress display: `profile` on a diffusers pipeline folder switches the pipeline's own
per-prompt tqdm bars off, so they never interleave with profile's bar (or its plain lines)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from cli_runner import run  # noqa: E402
from test_real_pipeline_folder import CASES, profile_toml  # noqa: E402


def test_profile_shows_one_progress_display(tmp_path, capsys):
    wan = next(case for case in CASES if case.name == "wan")
    wan.build(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("a cat walks on the grass\na dog runs on a beach\n")
    (tmp_path / "model.toml").write_text(
        profile_toml(wan, tmp_path / "pipe", "wan-bars", "prompts.txt", 0)
    )
    capsys.readouterr()  # what building the folder printed
    assert run("profile", tmp_path / "model.toml", "--out", tmp_path / "profile") == 0
    captured = capsys.readouterr()
    # diffusers' bar of loading the folder comes before any of ours; no denoising bar follows
    bars = [line for line in captured.err.replace("\r", "\n").splitlines() if "it/s" in line]
    assert bars and all("Loading" in line for line in bars), bars
    assert "layer-steps to capture" in captured.out
