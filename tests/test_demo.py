"""`compact-search demo` end to end on the shipped built-in model, at a few sampling steps."""

import dataclasses
import math

from compact_search.demo import DemoOptions, run_demo

SHORT_PROFILE = """
name = "{name}"
[model]
source = "builtin:tiny"
adapter = "wan"
dtype = "float32"
[sampling]
height = 32
width = 32
frames = 8
steps = 4
guidance = 4.0
prompts = ["{prompt}"]
seeds = [{seed}]
[capture]
steps = [2, 3]
layers = "all"
tiles = [[1, 4, 4], [2, 4, 4], [1, 8, 8]]
store = "per-prompt"
"""


def test_demo_runs_every_stage_with_the_options_it_was_given(tmp_path):
    for name, prompt, seed in (
        ("short", "a red circle moves left slowly over a plain grey background", 1),
        ("short-heldout", "a red triangle moves down slowly over a checkered blue background", 2),
    ):
        (tmp_path / f"{name}.toml").write_text(
            SHORT_PROFILE.format(name=name, prompt=prompt, seed=seed)
        )
    options = dataclasses.replace(
        DemoOptions(),
        profile=str(tmp_path / "short.toml"),
        heldout_profile=str(tmp_path / "short-heldout.toml"),
        trials=2,
        eval_prompts=1,
        block_size=32,
        workers=1,
    )
    summary = run_demo(tmp_path / "demo", options, say=lambda message: None)

    geometry = summary.export.config.geometry
    assert geometry.block_size == 32  # the demo's block reaches the search and the config
    assert summary.export.config.schedule.dense_steps == round(0.3 * 4)
    assert list(summary.seconds) == [
        "1/6 profile",
        "2/6 optimize",
        "3/6 export",
        "4/6 profile held-out prompts",
        "5/6 check",
        "6/6 evaluate",
    ]
    assert len(summary.check.heads) == 2 * 6 * 4  # buckets x layers x heads of the shipped model
    assert 0.0 < summary.export.mean_density <= 1.0
    assert math.isfinite(summary.evaluation.mean_psnr_db)
    assert any((tmp_path / "demo" / "previews").iterdir())
