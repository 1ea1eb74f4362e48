"""profile -> optimize -> export -> check -> apply on a small random-weight built-in model.

Random weights have little attention structure, so the search keeps most tiles; the test pins
the plumbing: every stage reads what the previous one wrote, the gate passes the exported config
and fails a degraded one, and the runtime runs the exported config inside the sampler.
"""

import datetime
import json

import pytest
import torch
from cli_runner import run
from safetensors.torch import load_file

from compact_search import config as config_module
from compact_search.config import load_config
from compact_search.runtime.kernels.flex import load_flex_masks

SMALL = """
name = "small"
[model]
source = "builtin:tiny-random"
adapter = "wan"
dtype = "float32"
[sampling]
height = 16
width = 32
frames = 4
steps = 6
guidance = 4.0
prompts = ["a red circle moves left slowly over a plain grey background",
           "a blue square moves up quickly over a striped green background"]
seeds = [3]
[capture]
steps = [3, 5]
layers = "all"
tiles = [[1, 4, 4], [2, 4, 8]]
store = "per-prompt"
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    (root / "small.toml").write_text(SMALL)
    assert run("profile", root / "small.toml", "--out", root / "profile") == 0
    assert (
        run(
            "optimize",
            root / "profile",
            "--out",
            root / "run",
            "--trials",
            "4",
            "--dense-steps",
            "2",
            "--buckets",
            "1",
            "--workers",
            "1",
        )
        == 0
    )
    assert (
        run("export", root / "run", "--out", root / "config.json", "--profile", root / "profile")
        == 0
    )
    return root


def test_export_writes_a_valid_config_with_measured_stats(workspace):
    config = load_config(workspace / "config.json")
    assert config.model.adapter == "wan" and config.geometry.grid.as_tuple() == (4, 8, 16)
    stats = config.heads[0][0][0].stats
    assert stats["recall_min"] >= 0.9 - 1e-6 and 0 < stats["density"] <= 1
    # The runtime builds lookup tables itself: the export writes nothing beside the config.
    assert not list(workspace.glob("config.*.safetensors"))


def test_gate_passes_the_export_and_fails_a_degraded_config(workspace):
    assert (
        run("check", "--config", workspace / "config.json", "--profile", workspace / "profile") == 0
    )
    degraded = json.loads((workspace / "config.json").read_text())
    for layer in degraded["buckets"][0]["layers"]:
        for head in layer:
            head["pattern"] = {
                "kind": "structured",
                "groups": [{"frames": [0, 1], "rects": [[0, 0]]}],
            }
    (workspace / "degraded.json").write_text(json.dumps(degraded))
    out = workspace / "report.xml"
    code = run(
        "check",
        "--config",
        workspace / "degraded.json",
        "--profile",
        workspace / "profile",
        "--baseline",
        workspace / "config.json",
        "--format",
        "junit",
        "--output",
        out,
    )
    assert code == 1
    assert "<failure" in out.read_text()


def test_export_at_another_recall_and_as_flex_masks(workspace):
    assert (
        run(
            "export",
            workspace / "run",
            "--out",
            workspace / "c80.json",
            "--profile",
            workspace / "profile",
            "--recall",
            "0.8",
            "--format",
            "flex",
        )
        == 0
    )
    config = load_config(workspace / "c80.json")
    assert config.provenance["recall_threshold"] == 0.8
    base = load_config(workspace / "config.json").summary()["mean_density"]
    assert config.summary()["mean_density"] <= base + 1e-9
    masks = load_flex_masks(workspace / "c80.flex.safetensors")
    block = masks[(0, 0)].to_dense()[0]  # [H, nb, nb]
    assert torch.equal(block.bool(), config.block_masks(0, 0))


def test_exported_config_runs_inside_the_sampler(workspace):
    from compact_search import apply
    from compact_search.models.adapters import load_model
    from compact_search.profiling import load_run_profile

    settings = load_run_profile(workspace / "small.toml")
    model = load_model(settings, torch.device("cpu"))
    handle = apply(model.transformers[0], workspace / "config.json")
    steps = []

    def on_step(step):
        handle.set_step(step, settings.num_steps)
        steps.append(handle.current_bucket())

    with torch.no_grad():
        model.run(
            [settings.prompts[0]],
            seed=3,
            num_steps=settings.num_steps,
            guidance_scale=settings.guidance,
            on_step=on_step,
        )
    handle.revert()
    assert steps[:2] == [None, None] and set(steps[2:]) == {0}
    assert handle.calls["sparse"] > 0 and handle.calls["dense"] > 0


def keeps(rect, dh: int, dw: int, tile_grid) -> bool:
    """A window's definition for one tile pair, independent of `HeadPattern.tile_mask`."""
    if "h" in rect.wrap:
        dh = min(dh, tile_grid.height - dh)
    if "w" in rect.wrap:
        dw = min(dw, tile_grid.width - dw)
    return rect.h_from <= dh <= rect.height and rect.w_from <= dw <= rect.width


def test_far_windows_through_check_flex_and_the_sampler(workspace):
    """A config with band and wrapped windows (version 2): `check` measures its recall from the
    tile masks exactly as the per-pair definition does, the flex export holds its block masks,
    and the runtime runs it inside the sampler."""
    from compact_search import apply
    from compact_search.config import CompactConfig, HeadEntry, save_config
    from compact_search.export import write_flex_masks
    from compact_search.geometry import tile_coordinates
    from compact_search.models.adapters import load_model
    from compact_search.patterns import FrameGroup, HeadPattern, Rect
    from compact_search.profiling import load_profile, load_run_profile

    config = load_config(workspace / "config.json")
    tile_grid = config.layout().tile_grid
    ft, ht, wt = tile_grid.as_tuple()
    far = HeadPattern(
        (
            # the near row plus the opposite edge, and the far corner band
            FrameGroup(0, 1, (Rect(0, wt // 2, wrap="w"), Rect(ht - 1, wt - 1, ht - 1, wt - 1))),
            FrameGroup(1, ft, (Rect(ht - 1, wt - 1, 0, wt - 1),)),  # only the farthest columns
        )
    )
    heads = tuple(
        tuple(tuple(HeadEntry(far) for _ in layer) for layer in bucket) for bucket in config.heads
    )
    edited = CompactConfig(config.model, config.geometry, config.schedule, heads, config.provenance)
    path = workspace / "far.json"
    save_config(edited, path)
    assert json.loads(path.read_text())["version"] == 2
    report_path = workspace / "far-report.json"
    args = ["check", "--config", path, "--profile", workspace / "profile", "--min-recall", "0"]
    assert run(*args, "--format", "json", "--output", report_path) == 0
    report = json.loads(report_path.read_text())
    profile = load_profile(workspace / "profile")
    coords = tile_coordinates(tile_grid).tolist()
    kept = torch.tensor(
        [
            [
                any(
                    g.start <= abs(fq - fk) < g.stop
                    and any(keeps(r, abs(hq - hk), abs(wq - wk), tile_grid) for r in g.rects)
                    for g in far.groups
                )
                for fk, hk, wk in coords
            ]
            for fq, hq, wq in coords
        ]
    )
    mass = profile.sample_tile_mass(0, tile=config.geometry.tile, steps=[3, 5])  # [S, H, nt, nt]
    expected = (mass * kept).sum(-1).mean(-1).mean(0)  # [H]
    measured = [h["recall_mean"] for h in report["heads"] if h["layer"] == 0]
    assert measured == pytest.approx(expected.tolist(), abs=1e-6)
    assert all(h["kind"] == "far" for h in report["heads"])
    flex = load_flex_masks(write_flex_masks(edited, workspace / "far.flex.safetensors"))
    assert torch.equal(flex[(0, 1)].to_dense()[0].bool(), edited.block_masks(0, 1))
    settings = load_run_profile(workspace / "small.toml")
    model = load_model(settings, torch.device("cpu"))
    handle = apply(model.transformers[0], path)
    with torch.no_grad():
        model.run(
            [settings.prompts[0]],
            seed=3,
            num_steps=settings.num_steps,
            guidance_scale=settings.guidance,
            on_step=lambda step: handle.set_step(step, settings.num_steps),
        )
    handle.revert()
    assert handle.calls["sparse"] > 0


class FrozenClock(datetime.datetime):
    """`created` in the provenance, the same second for every export of a test."""

    @classmethod
    def now(cls, tz=None):
        return datetime.datetime(2026, 12, 1, 12, 0, 0, tzinfo=tz)


def export_at(workspace, out, *extra) -> int:
    return run(
        "export", workspace / "run", "--out", out, "--profile", workspace / "profile", *extra
    )


def test_export_precision_fp8_is_the_one_field_a_bf16_export_lacks(workspace, monkeypatch, capsys):
    monkeypatch.setattr(config_module._dt, "datetime", FrozenClock)
    out = workspace / "exports"
    out.mkdir()
    capsys.readouterr()
    assert export_at(workspace, out / "default.json") == 0
    assert "precision" not in capsys.readouterr().out
    assert export_at(workspace, out / "bf16.json", "--precision", "bf16") == 0
    assert "precision" not in capsys.readouterr().out
    assert export_at(workspace, out / "fp8.json", "--precision", "fp8") == 0
    summary = capsys.readouterr().out
    assert "mean cost" in summary and "precision fp8" in summary, summary
    default = (out / "default.json").read_bytes()
    assert (out / "bf16.json").read_bytes() == default
    assert "precision" not in json.loads(default)
    fp8 = json.loads((out / "fp8.json").read_text())
    assert fp8.pop("precision") == "fp8"
    assert fp8 == json.loads(default)
    assert load_config(out / "fp8.json").precision == "fp8"
    assert load_config(out / "default.json").precision == "bf16"
    assert export_at(workspace, out / "int8.json", "--precision", "int8") == 0
    assert "precision int8" in capsys.readouterr().out
    int8 = json.loads((out / "int8.json").read_text())
    assert int8.pop("precision") == "int8" and int8 == json.loads(default)


def test_an_fp8_flex_export_writes_the_bf16_masks_and_says_flex_runs_them_in_16_bits(
    workspace, capsys
):
    out = workspace / "flex-exports"
    out.mkdir()
    assert export_at(workspace, out / "bf16.json", "--format", "flex") == 0
    capsys.readouterr()
    assert export_at(workspace, out / "fp8.json", "--format", "flex", "--precision", "fp8") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "FlexAttention" in line]
    assert len(warnings) == 1 and "no 8-bit path" in warnings[0], warnings
    masks, bf16 = (load_file(out / f"{name}.flex.safetensors") for name in ("fp8", "bf16"))
    assert masks.keys() == bf16.keys() and all(torch.equal(masks[k], bf16[k]) for k in masks)
    assert load_config(out / "fp8.json").precision == "fp8"


def test_check_kernel_and_evaluate_run_an_fp8_export_at_fp8(workspace, capsys):
    config = workspace / "fp8-run.json"
    assert export_at(workspace, config, "--precision", "fp8") == 0
    report_path = workspace / "fp8-check.json"
    args = ("check", "-c", config, "-p", workspace / "profile", "--kernel", "--format", "json")
    assert run(*args, "--output", report_path) == 0
    kernel = json.loads(report_path.read_text())["kernel"]
    assert kernel and {(k["precision"], k["kernel"]) for k in kernel} == {
        ("fp8", "triton-portable-fp8")
    }
    # The 8-bit path takes 16-bit inputs: the same model in bf16.
    bf16 = workspace / "small-bf16.toml"
    bf16.write_text(SMALL.replace('dtype = "float32"', 'dtype = "bfloat16"'))
    capsys.readouterr()
    options = ("--prompts", "1", "--device", "cpu", "--out", workspace / "fp8-eval")
    assert run("evaluate", bf16, "-c", config, *options, "--format", "json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "fp8"
    assert report["configs"][0]["kernels"] == ["reference-fp8"]
