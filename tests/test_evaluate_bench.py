"""bench_pipeline_e2e --smoke: the GPU figure's code path at tiny shapes, on the CPU."""

import csv

import pytest


@pytest.mark.slow
def test_smoke_mode_times_every_part_and_appends_two_rows(tmp_path):
    from benchmarks.bench_pipeline_e2e import main

    rows = main(["--smoke", "--out", str(tmp_path)])
    assert [r["mode"] for r in rows] == ["dense", "compact"]
    dense, compact = rows
    for row in rows:
        assert row["per_video_s"] >= row["denoise_s"] > 0
        assert row["text_encode_s"] > 0 and row["decode_s"] > 0
        assert 0 < row["attention_share"] < 1 and row["peak_memory_gib"] is None  # CPU
    assert dense["density"] == 1.0 and 0.1 < compact["density"] < 0.5
    assert compact["dense_steps"] == 1 and compact["psnr_db_vs_dense"] > 0
    with (tmp_path / "pipeline_e2e.csv").open() as handle:
        written = list(csv.DictReader(handle))
    assert [r["mode"] for r in written] == ["dense", "compact"]
    assert float(written[1]["speedup_per_video"]) == compact["speedup_per_video"]
