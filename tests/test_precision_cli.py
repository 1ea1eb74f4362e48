"""--precision on `evaluate`, `bench`, `check --kernel` and `export`: parsed, checked in one line
(exit 2), passed on, and reported (CPU, the Triton interpreter for the kernel check)."""

import json
from pathlib import Path

import pytest
import torch
from cli_runner import run
from test_check import GRID, TILE, PlantedProfile

from compact_search.bench import CSV_FIELDS, gated_errors, reference_errors, triton_runs
from compact_search.check import check_config, junit_xml
from compact_search.config import (
    GeometrySpec,
    ModelSpec,
    StepSchedule,
    save_config,
    uniform_config,
)
from compact_search.geometry import Grid, TileShape
from compact_search.patterns import HeadPattern
from compact_search.runtime.attention import recorded_kernels

REPO = Path(__file__).resolve().parents[1]


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def failure(capsys, *args) -> str:
    capsys.readouterr()
    assert run(*args) == 2
    return error_line(capsys.readouterr().err)


BAD = "--precision must be one of bf16, fp8, int8, got 'fp4'"


def test_bad_precisions_are_one_line_and_exit_2(capsys, tmp_path):
    config = tmp_path / "c.json"
    assert BAD in failure(capsys, "evaluate", "-c", config, "--precision", "fp4")
    assert BAD in failure(capsys, "bench", "--precision", "fp4")
    check = ("check", "-c", config, "-p", tmp_path, "--kernel", "--precision", "fp4")
    assert BAD in failure(capsys, *check)
    # Checked before the run folder is read: this one does not exist.
    assert BAD in failure(capsys, "export", tmp_path / "run", "-o", config, "--precision", "fp4")
    assert not config.exists()
    line = failure(capsys, "check", "-c", config, "-p", tmp_path, "--precision", "fp8")
    assert "--precision sets the kernel check's arithmetic: add --kernel" in line
    line = failure(capsys, "bench", "--precision", "int8", "--providers", "triton,triton-pointers")
    assert "--precision int8: triton-pointers runs bf16 only" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal after parsing")
@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_bench_takes_8_bits_then_asks_for_a_gpu(capsys, precision):
    assert "needs a CUDA GPU" in failure(capsys, "bench", "--precision", precision)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_bench_rows_carry_the_precision_and_its_triton_runs_take_it(precision):
    assert CSV_FIELDS[:3] == ("kernel", "provider", "precision")
    assert set(triton_runs(precision)) == {"triton", "triton-portable"}
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 131, 64, generator=gen).half() for _ in range(3))
    mask = torch.tensor([[[1, 0, 1], [0, 1, 0], [1, 1, 1]]], dtype=torch.bool)
    with recorded_kernels() as ran:
        for run_kernel in triton_runs(precision).values():
            out = run_kernel(q, k, v, mask, block_size=64)
            assert out.shape == q.shape and torch.isfinite(out).all()
    assert ran == [f"triton-portable-{precision}"] * 2


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_bench_holds_an_8_bit_kernel_to_the_8_bit_emulation(precision):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 3, 200, 64, generator=gen).half() for _ in range(3))
    mask = torch.rand(3, 4, 4, generator=gen) < 0.5
    mask[:, 2] = False  # a query block with no kept key block
    out = triton_runs(precision)["triton"](q, k, v, mask, block_size=64)
    errors = reference_errors(q, k, v, mask, out, 64, precision, heads=2)
    emulation = f"reference-{precision}"
    assert set(errors) == {"reference", emulation}
    assert errors[emulation] < 1e-3 < 1e-2 < errors["reference"]
    assert gated_errors({**errors, "flex": 0.04, "portable": 1e-4}, precision) == {
        emulation: errors[emulation],
        "portable": 1e-4,
    }
    bf16 = triton_runs("bf16")["triton"](q, k, v, mask, block_size=64)
    assert set(reference_errors(q, k, v, mask, bf16, 64, "bf16", heads=2)) == {"reference"}
    assert gated_errors({"reference": 1e-3, "flex": 2e-3}, "bf16") == {
        "reference": 1e-3,
        "flex": 2e-3,
    }


def block64_config(pattern):
    return uniform_config(
        ModelSpec("m", "wan", 2, 2, 64),
        GeometrySpec(GRID, TILE, block_size=64),  # 16-token tiles padded to 64-token blocks
        StepSchedule(num_steps=10, dense_steps=3, bucket_starts=(3, 6)),
        pattern,
        provenance={"recall_threshold": 0.9},
    )


def test_the_kernel_check_runs_the_configs_precision_or_the_one_asked_for():
    config = block64_config(HeadPattern.local(0, 0, 1)).with_precision("fp8")
    with recorded_kernels() as ran:
        report = check_config(config, PlantedProfile(), kernel=True, kernel_layers=1)
    # One layer in each of two buckets: the 8-bit kernel, then its exact emulation.
    assert ran == ["triton-portable-fp8", "reference-fp8"] * 2
    assert [(k.precision, k.kernel, k.reference) for k in report.kernel] == [
        ("fp8", "triton-portable-fp8", "reference-fp8")
    ] * 2
    assert all(k.passed and k.relative_error < 1e-3 for k in report.kernel)
    assert report.to_json()["kernel"][0]["kernel"] == "triton-portable-fp8"
    assert 'classname="kernel"' in junit_xml(report)
    asked = check_config(
        config, PlantedProfile(), kernel=True, kernel_layers=1, kernel_precision="bf16"
    )
    assert [(k.precision, k.kernel, k.reference) for k in asked.kernel] == [
        ("bf16", "triton-portable", "fp32")
    ] * 2
    assert all(k.passed and k.fp32_relative_error == k.relative_error for k in asked.kernel)
    # The 8-bit path really quantizes: against fp32 it is well off the fp16 kernel.
    assert min(k.fp32_relative_error for k in report.kernel) > 10 * max(
        k.fp32_relative_error for k in asked.kernel
    )
    with recorded_kernels() as ran:
        int8 = check_config(
            config, PlantedProfile(), kernel=True, kernel_layers=1, kernel_precision="int8"
        )
    assert ran == ["triton-portable-int8", "reference-int8"] * 2
    assert [(k.precision, k.kernel, k.reference) for k in int8.kernel] == [
        ("int8", "triton-portable-int8", "reference-int8")
    ] * 2
    assert all(k.passed and k.relative_error < 1e-3 for k in int8.kernel)
    # INT8 P V: the same inputs, closer to fp32 than FP8 P V.
    for fp8_check, int8_check in zip(report.kernel, int8.kernel, strict=True):
        assert int8_check.fp32_relative_error < 0.8 * fp8_check.fp32_relative_error


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    """A bf16 random-weight built-in model profile (4 frames of 16x16: grid 4 x 8 x 8) and two
    configs of one pattern at block 64, one bf16, one fp8."""
    root = tmp_path_factory.mktemp("precision-cli")
    (root / "tiny.toml").write_text(
        (REPO / "profiles/tiny.toml")
        .read_text()
        .replace('"builtin:tiny"', '"builtin:tiny-random"')
        .replace('dtype = "float32"', 'dtype = "bfloat16"')
        .replace("height = 32", "height = 16")
        .replace("width = 32", "width = 16")
        .replace("frames = 8", "frames = 4")
    )
    config = uniform_config(
        ModelSpec("tiny-random", "wan", 6, 4, 64),
        GeometrySpec(Grid(4, 8, 8), TileShape(1, 4, 8), block_size=64),
        StepSchedule(num_steps=2, dense_steps=0, bucket_starts=(0,)),
        [HeadPattern.local(0, 0, 0), HeadPattern.dense()] * 2,
    )
    save_config(config, root / "bf16.json")
    save_config(config.with_precision("fp8"), root / "fp8.json")
    return root


def evaluate_json(capsys, root, out, *extra) -> dict:
    args = ("evaluate", root / "tiny.toml", "-c", root / "bf16.json", "-c", root / "fp8.json")
    capsys.readouterr()
    options = ("--prompts", "1", "--steps", "2", "--device", "cpu", "--out", out)
    assert run(*args, *options, "--format", "json", *extra) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_reports_each_configs_precision_and_the_flag_overrides_them(tiny_bf16, capsys):
    out = tiny_bf16 / "out"
    own = evaluate_json(capsys, tiny_bf16, out)
    bf16, fp8 = own["configs"]
    assert (bf16["precision"], bf16["kernels"]) == ("bf16", ["reference"])
    assert (fp8["precision"], fp8["kernels"]) == ("fp8", ["reference-fp8"])
    assert own["precision"] == "bf16"  # the first config's report at the top level
    assert bf16["mean_psnr_db"] != fp8["mean_psnr_db"]  # the 8-bit path changed the video
    assert own["cache"]["misses"] == 3

    forced = evaluate_json(capsys, tiny_bf16, out, "--precision", "fp8")
    first, second = forced["configs"]
    assert first["precision"] == second["precision"] == "fp8"
    assert first["kernels"] == ["reference-fp8"]
    # The cache keys hold the precision: the fp8 config's sample (and dense) are read back,
    # the bf16 config at fp8 is sampled anew and gives the fp8 config's video exactly.
    assert forced["cache"]["hits"] == 2 and forced["cache"]["misses"] == 1
    assert second["kernels"] == []
    assert first["mean_psnr_db"] == second["mean_psnr_db"] == fp8["mean_psnr_db"]

    int8 = evaluate_json(capsys, tiny_bf16, out, "--precision", "int8")
    assert [(c["precision"], c["kernels"]) for c in int8["configs"]] == [
        ("int8", ["reference-int8"])
    ] * 2
    assert int8["cache"]["hits"] == 1 and int8["cache"]["misses"] == 2  # dense read back
    assert int8["configs"][0]["mean_psnr_db"] not in (bf16["mean_psnr_db"], fp8["mean_psnr_db"])


def test_evaluate_table_names_the_precision(tiny_bf16, capsys):
    args = ("evaluate", tiny_bf16 / "tiny.toml", "-c", tiny_bf16 / "fp8.json", "--prompts", "1")
    capsys.readouterr()
    assert run(*args, "--steps", "2", "--device", "cpu", "--out", tiny_bf16 / "table") == 0
    table = capsys.readouterr().out
    precision_row = next(line for line in table.splitlines() if "precision" in line)
    assert "fp8" in precision_row
    kernels_row = next(line for line in table.splitlines() if "sparse kernels" in line)
    assert "reference-fp8" in kernels_row


def test_evaluate_table_says_when_fp8_ran_as_bf16(tiny_bf16, capsys):
    """The same configs on the float32 built-in model: fp8 is asked, the 16-bit kernels run."""
    profile = tiny_bf16 / "tiny-fp32.toml"
    text = (tiny_bf16 / "tiny.toml").read_text().replace('"bfloat16"', '"float32"')
    profile.write_text(text)
    args = ("evaluate", profile, "-c", tiny_bf16 / "fp8.json", "--prompts", "1", "--steps", "2")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="runs as 'bf16'"):
        assert run(*args, "--device", "cpu", "--out", tiny_bf16 / "fp32") == 0
    # The tmp folder's name holds "precision" too: find the rows by their first cell.
    rows = {
        cells[1].strip(): cells[2:]
        for line in capsys.readouterr().out.splitlines()
        if len(cells := line.split("│")) > 3
    }
    assert rows["precision"][1].strip() == "fp8 (ran bf16)"
    assert rows["sparse kernels"][1].strip() == "reference"
