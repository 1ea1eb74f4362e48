"""The command line of benchmarks.bench_fp8 on a machine without a GPU: the probe's variant list
and its one-line errors (the timings themselves need a Hopper GPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks import bench_fp8

LOOKAHEAD_VARIANTS = {"lookahead", "lookahead-stages3", "lookahead-chain-rows"}


@pytest.mark.parametrize("version, offered", [((12, 8), False), ((12, 9), True), ((13, 0), True)])
def test_probe_offers_the_lookahead_only_under_a_ptxas_that_compiles_it(
    monkeypatch, version, offered
) -> None:
    monkeypatch.setattr(bench_fp8, "ptxas_version", lambda: version)
    variants = bench_fp8.probe_variants()
    assert "default" in variants
    assert (set(variants) >= LOOKAHEAD_VARIANTS) is offered
    assert not offered or all(variants[name][0].lookahead for name in LOOKAHEAD_VARIANTS)


def test_unknown_probe_variant_is_a_one_line_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_fp8", "--probe", "--variants", "default,nope"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "unknown --variants ['nope']" in done.stderr
    assert "Traceback" not in done.stderr
