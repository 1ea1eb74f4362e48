"""benchmarks/bench_context_parallel.py: its CPU dry run end to end (one process, then two gloo
ranks into the same CSV), and the pieces that read profiles and judge rows."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.bench_context_parallel import all_to_all_time, dry_run_failures, single_gpu_p50

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bench(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cp-bench")
    module = ["-m", "benchmarks.bench_context_parallel", "--dry-run", "--out", str(out)]
    one = run_bench([sys.executable, *module])
    assert one.returncode == 0, one.stderr[-4000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    two = run_bench([*launcher, *module])
    assert two.returncode == 0, f"stdout: {two.stdout[-2000:]}\nstderr: {two.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_dry_run_writes_rows_for_one_and_two_ranks(dry_runs):
    with (dry_runs / "context_parallel.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["ulysses_degree"], r["provider"]) for r in rows] == [
        ("1", "compact"),
        ("1", "dense-cudnn"),
        ("2", "compact"),
        ("2", "dense-cudnn"),
    ]
    for row in rows:
        two = row["ulysses_degree"] == "2"
        assert row["compiled"] == "True" and row["compile_backend"] == "eager"
        assert float(row["rel_error_vs_1gpu"]) <= 1e-4
        assert int(row["all_to_all_calls"]) == (8 if two else 0)  # 4 per layer, 2 layers
        assert (float(row["all_to_all_ms"]) > 0) == two
        assert float(row["p50_ms"]) > 0 and float(row["first_call_s"]) > 0
    by_key = {(r["ulysses_degree"], r["provider"]): r for r in rows}
    for provider in ("compact", "dense-cudnn"):
        one, two = by_key[("1", provider)], by_key[("2", provider)]
        assert float(two["single_gpu_p50_ms"]) == float(one["p50_ms"])
        expected = float(one["p50_ms"]) / (2 * float(two["p50_ms"]))
        assert float(two["scaling_efficiency"]) == pytest.approx(expected, abs=1e-3)
    assert float(by_key[("2", "compact")]["rel_diff_vs_dense"]) > 1e-3  # the masks took effect
    details = json.loads((dry_runs / "context_parallel_N2.json").read_text())
    assert len(details["all_to_all_per_rank"]["compact"]) == 2  # both ranks reported


def kernel(name: str, us: float):
    return SimpleNamespace(
        name=name,
        device_type=torch.autograd.DeviceType.CUDA,
        time_range=SimpleNamespace(elapsed_us=lambda: us),
    )


def cpu_event(name: str, us: float):
    return SimpleNamespace(
        name=name,
        device_type=torch.autograd.DeviceType.CPU,
        time_range=SimpleNamespace(elapsed_us=lambda: us),
    )


def test_all_to_all_time_takes_nccl_send_receive_kernels_and_leaves_the_gather_out():
    events = [
        cpu_event("nccl:all_to_all", 5.0),
        cpu_event("nccl:all_to_all", 5.0),
        cpu_event("nccl:_allgather_base", 5.0),
        kernel("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 1500.0),
        kernel("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 500.0),
        kernel("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 9000.0),
        kernel("void at::native::vectorized_elementwise_kernel<4>", 7000.0),
    ]
    assert all_to_all_time(events) == (2.0, 2)


def test_all_to_all_time_on_gloo_takes_its_spans():
    events = [cpu_event("gloo:all_to_all", 250.0), cpu_event("_c10d_functional::wait_tensor", 1e4)]
    assert all_to_all_time(events) == (0.25, 1)


def row(**changes) -> dict:
    base = {
        "provider": "compact",
        "rel_error_vs_1gpu": 0.0,
        "rel_diff_vs_dense": 0.01,
        "all_to_all_calls": 8,
        "p50_ms": 10.0,
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    "bad, message",
    [
        (row(rel_error_vs_1gpu=1e-2), "relative error"),
        (row(rel_error_vs_1gpu=float("nan")), "relative error"),
        (row(all_to_all_calls=6), "6 all-to-alls, expected 8"),
        (row(rel_diff_vs_dense=0.0), "equals dense"),
        (row(p50_ms=0.0), "p50"),
    ],
    ids=["error", "nan-error", "calls", "no-effect", "no-time"],
)
def test_dry_run_checks_fail_on_bad_rows(bad, message):
    good = row(provider="dense-cudnn", rel_diff_vs_dense=0.0)
    assert dry_run_failures([row(), good], layers=2, world=2) == []
    failures = dry_run_failures([bad, good], layers=2, world=2)
    assert len(failures) == 1 and message in failures[0]
    assert dry_run_failures([row()], layers=2, world=2)  # the dense row is missing


def test_single_gpu_p50_takes_the_latest_matching_one_rank_row(tmp_path):
    path = tmp_path / "context_parallel.csv"
    fields = ["ulysses_degree", "shape", "provider", "compiled", "device", "p50_ms"]
    lines = [
        ["1", "wan14b-720p", "compact", "True", "NVIDIA H200", "6000"],
        ["1", "wan14b-720p", "compact", "True", "NVIDIA H200", "5500"],
        ["2", "wan14b-720p", "compact", "True", "NVIDIA H200", "3000"],
        ["1", "wan14b-720p", "compact", "False", "NVIDIA H200", "7000"],
        ["1", "wan14b-720p", "compact", "True", "NVIDIA H100", "8000"],
    ]
    path.write_text("\n".join(",".join(x) for x in [fields, *lines]) + "\n")
    found = single_gpu_p50(
        [tmp_path / "absent.csv", path], "wan14b-720p", "compact", True, "NVIDIA H200"
    )
    assert found == 5500.0
    assert single_gpu_p50([path], "wan14b-720p", "dense-cudnn", True, "NVIDIA H200") is None
