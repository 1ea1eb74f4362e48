"""The project's own regression gate: the committed default config of the built-in model must keep
its recall on held-out prompts, and a deliberately degraded config must fail the gate.

Profiles `profiles/tiny-heldout.toml` (2 held-out prompts, steps 8 and 14 of 20) with the shipped
weights, then runs `compact-search check` on `configs/tiny-default.json`.
"""

import json
from pathlib import Path

import pytest
from cli_runner import run

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "tiny-default.json"


@pytest.fixture(scope="module")
def heldout_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("heldout") / "profile"
    assert run("profile", REPO / "profiles" / "tiny-heldout.toml", "--out", out) == 0
    return out


def test_committed_default_config_passes_on_heldout_prompts(heldout_profile, tmp_path):
    report = tmp_path / "gate.json"
    code = run(
        "check",
        "--config",
        DEFAULT_CONFIG,
        "--profile",
        heldout_profile,
        # Held-out prompts: recall may sit a little under the searched 0.9 (worst head 0.8935 on
        # 2026-11-27); the demo checks with 0.03 of slack, the gate with 0.02.
        "--tolerance",
        "0.02",
        "--format",
        "json",
        "--output",
        report,
    )
    data = json.loads(report.read_text())
    assert code == 0, [h for h in data["heads"] if not h["passed"]][:3]
    assert data["passed"] and data["failed_heads"] == 0
    assert all(count > 0 for count in data["samples_per_bucket"].values())


def test_degraded_config_fails_the_gate(heldout_profile, tmp_path):
    degraded = json.loads(DEFAULT_CONFIG.read_text())
    # shrink every head to its own tile: far below the 0.9 recall the config promises
    for bucket in degraded["buckets"]:
        for layer in bucket["layers"]:
            for head in layer:
                head["pattern"] = {
                    "kind": "structured",
                    "groups": [{"frames": [0, 1], "rects": [[0, 0]]}],
                }
                head.pop("stats", None)
    path = tmp_path / "degraded.json"
    path.write_text(json.dumps(degraded))
    code = run(
        "check", "--config", path, "--profile", heldout_profile, "--baseline", DEFAULT_CONFIG
    )
    assert code == 1
