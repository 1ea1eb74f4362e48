"""What a new user meets at the edges (issue 18): strict run profiles, outputs that never
disagree on a full disk, files where folders should be, runs that remember their profile, clean
interruption of real process groups, warnings where a result is wasteful, readable tables.

Everything runs on the tiny architecture with random weights on the CPU, at toy sizes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import run
from rich.console import Console

import cli
from compact_search.config import load_config
from compact_search.errors import UserInputError
from compact_search.profiling import load_profile, load_run_profile
from compact_search.profiling.settings import SCHEMA, resolve_run_profile
from compact_search.profiling.store import unit_name

REPO = Path(__file__).resolve().parents[1]

SMALL = """
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
prompts = ["a red circle moves left slowly over a plain grey background",
           "a blue square moves up quickly over a striped green background"]
seeds = [7]
[capture]
steps = [1, 2]
layers = "all"
tiles = [[1, 4, 4], [2, 4, 4]]
store = "per-prompt"
"""

OPTIMIZE_SMALL = ["--trials", "3", "--dense-steps", "0", "--buckets", "1", "--workers", "1"]


def _sigint_as_in_a_terminal() -> None:
    """Started from a shell's background job (``cmd &`` without job control, as a CI script
    may run), the tests inherit SIGINT ignored, and so would the CLI, which Ctrl-C then could
    not stop: give it the default disposition a foreground terminal gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_process(*args, **popen) -> subprocess.Popen:
    """`python -m cli ARGS` in its own session (its own process group), output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *map(str, args)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_sigint_as_in_a_terminal,
        **popen,
    )


def run_cli(*args) -> subprocess.CompletedProcess:
    process = cli_process(*args)
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A capture and a search run of it at block size 16 (the toy tiles' size)."""
    root = tmp_path_factory.mktemp("hardening")
    (root / "small.toml").write_text(SMALL)
    assert run("profile", root / "small.toml", "--out", root / "profile") == 0
    run_dir = root / "elsewhere" / "run"  # not at profile/../run: export must find the capture
    assert run("optimize", root / "profile", "--out", run_dir, "--block-size", "16",
               *OPTIMIZE_SMALL) == 0  # fmt: skip
    return root


# --- run profiles are read strictly --------------------------------------------------------

TYPOS = [
    ("guidance = 4.0", "guidence = 7.0", "sampling.guidence", "'guidance'"),
    ("[capture]", "[captur]", "captur", "'capture'"),
    ('store = "per-prompt"', 'stor = "per-prompt"', "capture.stor", "'store'"),
    ('dtype = "float32"', 'dtype = "float32"\nadaptor = "wan"', "model.adaptor", "'adapter'"),
    ("[capture]", "[capture]\nframes = 2", "capture.frames", "'sampling.frames'"),
    ('name = "small"', 'name = "small"\nnmae = "x"', "nmae", "'name'"),
]


@pytest.mark.parametrize("old,new,field,suggestion", TYPOS, ids=[t[2] for t in TYPOS])
def test_unknown_keys_and_sections_fail_naming_the_closest_valid_one(
    tmp_path, old, new, field, suggestion
):
    path = tmp_path / "typo.toml"
    path.write_text(SMALL.replace(old, new, 1))
    with pytest.raises(UserInputError) as info:
        load_run_profile(path)
    message = str(info.value)
    assert f": {field}: unknown" in message and f"did you mean {suggestion}" in message, message
    assert "\n" not in message


def test_docs_list_every_key_of_the_schema():
    text = (REPO / "docs" / "profile.md").read_text()
    table = text[text.index("### Every key") :]
    for section, keys in SCHEMA.items():
        for key in keys:
            if key not in SCHEMA:  # section names are listed as sections
                assert f"`{section + '.' if section else ''}{key}`" in table, (section, key)


def test_a_refused_profile_leaves_nothing_that_refuses_the_corrected_rerun(tmp_path):
    good = """
name = "tiny-one-step"
[model]
source = "builtin:tiny"
adapter = "wan"
dtype = "float32"
[sampling]
height = 32
width = 32
frames = 8
steps = 20
prompts = ["a red circle moves left slowly over a plain grey background"]
[capture]
steps = [0]
layers = [0]
tiles = [[2, 8, 8]]
"""
    path, out = tmp_path / "p.toml", tmp_path / "out"
    path.write_text(good.replace("frames = 8", "frames = 16"))
    refused = run_cli("profile", path, "--out", out)
    assert refused.returncode == 2 and "16 frames" in refused.stderr, refused.stderr
    assert not (out / "settings.json").exists()
    path.write_text(good)
    fixed = run_cli("profile", path, "--out", out)
    assert fixed.returncode == 0, fixed.stderr
    assert load_profile(out).steps == [0]


# --- outputs that belong together are written together -------------------------------------


def enospc_from_call(monkeypatch, failing_call: int) -> None:
    """os.fsync raises ENOSPC from its `failing_call`-th call on (the disk filled up)."""
    real, calls = os.fsync, {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] >= failing_call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_export_on_a_full_disk_keeps_the_old_config_and_masks_together(
    workspace, tmp_path, monkeypatch, capsys
):
    config = tmp_path / "config.json"
    masks = tmp_path / "config.flex.safetensors"
    run_dir = workspace / "elsewhere" / "run"
    assert run("export", run_dir, "--out", config, "--format", "flex") == 0
    before = config.read_bytes(), masks.read_bytes()
    os.utime(config, (0, 0))  # a new config would differ only in its creation time
    capsys.readouterr()
    enospc_from_call(monkeypatch, 2)  # the config is flushed, the masks hit the full disk
    assert run("export", run_dir, "--out", config, "--format", "flex", "--recall", "0.5") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left" in err and masks.name in err, err
    assert (config.read_bytes(), masks.read_bytes()) == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_json_export_removes_older_flex_masks_beside_it(workspace, tmp_path):
    config = tmp_path / "config.json"
    run_dir = workspace / "elsewhere" / "run"
    assert run("export", run_dir, "--out", config, "--format", "flex") == 0
    assert run("export", run_dir, "--out", config, "--recall", "0.5") == 0
    assert not (tmp_path / "config.flex.safetensors").exists()


FULL_DISK_PROFILE = """
import resource, signal, sys
import cli
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
cli.main(sys.argv[2:])
"""


def test_profile_on_a_full_disk_is_one_line_and_a_truncated_unit_is_recomputed(workspace, tmp_path):
    out = tmp_path / "profile"
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_PROFILE)
    settings_size = len((workspace / "profile" / "settings.json").read_bytes())
    full = subprocess.run(
        [sys.executable, str(script), str(settings_size + 64), "profile",
         str(workspace / "small.toml"), "--out", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
    )  # fmt: skip
    err = full.stderr.strip()
    assert full.returncode == 2, full.stderr
    # a file size limit (EFBIG) stands in for the full disk: the same line, the same exit code
    assert len(err.splitlines()) == 1 and "File too large" in err, err
    assert re.search(r"\([\d.]+ [KMGT]?B free; writing it needs [\d.]+ [KMG]?B\)", err), err
    assert re.search(r"s000\d-l00\d\.safetensors", err), err
    assert run("profile", workspace / "small.toml", "--out", out) == 0  # the rerun completes
    reference = load_profile(workspace / "profile").fingerprint
    assert load_profile(out).fingerprint == reference

    unit = out / "tile_mass" / unit_name(2, 1)
    unit.write_bytes(unit.read_bytes()[:-100])  # a cut copy, a disk that filled up
    rerun = run_cli("profile", workspace / "small.toml", "--out", out)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 damaged units" in rerun.stdout
    assert load_profile(out).fingerprint == reference


def test_a_file_where_a_folder_should_be_is_named(workspace, tmp_path, capsys):
    blocker = tmp_path / "hostname"
    blocker.write_text("not a folder\n")
    cases = [
        ("export", workspace / "elsewhere" / "run", "--out", blocker / "x.json"),
        ("profile", workspace / "small.toml", "--out", blocker / "sub" / "profile"),
        ("optimize", workspace / "profile", "--out", blocker / "run", *OPTIMIZE_SMALL),
    ]
    for args in cases:
        capsys.readouterr()
        assert run(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{blocker} is a file, not a folder" in err, err


# --- the run records its profile -----------------------------------------------------------


def test_export_finds_the_recorded_profile_and_refuses_a_changed_one(workspace, tmp_path, capsys):
    run_dir = workspace / "elsewhere" / "run"
    recorded = json.loads((run_dir / "search.json").read_text())["study"]["profile"]
    assert Path(recorded) == (workspace / "profile").resolve()
    assert run("export", run_dir, "--out", tmp_path / "config.json") == 0
    config = load_config(tmp_path / "config.json")
    assert config.model.name == "small"  # the profile's name, not a folder path
    assert config.provenance["model_source"] == "builtin:tiny-random"

    changed = tmp_path / "changed"
    shutil.copytree(workspace / "profile", changed)
    moved = tmp_path / "moved-run"
    shutil.copytree(run_dir, moved)
    result = json.loads((moved / "search.json").read_text())
    result["study"]["profile"] = str(changed)
    (moved / "search.json").write_text(json.dumps(result))
    metadata = json.loads((changed / "profile.json").read_text())
    metadata["fingerprint"] = "0" * 32  # profiled again since: other numbers
    (changed / "profile.json").write_text(json.dumps(metadata))
    capsys.readouterr()
    assert run("export", moved, "--out", tmp_path / "other.json") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has changed since the run searched it" in err, err


# --- interruption ----------------------------------------------------------------------------


def interrupt_at(process: subprocess.Popen, marker: str, sig: int, timeout: float = 300):
    """Read stdout until `marker`, then send `sig` to the process group; -> (stdout, stderr)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            os.killpg(process.pid, sig)
            break
    out, err = process.communicate(timeout=120)
    return "".join(seen) + out, err


def assert_group_gone(pgid: int) -> None:
    """No process of the group is left (the optimize workers stopped with their parent)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail("processes of the interrupted command are still running")


def assert_interrupted(process, out: str, err: str) -> None:
    assert process.returncode == 130, (out, err)
    assert err.strip() == cli.INTERRUPTED, err
    assert "Traceback" not in out + err


def test_interrupted_profile_says_one_line_and_resumes(workspace, tmp_path):
    out = tmp_path / "profile"
    process = cli_process("profile", workspace / "small.toml", "--out", out)
    stdout, stderr = interrupt_at(process, "layer-steps to capture", signal.SIGINT)
    assert_interrupted(process, stdout, stderr)
    assert_group_gone(process.pid)
    assert not (out / "profile.json").exists()
    resumed = run_cli("profile", workspace / "small.toml", "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert load_profile(out).fingerprint == load_profile(workspace / "profile").fingerprint


def test_interrupted_demo_says_one_line(tmp_path):
    process = cli_process("demo", "--out", tmp_path / "demo", "--trials", "2", "--prompts", "1")
    stdout, stderr = interrupt_at(process, "layer-steps to capture", signal.SIGTERM)
    assert "1/6 profile" in stdout
    assert_interrupted(process, stdout, stderr)
    assert_group_gone(process.pid)


def test_interrupted_optimize_stops_its_workers_and_loses_no_trial(workspace, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, workers included); SIGTERM: the demo test."""
    run_dir = tmp_path / "run"
    args = ["optimize", workspace / "profile", "--out", run_dir, "--block-size", "16",
            "--workers", "2"]  # fmt: skip
    process = cli_process(*args, "--trials", "200")
    stdout, stderr = interrupt_at(process, "20 of 200 trials finished", signal.SIGINT)
    assert "optimize: trials: 200 to run" in stdout  # a plain line per stage without a TTY
    assert_interrupted(process, stdout, stderr)
    assert_group_gone(process.pid)
    resumed = run_cli(*args, "--trials", "20")
    assert resumed.returncode == 0, resumed.stderr
    finished = re.search(r"resuming study\s+\S+: (\d+) of 20 trials\s+finished", resumed.stdout)
    assert finished and int(finished.group(1)) >= 20, resumed.stdout
    assert "trials: 0 to run" in resumed.stdout
    assert "Traceback" not in resumed.stdout + resumed.stderr
    # the summary table fits the 80 columns it was given: no header cut short
    assert "…" not in resumed.stdout and "greedy" in resumed.stdout


# --- warnings where a result is wasteful ------------------------------------------------------


def test_a_wasteful_block_size_is_named(workspace, tmp_path):
    run_dir = tmp_path / "run"
    searched = run_cli("optimize", workspace / "profile", "--out", run_dir, *OPTIMIZE_SMALL)
    assert searched.returncode == 0, searched.stderr
    assert "--block-size" in searched.stderr and "padding" in searched.stderr, searched.stderr
    assert re.search(r"try --block-size (16|32)\n", searched.stderr), searched.stderr
    assert len(searched.stderr.strip().splitlines()) == 2  # one line a warning
    exported = run_cli("export", run_dir, "--out", tmp_path / "c.json", "--allow-below")
    assert exported.returncode == 0, exported.stderr
    assert "warning:" in exported.stderr and "--block-size" in exported.stderr
    fitting = run_cli("export", workspace / "elsewhere" / "run", "--out", tmp_path / "d.json")
    assert fitting.returncode == 0 and "warning" not in fitting.stderr, fitting.stderr


# --- held-out run profiles ---------------------------------------------------------------------


def test_every_shipped_model_has_a_heldout_profile():
    profiles = sorted(p for p in (REPO / "profiles").glob("*.toml") if "heldout" not in p.stem)
    assert len(profiles) >= 5
    for path in profiles:
        base = load_run_profile(path)
        heldout = load_run_profile(resolve_run_profile(f"{path.stem}-heldout"))
        assert heldout.name == f"{base.name}-heldout"
        for field in ("source", "adapter", "dtype", "height", "width", "frames", "num_steps",
                      "guidance", "tiles", "store"):  # fmt: skip
            assert getattr(heldout, field) == getattr(base, field), (path.stem, field)
        assert not set(heldout.prompts) & set(base.prompts), path.stem
        assert set(heldout.capture_steps) <= set(range(base.num_steps))


# --- tables at 80 columns -------------------------------------------------------------------


def test_the_failing_heads_table_fits_80_columns(workspace, tmp_path, monkeypatch):
    assert run("export", workspace / "elsewhere" / "run", "--out", tmp_path / "c.json") == 0
    config = json.loads((tmp_path / "c.json").read_text())
    for layer in config["buckets"][0]["layers"]:  # every head keeps its own query tile alone
        for head in layer:
            own_tile = {"frames": [0, 1], "rects": [[1, 1]]}
            head["pattern"] = {"kind": "structured", "groups": [own_tile]}
            head.pop("stats", None)
    (tmp_path / "bad.json").write_text(json.dumps(config))
    console = Console(width=80, record=True, force_terminal=False)
    monkeypatch.setattr(cli, "console", console)
    code = run("check", "--config", tmp_path / "bad.json", "--profile", workspace / "profile",
               "--baseline", tmp_path / "c.json")  # fmt: skip
    assert code == 1
    text = console.export_text()
    assert "failing heads" in text
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    header = next(line for line in lines if "pattern" in line)
    assert header.split() == ["head", "pattern", "density", "mean", "min", "tile", "base", "below"]
    row = lines[lines.index(header) + 2]
    assert re.match(r"\s*b0 l\d h\d ", row) and row.rstrip().endswith("0.9, base"), row
