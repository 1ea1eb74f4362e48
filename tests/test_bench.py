"""`compact-search bench` on CPU: its masks, its FlexAttention check, its rows, CSV and plot.

Timing needs a GPU; everything the command computes around the timings runs here.
"""

import csv

import pytest
import torch
from cli_runner import run

from compact_search import sparse_attention
from compact_search.bench import (
    CSV_FIELDS,
    HEAD_KINDS,
    TRITON_RUNS,
    BenchShape,
    _candidates,
    add_speedups,
    block_grid,
    csv_rows,
    head_block_masks,
    parse_float_list,
    plot_speedups,
    rows_table,
    shape_by_name,
)
from compact_search.environment import append_rows
from compact_search.errors import UserInputError
from compact_search.runtime.kernels.flex import flex_block_mask

# 210 tokens at block 16: 14 blocks, the last one ragged (2 keys).
ODD = BenchShape("odd", (5, 6, 7), heads=5, head_dim=16)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.6], ids=["d0.1", "d0.3", "d0.6"])
def test_head_masks_pick_each_kinds_pattern_nearest_the_target(target):
    masks, kinds = head_block_masks(ODD, target, block_size=16)
    assert masks.shape == (5, 14, 14) and masks.dtype == torch.bool
    assert kinds == [HEAD_KINDS[h % len(HEAD_KINDS)] for h in range(5)]
    grid = block_grid(ODD, 16)
    for head, kind in enumerate(kinds):
        crops = [p.tile_mask(grid)[:14, :14] for p in _candidates(kind, grid)]
        nearest = min(abs(c.float().mean().item() - target) for c in crops)
        assert abs(masks[head].float().mean().item() - target) == pytest.approx(nearest)
        assert any(torch.equal(masks[head], c) for c in crops)
    assert torch.equal(masks[0], masks[4])  # same kind, same pattern


def test_dense_target_is_all_ones():
    masks, kinds = head_block_masks(ODD, 1.0, block_size=16)
    assert masks.all() and masks.shape == (5, 14, 14) and kinds == ["dense"] * 5


def test_flex_check_matches_the_reference_on_a_ragged_last_block():
    """The bench checks the kernel against FlexAttention on the runtime's block-level mask."""
    from torch.nn.attention.flex_attention import flex_attention

    masks, _ = head_block_masks(ODD, 0.3, block_size=16)
    masks[1, 3] = False  # a query block with no kept key block
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, ODD.tokens, 16, generator=gen) for _ in range(3))
    expected = sparse_attention(q, k, v, masks, block_size=16, backend="reference")
    got = flex_attention(q, k, v, block_mask=flex_block_mask(masks, ODD.tokens, 16))
    rows = slice(3 * 16, 4 * 16)
    torch.testing.assert_close(got[:, 1, rows], torch.zeros_like(got[:, 1, rows]))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("provider", sorted(TRITON_RUNS))
def test_every_timed_triton_provider_computes_the_reference(provider):
    """What each Triton provider the bench times runs (here under the interpreter) matches the
    reference on a ragged last block and a query block with no kept key block."""
    shape = BenchShape("odd-d64", (5, 6, 7), heads=2, head_dim=64)
    masks, _ = head_block_masks(shape, 0.3, block_size=16)
    masks[1, 3] = False
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, shape.tokens, 64, generator=gen).half() for _ in range(3))
    expected = sparse_attention(
        q.double(), k.double(), v.double(), masks, block_size=16, backend="reference"
    )
    got = TRITON_RUNS[provider](q, k, v, masks, block_size=16)
    assert got.dtype == torch.float16 and not got.isnan().any()
    torch.testing.assert_close(got.double(), expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("0.1,x", "comma-separated numbers"), ("0,0.5", r"\(0, 1\]"), ("1.5", r"\(0, 1\]")],
    ids=["not-a-number", "zero", "above-one"],
)
def test_bad_density_lists_are_user_errors(text, problem):
    with pytest.raises(UserInputError, match=problem):
        parse_float_list(text, "densities")


def test_parse_float_list_and_shape_names():
    assert parse_float_list("0.1,0.25,1", "densities") == [0.1, 0.25, 1.0]
    assert shape_by_name("wan2.1-14b-720p").tokens == 21 * 45 * 80
    with pytest.raises(UserInputError, match="unknown shape 'wan3'"):
        shape_by_name("wan3")


def _rows() -> list[dict[str, object]]:
    base = {"shape": "odd", "gpu": "card", "torch": "t", "triton": "tr", "head_kinds": "x"}
    return [
        {**base, "provider": "cudnn", "target_density": 1.0, "density": 1.0, "p50_ms": 10.0},
        {**base, "provider": "fa2", "target_density": 1.0, "density": 1.0, "p50_ms": 16.0},
        {**base, "provider": "flex", "target_density": 0.3, "density": 0.296, "p50_ms": 4.8},
        {**base, "provider": "triton", "target_density": 0.3, "density": 0.296, "p50_ms": 3.0},
    ]


def test_speedups_and_share_of_ideal():
    rows = {r["provider"]: r for r in add_speedups(_rows())}
    triton = rows["triton"]
    assert triton["speedup_vs_cudnn"] == pytest.approx(10.0 / 3.0, abs=1e-4)
    assert triton["speedup_vs_fa2"] == pytest.approx(16.0 / 3.0, abs=1e-4)
    assert triton["speedup_vs_flex"] == pytest.approx(1.6)
    assert triton["share_of_ideal"] == pytest.approx(10.0 * 0.296 / 3.0, abs=1e-4)
    assert rows["cudnn"]["speedup_vs_flex"] == "" and rows["fa2"]["speedup_vs_cudnn"] == 0.625


def test_rows_append_to_kernel_csv_under_its_columns(tmp_path):
    path = tmp_path / "kernel.csv"
    rows = add_speedups(_rows())
    rows[-1]["p20_ms"] = 2.987654321
    append_rows(path, csv_rows(rows[:2]))
    append_rows(path, csv_rows(rows[2:]))
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        written = list(reader)
    assert tuple(reader.fieldnames) == CSV_FIELDS
    assert [r["provider"] for r in written] == ["cudnn", "fa2", "flex", "triton"]
    assert written[-1]["p20_ms"] == "2.9877" and written[-1]["max_rel_err"] == ""


def test_plot_and_table_render(tmp_path):
    rows = add_speedups(_rows())
    for row in rows:
        row["p20_ms"], row["p80_ms"] = row["p50_ms"] * 0.99, row["p50_ms"] * 1.01
    plot_speedups(rows, tmp_path / "plot" / "kernel_speedup.png")
    assert (tmp_path / "plot" / "kernel_speedup.png").stat().st_size > 1000
    table = rows_table(rows)
    assert table.row_count == 4 and len(table.columns) == 10
    assert table.columns[2].header == "precision"
    assert list(table.columns[2].cells) == ["bf16"] * 4  # rows from before the column: bf16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer of `bench`")
def test_bench_command_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys):
    code = run("bench", "--shapes", "wan2.1-1.3b-480p", "--out-dir", tmp_path / "out")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "needs a CUDA GPU" in lines[0]
    assert not (tmp_path / "out").exists()


def test_bench_command_rejects_unknown_shapes_and_densities(capsys):
    assert run("bench", "--shapes", "nosuch") == 2
    assert "unknown shape 'nosuch'" in capsys.readouterr().err
    assert run("bench", "--densities", "0.2,2") == 2
    assert "densities must lie in (0, 1]" in capsys.readouterr().err
