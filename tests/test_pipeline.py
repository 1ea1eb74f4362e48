"""profile -> optimize -> export -> check -> apply on a small random-weight built-in model.

Random weights have little attention structure, so the search keeps most tiles; the test pins
the plumbing: every stage reads what the previous one wrote, the gate passes the exported config
and fails a degraded one, and the runtime runs the exported config inside the sampler.
"""

import json

import pytest
import torch
from cli_runner import run

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
