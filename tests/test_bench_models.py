"""benchmarks/bench_models.py --smoke: the GPU figure script's code path on the CPU at toy sizes
of the same architectures (HunyuanVideo 1.5 and a Wan2.2-A14B expert)."""

from __future__ import annotations

import csv

from benchmarks.bench_models import main


def test_smoke_run_writes_a_dense_and_a_compact_row_per_model(tmp_path):
    rows = main(["--smoke", "--repeats", "1", "--out", str(tmp_path)])
    with open(tmp_path / "models.csv") as handle:
        written = list(csv.DictReader(handle))
    assert [(r["model"], r["provider"]) for r in written] == [
        ("hunyuanvideo1.5-720p", "dense-cudnn"),
        ("hunyuanvideo1.5-720p", "compact"),
        ("wan2.2-a14b-720p", "dense-cudnn"),
        ("wan2.2-a14b-720p", "compact"),
    ]
    assert rows[0]["prefix_tokens"] == 5 and rows[0]["tokens"] == 3 * 6 * 10
    for row in rows:
        assert 0.0 < row["attention_share"] < 1.0 and row["p50_ms"] > 0
    for compact in rows[1::2]:
        assert 0.0 < compact["density"] < 0.6  # planted near 0.3 (toy tile grids are coarse)
        assert compact["output_rel_change"] > 0.0  # the masks acted on the output


def test_smoke_run_of_skyreels(tmp_path):
    (dense, compact) = main(
        ["--smoke", "--repeats", "1", "--models", "skyreels-v2-14b-720p", "--out", str(tmp_path)]
    )
    assert (dense["provider"], compact["provider"]) == ("dense-cudnn", "compact")
    assert compact["output_rel_change"] > 0.0 and dense["tokens"] == 3 * 4 * 6
