"""`compact-search profile` end to end on the tiny architecture with random weights (CPU).

Round trip against brute force, per-prompt and prompt-mean stores, resume after an interruption
(in process, and a real subprocess killed mid-run), rank sharding and merge, damaged profiles.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape, tile_grid_of, video_token_tiles
from compact_search.models.adapters import load_model
from compact_search.profiling import load_profile, load_run_profile, run_profile
from compact_search.profiling.settings import resolve_run_profile
from compact_search.profiling.store import unit_name

REPO = Path(__file__).resolve().parents[1]

SMALL_PROFILE = """
name = "small"
[model]
source = "builtin:tiny-random"
adapter = "wan"
dtype = "float32"
[sampling]
height = 16
width = 16
frames = 2
steps = 4
guidance = 4.0
prompts = [
    "a red circle moves left slowly over a plain grey background",
    "a blue square moves up quickly over a striped green background",
    "a green triangle moves down slowly over a checkered brown background",
]
seeds = [7]
[capture]
steps = [1, 2]
layers = "all"
tiles = [[1, 4, 4], [2, 4, 4], [2, 8, 8]]
store = "{store}"
"""


def write_profile(tmp_path: Path, store: str = "per-prompt", text: str | None = None) -> Path:
    path = tmp_path / f"small-{store}.toml"
    path.write_text(text if text is not None else SMALL_PROFILE.format(store=store))
    return path


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted per-prompt run, shared by the tests that compare against it."""
    tmp = tmp_path_factory.mktemp("reference")
    settings = load_run_profile(write_profile(tmp))
    run_profile(settings, tmp / "profile", progress=False)
    return settings, load_profile(tmp / "profile")


def brute_force_mass(q: torch.Tensor, k: torch.Tensor, grid: Grid, tile: TileShape):
    """[H, nt, nt] fp64 from the full softmax, averaged over the batch (CFG pair)."""
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    one_hot = F.one_hot(video_token_tiles(grid, tile), tile_grid_of(grid, tile).num_tokens)
    one_hot = one_hot.double()
    sums = torch.einsum("bhqk,qi,kj->hij", probs, one_hot, one_hot)
    return sums / (one_hot.sum(0) * q.shape[0])[:, None]


def test_round_trip_matches_brute_force(reference_run):
    settings, profile = reference_run
    assert profile.grid == Grid(2, 8, 8)
    assert (profile.num_layers, profile.num_heads, profile.head_dim) == (6, 4, 64)
    assert profile.steps == [1, 2] and profile.num_steps == 4
    assert profile.prompts == list(settings.prompts) and profile.prefix_tokens == 0
    assert profile.tiles == [TileShape(1, 4, 4), TileShape(2, 4, 4), TileShape(2, 8, 8)]
    # Record q, k of prompt 1, step 2, layer 2 with a plain hook, independently of the profiler.
    model = load_model(settings, torch.device("cpu"))
    seen = {}
    state = {"step": -1}

    def record(layer, q, k, v):
        if layer == 2 and state["step"] == 2:
            seen["q"], seen["k"] = q.clone(), k.clone()
        return F.scaled_dot_product_attention(q, k, v)

    with torch.no_grad(), model.install(record):
        model.run(
            [settings.prompts[1]],
            seed=settings.seeds[1],
            num_steps=settings.num_steps,
            guidance_scale=settings.guidance,
            on_step=lambda s: state.update(step=s),
        )
    for tile in profile.tiles:
        expected = brute_force_mass(seen["q"], seen["k"], profile.grid, tile)  # [H, nt, nt]
        for head in (0, 3):
            got = profile.tile_mass(2, head, step=2, prompt=1, tile=tile)
            torch.testing.assert_close(got.double(), expected[head], atol=2e-3, rtol=2e-3)


def test_sample_axis_and_averages(reference_run):
    _, profile = reference_run
    samples = profile.sample_tile_mass(0, tile=(2, 4, 4))
    assert samples.shape == (6, 4, 4, 4) and samples.dtype == torch.float32  # 2 steps x 3 prompts
    torch.testing.assert_close(samples.sum(-1), torch.ones(6, 4, 4), atol=1e-5, rtol=0)
    assert profile.sample_index[:4] == [(1, 0), (1, 1), (1, 2), (2, 0)]
    only = profile.sample_tile_mass(0, tile=(2, 4, 4), steps=[2])
    torch.testing.assert_close(only, samples[3:])
    mean = profile.tile_mass(0, 3, tile=(2, 4, 4))
    expected = samples[:, 3].mean(0)
    torch.testing.assert_close(mean, expected / expected.sum(-1, keepdim=True), atol=1e-5, rtol=0)
    assert profile.tile_mass(0, 3).shape == (8, 8)  # first candidate 1x4x4: 2x2x2 tiles
    with pytest.raises(UserInputError, match="not profiled"):
        profile.tile_mass(0, 0, tile=(1, 2, 2))
    with pytest.raises(UserInputError, match="not captured"):
        profile.tile_mass(0, 0, step=0)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_in_process(tmp_path, reference_run):
    _, reference = reference_run
    settings = load_run_profile(write_profile(tmp_path))
    written = []

    def stop_after_eight(prompt, step, layer):
        written.append((prompt, step, layer))
        if len(written) == 8:  # mid-way through prompt 0, step 2 (6 layers a step)
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_profile(settings, tmp_path / "profile", progress=False, on_unit=stop_after_eight)
    with pytest.raises(UserInputError, match="unfinished profile"):
        load_profile(tmp_path / "profile")
    resumed = run_profile(settings, tmp_path / "profile", progress=False)
    assert resumed.resumed and resumed.skipped_units == 8
    assert resumed.captured_units == 3 * 2 * 6 - 8  # nothing captured twice
    assert load_profile(tmp_path / "profile").fingerprint == reference.fingerprint


def test_resume_after_killing_a_real_cli_run(tmp_path, reference_run):
    _, reference = reference_run
    toml = write_profile(tmp_path)
    out = tmp_path / "profile"
    command = [sys.executable, "-m", "cli", "profile", str(toml), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    part = out / "parts" / "rank-0"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if part.is_dir() and len(list(part.glob("s*.safetensors"))) >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "profile.json").exists()
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "resumed" in finished.stdout
    profile = load_profile(out)
    assert profile.fingerprint == reference.fingerprint  # nothing lost, nothing doubled
    assert not list(out.rglob("*.tmp"))


def test_ranks_shard_prompts_and_merge(tmp_path, reference_run):
    _, reference = reference_run
    settings = load_run_profile(write_profile(tmp_path))
    out = tmp_path / "sharded"
    # Rank 1 of 2 takes prompt 1 and leaves its part; rank 0 takes prompts 0 and 2, then merges.
    partial = run_profile(settings, out, rank=1, world=2, progress=False)
    assert not partial.complete and partial.captured_units == 1 * 2 * 6
    assert not (out / "profile.json").exists()
    done = run_profile(settings, out, rank=0, world=2, progress=False)
    assert done.complete and done.captured_units == 2 * 2 * 6
    assert not (out / "parts").exists()
    assert load_profile(out).fingerprint == reference.fingerprint


def test_prompt_mean_store_sharded(tmp_path, reference_run):
    """Prompt-mean store: S = captured steps, each sample the mean over prompts; the rank merge
    weights each part's mean by its prompt count."""
    _, per_prompt = reference_run
    settings = load_run_profile(write_profile(tmp_path, "prompt-mean"))
    out = tmp_path / "profile"
    run_profile(settings, out, rank=1, world=2, progress=False)
    run_profile(settings, out, rank=0, world=2, progress=False)
    profile = load_profile(out)
    samples = profile.sample_tile_mass(1)
    assert samples.shape == (2, 4, 8, 8)
    assert profile.sample_index == [(1, None), (2, None)]
    expected = per_prompt.sample_tile_mass(1).view(2, 3, 4, 8, 8).mean(1)
    torch.testing.assert_close(samples, expected, atol=2e-3, rtol=0)
    with pytest.raises(UserInputError, match="mean over prompts"):
        profile.tile_mass(1, 0, prompt=0)


def test_damaged_profiles_fail_with_one_line(tmp_path, reference_run):
    _, reference = reference_run
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference.path, copy)
    unit = copy / "tile_mass" / unit_name(2, 2)
    data = unit.read_bytes()
    unit.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError) as info:
        load_profile(copy)
    assert "\n" not in str(info.value) and unit.name in str(info.value)
    unit.unlink()
    with pytest.raises(UserInputError, match="missing"):
        load_profile(copy)
    (copy / "profile.json").write_text("{not json")
    with pytest.raises(UserInputError, match="unreadable"):
        load_profile(copy)
    with pytest.raises(UserInputError, match="no profile"):
        load_profile(tmp_path / "nowhere")


def test_other_settings_in_the_same_folder_are_refused(tmp_path, reference_run):
    settings, _ = reference_run
    out = tmp_path / "profile"
    run_profile(replace(settings, capture_steps=(1,)), out, progress=False)
    with pytest.raises(UserInputError, match="other settings"):
        run_profile(settings, out, progress=False)


BAD_FIELDS = [
    ("steps = 4", "steps = 0", "sampling.steps"),
    ("steps = [1, 2]", "steps = [1, 9]", "capture.steps"),
    ("steps = [1, 2]", "steps = [2, 1]", "capture.steps"),
    ("tiles = [[1, 4, 4], [2, 4, 4], [2, 8, 8]]", "tiles = [[1, 0, 4]]", "capture.tiles"),
    ('adapter = "wan"', 'adapter = "sora"', "model.adapter"),
    ("seeds = [7]", "seeds = [1, 2]", "sampling.seeds"),
    ('dtype = "float32"', 'dtype = "int8"', "model.dtype"),
    ('store = "{store}"', 'store = "zip"', "capture.store"),
    ("height = 16", 'height = "tall"', "sampling.height"),
    ("guidance = 4.0", "guidance = [4]", "sampling.guidance"),
    ('source = "builtin:tiny-random"', 'source = "builtin:huge"', "model.source"),
    ("[capture]", "[capture\n", "toml"),
]


@pytest.mark.parametrize("old,new,field", BAD_FIELDS, ids=[f for _, _, f in BAD_FIELDS])
def test_bad_fields_give_one_line_naming_the_field(tmp_path, old, new, field):
    text = SMALL_PROFILE.replace(old, new).format(store="per-prompt")
    with pytest.raises(UserInputError) as info:
        load_run_profile(write_profile(tmp_path, text=text))
    message = str(info.value)
    assert field in message and "\n" not in message.strip()


def test_shipped_profiles_parse():
    names = sorted(p.stem for p in (REPO / "profiles").glob("*.toml"))
    assert "tiny" in names
    for name in names:
        settings = load_run_profile(resolve_run_profile(name))
        assert settings.tiles and settings.prompts


def test_cli_bad_profile_exits_2_with_one_line(tmp_path):
    bad = write_profile(tmp_path, text=SMALL_PROFILE.replace("steps = 4", "steps = -1"))
    result = subprocess.run(
        [sys.executable, "-m", "cli", "profile", str(bad), "--out", str(tmp_path / "p")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "sampling.steps" in result.stderr


@pytest.mark.parametrize("prefix_at", ["start", "end"])
def test_recorder_renormalises_over_video_keys(prefix_at):
    """MM-DiT prefix tokens: the output is the full dense attention; the tile mass is the
    softmax over video keys only, averaged over the step's calls weighted by batch."""
    from compact_search.profiling.capture import TileMassRecorder

    grid, tiles, prefix = Grid(2, 4, 4), (TileShape(1, 2, 2), TileShape(2, 4, 4)), 5
    recorder = TileMassRecorder(grid, tiles, prefix_at)
    recorder.start_step(frozenset({3}))
    gen = torch.Generator().manual_seed(0)
    calls = [torch.randn(3, b, 2, prefix + grid.num_tokens, 16, generator=gen) for b in (1, 2)]
    for q, k, v in calls:
        out = recorder(3, q, k, v)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert recorder(0, *calls[0]).shape == calls[0][0].shape  # uncaptured layer: dense only
    masses = recorder.take()
    assert recorder.prefix_tokens == prefix and set(masses) == {3}
    video = slice(prefix, None) if prefix_at == "start" else slice(0, grid.num_tokens)
    for tile in tiles:
        expected = (
            sum(
                brute_force_mass(q[:, :, video], k[:, :, video], grid, tile) * q.shape[0]
                for q, k, _ in calls
            )
            / 3
        )
        torch.testing.assert_close(masses[3][tile].double(), expected, atol=1e-5, rtol=1e-5)


def test_missing_checkpoint_is_one_line(tmp_path):
    text = SMALL_PROFILE.format(store="per-prompt").replace(
        'source = "builtin:tiny-random"', 'source = "no-such-checkpoint"'
    )
    settings = load_run_profile(write_profile(tmp_path, text=text))
    with pytest.raises(UserInputError, match="not a local diffusers pipeline"):
        run_profile(settings, tmp_path / "profile", progress=False)


def test_rank0_gives_up_on_a_dead_rank_with_one_line(tmp_path, monkeypatch):
    """world=2 but rank 1 never runs: rank 0 stops waiting once nothing changes for a while."""
    from compact_search.profiling import capture

    monkeypatch.setattr(capture, "MERGE_STALL_S", 0.3)
    monkeypatch.setattr(capture, "MERGE_POLL_S", 0.05)
    settings = load_run_profile(write_profile(tmp_path, "per-prompt"))
    with pytest.raises(UserInputError, match=r"no rank wrote a unit .* prompts \[1\]"):
        run_profile(settings, tmp_path / "profile", rank=0, world=2, progress=False)
    assert not (tmp_path / "profile" / "profile.json").exists()


def test_source_identity_follows_configs_and_weight_sizes_not_timestamps(tmp_path):
    from compact_search.models.adapters import source_identity

    folder = tmp_path / "checkpoint"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    config = folder / "transformer" / "config.json"
    config.write_text('{"num_layers": 30}')
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\0" * 64)
    first = source_identity(str(folder))
    os.utime(weights, (1, 1))  # a copy with new timestamps is the same checkpoint
    assert source_identity(str(folder)) == first
    config.write_text('{"num_layers": 40}')
    assert source_identity(str(folder)) != first
    config.write_text('{"num_layers": 30}')
    weights.write_bytes(b"\0" * 128)
    assert source_identity(str(folder)) != first
    assert source_identity("builtin:tiny") != source_identity("builtin:tiny-random")


def test_resuming_over_other_weights_is_refused(tmp_path, monkeypatch):
    from compact_search.profiling import capture

    settings = load_run_profile(write_profile(tmp_path))
    out = tmp_path / "profile"
    run_profile(settings, out, progress=False)
    monkeypatch.setattr(capture, "source_identity", lambda source: "retrained")
    with pytest.raises(UserInputError, match="other settings or model weights"):
        run_profile(settings, out, progress=False)
