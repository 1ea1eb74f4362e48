"""Context-parallel (Ulysses) forward of a random-weight Wan transformer: dense vs compact, N ranks.

Every rank builds the same random-weight model (Wan2.1-14B architecture, 720p x 81 frames, bf16)
and the same inputs; `transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=
N))` splits the token sequence over the N ranks (at N = 1 the model runs on one GPU without it).
Two providers, each compiled with `compile_repeated_blocks(fullgraph=True)` (`--eager`: not):

- dense-cudnn: diffusers' stock processors, their own Ulysses, SDPA pinned to cuDNN;
- compact: `compact_search.apply` at mean density 0.3, pattern-family masks (the configs of
  `benchmarks/bench_e2e.py`), a sparse step; Ulysses in `compact_search/models/ulysses.py`.

Per provider: the first call (compilation, autotuning, first launch) in seconds, then forward
p20/p50/p80 over `--reps` calls on rank 0; at N > 1 the all-to-all time per forward from one
more forward under the torch profiler (the NCCL all-to-all kernels' device time, gloo's
`gloo:all_to_all` spans on CPU; mean and max over ranks; a rank's all-to-all time includes its
wait for the slowest peer); the relative error ||out - ref|| / ||ref|| of the gathered output
against a one-process eager forward of the same model, computed on rank 0 before parallelism is
enabled (at N = 1: the compiled forward against the eager one); the scaling efficiency
p50(1 GPU) / (N x p50(N GPUs)), p50(1 GPU) read from the latest N = 1 row of the same shape,
provider, mode and device in the output CSV or benchmarks/results/context_parallel.csv (blank
when there is none).

Usage (NCCL's NVLink multicast stays off; the script sets NCCL_NVLS_ENABLE=0 itself too):
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node N -m benchmarks.bench_context_parallel \\
        [--reps 3] [--eager] [--out DIR]
    python -m torch.distributed.run --nproc-per-node 2 -m benchmarks.bench_context_parallel \\
        --dry-run --out DIR   # CPU, gloo, a small fp32 model, dynamo's eager backend; checks
Appends to DIR/context_parallel.csv (DIR: --out, else $OUT when set, else benchmarks/results)
and writes DIR/context_parallel_N<N>.json (every rank's all-to-all figures). Exit 1 when the
dry run's checks fail.

Expected wall time on one H200 at N = 1, from bench_compile's figures (not measured with this
script yet): about 2.5 minutes: build ~10 s, eager references (dense 12 s, compact 7 s plus the
kernel's autotuning) ~25 s, compact compiled (first call ~35 s, 3 x 5.5 s) ~50 s, dense compiled
(first call 23 s, 3 x 11.3 s) ~57 s, plus imports. N > 1 adds one eager and, per provider, one
profiled forward at N ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.bench_e2e import SHAPES, WAN_COMMON, random_config
from benchmarks.common import RESULTS, append_rows, environment, p20_p50_p80
from compact_search import apply
from compact_search.geometry import Grid, TileShape

DENSITY = 0.3
CSV_NAME = "context_parallel.csv"
# The dry run: 4 heads (Ulysses degree up to 4), 96 tokens (divisible by 2, 4 and 8).
DRY_SPEC = dict(
    model=dict(
        WAN_COMMON,
        num_attention_heads=4,
        ffn_dim=64,
        num_layers=2,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        rope_max_seq_len=64,
    ),
    latent=(4, 8, 12),
    tile=(2, 2, 3),
    text_tokens=7,
)
# A one-process fp32 forward and its N-rank counterpart differ by reduction order only.
DRY_TOLERANCE = 1e-4
# Self-attention: q, k, v in, the output back (cross-attention's text keys are not split).
ALL_TO_ALLS_PER_LAYER = 4


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, reps: int, device: torch.device) -> tuple[float, list[float], object]:
    """Seconds of the first call, the milliseconds of `reps` more (sorted), the last result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        begin = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append((time.perf_counter() - begin) * 1e3)
    return first, sorted(times), result


# NCCL kernels of the other collectives; what is left of NCCL's kernels in a forward is the
# all-to-alls (send/receive kernels, or AllToAll ones in newer NCCL).
OTHER_COLLECTIVES = ("allgather", "allreduce", "reducescatter", "broadcast")


def all_to_all_time(events) -> tuple[float, int]:
    """(milliseconds, calls) of the all-to-alls among profiler events: the device time of NCCL's
    all-to-all kernels on a GPU, the `gloo:all_to_all` spans on CPU; calls from the process
    group's `<backend>:all_to_all` records."""
    calls, gloo_us, nccl_us = 0, 0.0, 0.0
    for event in events:
        name = event.name
        if event.device_type == torch.autograd.DeviceType.CUDA:
            lowered = name.lower()
            if "nccl" in lowered and not any(other in lowered for other in OTHER_COLLECTIVES):
                nccl_us += event.time_range.elapsed_us()
        elif name.endswith(":all_to_all"):
            calls += 1
            if name.startswith("gloo"):
                gloo_us += event.time_range.elapsed_us()
    return (nccl_us or gloo_us) / 1e3, calls


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    out, reference = out.float(), reference.float()
    return float((out - reference).norm() / reference.norm())


def single_gpu_p50(paths: list[Path], shape: str, provider: str, compiled: bool, device: str):
    """p50 of the latest N = 1 row matching shape, provider, mode and device, or None."""
    found = None
    for path in paths:
        if not path.exists():
            continue
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if (
                    row.get("ulysses_degree") == "1"
                    and row.get("shape") == shape
                    and row.get("provider") == provider
                    and row.get("compiled") == str(compiled)
                    and row.get("device") == device
                ):
                    found = float(row["p50_ms"])
    return found


def build_model(spec: dict, device: torch.device, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)  # every rank builds the same weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return WanTransformer3DModel(**spec["model"]).eval()
    finally:
        torch.set_default_dtype(previous)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="wan14b-720p", choices=sorted(SHAPES))
    parser.add_argument("--reps", type=int, default=None, help="timed calls after the first")
    parser.add_argument("--eager", action="store_true", help="do not compile the blocks")
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (inductor; dry run eager)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, gloo, a small fp32 model; checks the outputs"
    )
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (the device README says why)
    out_dir = args.out or Path(os.environ.get("OUT") or RESULTS)
    distributed = "RANK" in os.environ
    if args.dry_run:
        device, dtype, spec, name = torch.device("cpu"), torch.float32, DRY_SPEC, "wan-dry"
        backend = args.compile_backend or "eager"
        if distributed:
            dist.init_process_group("gloo")
            # diffusers places a rank on rank % torch.accelerator.device_count(), 0 on a CPU-only
            # torch: one "device" (the CPU) keeps every rank on the CPU.
            torch.accelerator.device_count = lambda: 1
    else:
        if not torch.cuda.is_available():
            print("bench_context_parallel needs CUDA GPUs (or --dry-run on CPU)", file=sys.stderr)
            return 2
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device, dtype, spec, name = torch.device("cuda", local_rank), torch.bfloat16, None, None
        torch.cuda.set_device(device)
        spec, name = SHAPES[args.shape], args.shape
        backend = args.compile_backend or "inductor"
        if distributed:
            dist.init_process_group("nccl", device_id=device)
        # A cold inductor cache, so first calls include the whole compilation.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    reps = args.reps or (2 if args.dry_run else 3)

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    rows = run(args, spec, name, device, dtype, backend, reps, world, rank, out_dir, log)
    failures = []
    if rank == 0:
        append_rows(out_dir / CSV_NAME, rows)
        print_table(rows)
        if args.dry_run:
            failures = dry_run_failures(rows, spec["model"]["num_layers"], world)
            for failure in failures:
                print(f"dry run check failed: {failure}", file=sys.stderr)
    if distributed:
        dist.destroy_process_group()
    return 1 if failures else 0


def run(args, spec, name, device, dtype, backend, reps, world, rank, out_dir, log) -> list[dict]:
    from diffusers import ContextParallelConfig
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.nn.attention import SDPBackend, sdpa_kernel

    start = time.perf_counter()
    model = build_model(spec, device, dtype)
    log(f"{name}: built in {time.perf_counter() - start:.1f} s on {world} rank(s)")
    f, h, w = spec["latent"]
    grid = Grid(f, h // 2, w // 2)
    layers, heads = spec["model"]["num_layers"], spec["model"]["num_attention_heads"]
    config = random_config(name, layers, heads, grid, TileShape(*spec["tile"]), DENSITY)
    summary = config.summary()
    gen = torch.Generator(device=device).manual_seed(1)  # the same inputs on every rank
    channels, text_dim = spec["model"]["in_channels"], spec["model"]["text_dim"]
    latents = torch.randn(1, channels, f, h, w, generator=gen, device=device, dtype=dtype)
    text = torch.randn(
        1, spec.get("text_tokens", 512), text_dim, generator=gen, device=device, dtype=dtype
    )
    timestep = torch.tensor([500.0], device=device)
    kernel_backend = "triton" if device.type == "cuda" else "auto"

    @torch.no_grad()
    def forward() -> torch.Tensor:
        return model(latents, timestep, text, return_dict=False)[0]

    def install_compact():
        handle = apply(model, config, grid=grid, backend=kernel_backend)
        handle.set_step(config.schedule.num_steps - 1)  # a sparse step
        return handle

    # cuDNN for every SDPA call (dense attention, cross-attention, and compact's dense steps).
    pinned = (
        (lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]))
        if device.type == "cuda"
        else contextlib.nullcontext
    )
    references: dict[str, torch.Tensor] = {}
    sparse_effect = float("nan")
    if rank == 0:  # one process, eager, before parallelism: what the N-rank outputs must match
        with pinned():
            references["dense-cudnn"] = forward()
            handle = install_compact()
            references["compact"] = forward()
            handle.revert()
        sparse_effect = relative_error(references["compact"], references["dense-cudnn"])
        log(f"{name}: one-process eager references in {time.perf_counter() - start:.1f} s")
    if world > 1:
        dist.barrier()
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        # One eager call: diffusers' split hook reads the block's signature with `inspect` on its
        # first call, which fullgraph tracing refuses; it also sets up the communicators, so the
        # first compiled call below times compilation, not NCCL's setup.
        with pinned():
            forward()

    counter = CompileCounterWithBackend(backend)
    if not args.eager:
        model.compile_repeated_blocks(fullgraph=True, backend=counter)
    env = environment()
    import diffusers

    env["diffusers"] = diffusers.__version__
    nccl = torch.cuda.nccl.version() if device.type == "cuda" else None
    env["nccl"] = ".".join(map(str, nccl)) if nccl else ""
    csv_paths = [out_dir / CSV_NAME, RESULTS / CSV_NAME]
    rows, per_rank = [], {}

    def measure(provider: str) -> None:
        frames = counter.frame_count
        first, times, out = time_calls(forward, reps, device)
        graphs = counter.frame_count - frames
        gathered = [(0.0, 0)]  # one rank: no all-to-all, no profiler pass
        if world > 1:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            with profile(activities=activities) as prof:
                out = forward()
                synchronize(device)
            gathered = [None] * world
            dist.all_gather_object(gathered, all_to_all_time(prof.events()))
        a2a_calls = gathered[rank][1]
        per_rank[provider] = gathered
        if rank != 0:
            return
        p20, p50, p80 = p20_p50_p80(times)
        compact = provider == "compact"
        single = p50 if world == 1 else None
        if single is None:
            single = single_gpu_p50(csv_paths, name, provider, not args.eager, env["device"])
        rank_ms = [ms for ms, _ in gathered]
        rows.append(
            {
                "shape": name,
                "tokens": grid.num_tokens,
                "layers": layers,
                "heads": heads,
                "ulysses_degree": world,
                "provider": provider,
                "compiled": not args.eager,
                "compile_backend": "" if args.eager else backend,
                "density": round(summary["mean_density"], 4) if compact else 1.0,
                "cost": round(summary["mean_cost"], 4) if compact else 1.0,
                "reps": len(times),
                "p20_ms": round(p20, 2),
                "p50_ms": round(p50, 2),
                "p80_ms": round(p80, 2),
                "first_call_s": round(first, 2),
                "graphs": graphs,
                "all_to_all_ms": round(sum(rank_ms) / world, 3),
                "all_to_all_ms_max": round(max(rank_ms), 3),
                "all_to_all_calls": a2a_calls,
                "all_to_all_timing": "torch.profiler, one forward",
                "rel_error_vs_1gpu": float(f"{relative_error(out, references[provider]):.3e}"),
                # How far the sparse masks move the output from dense (0 would mean no effect).
                "rel_diff_vs_dense": float(f"{sparse_effect:.3e}") if compact else 0.0,
                "single_gpu_p50_ms": "" if single is None else round(single, 2),
                "scaling_efficiency": "" if single is None else round(single / (world * p50), 3),
                **env,
            }
        )
        log(
            f"{name} N={world} {provider:>11} {'eager' if args.eager else 'compiled':>8}: p50 "
            f"{p50:9.1f} ms, first call {first:6.1f} s, all-to-all {rows[-1]['all_to_all_ms']} ms "
            f"({a2a_calls} calls), rel. error vs one process {rows[-1]['rel_error_vs_1gpu']:.2e}"
        )

    # The compact row first: its first call compiles on a cold cache (and autotunes the kernel's
    # launch for the N-rank shapes), as in a fresh process.
    with pinned():
        handle = install_compact()
        measure("compact")
        handle.revert()  # the stock processors again: their own graph
        measure("dense-cudnn")
    if rank == 0:
        dense = next(r["p50_ms"] for r in rows if r["provider"] == "dense-cudnn")
        for row in rows:
            row["speedup_vs_dense"] = round(dense / row["p50_ms"], 3)
        out_dir.mkdir(parents=True, exist_ok=True)
        details = {"world": world, "all_to_all_per_rank": per_rank, "rows": rows}
        (out_dir / f"context_parallel_N{world}.json").write_text(json.dumps(details, indent=1))
    return rows


def dry_run_failures(rows: list[dict], layers: int, world: int) -> list[str]:
    """What the dry run checks: both providers ran, outputs match one process, compact is not
    dense, the all-to-alls were counted."""
    failures = []
    if sorted(r["provider"] for r in rows) != ["compact", "dense-cudnn"]:
        failures.append(f"expected a compact and a dense row, got {[r['provider'] for r in rows]}")
    expected_calls = ALL_TO_ALLS_PER_LAYER * layers if world > 1 else 0
    for row in rows:
        where = f"{row['provider']} at N={world}"
        if not row["rel_error_vs_1gpu"] <= DRY_TOLERANCE:
            failures.append(f"{where}: relative error {row['rel_error_vs_1gpu']} > {DRY_TOLERANCE}")
        if row["all_to_all_calls"] != expected_calls:
            failures.append(
                f"{where}: {row['all_to_all_calls']} all-to-alls, expected {expected_calls}"
            )
        if row["provider"] == "compact" and not row["rel_diff_vs_dense"] > DRY_TOLERANCE:
            failures.append(f"{where}: the output equals dense (no sparse mask took effect)")
        if not row["p50_ms"] > 0:
            failures.append(f"{where}: p50 {row['p50_ms']} ms")
    return failures


def print_table(rows: list[dict]) -> None:
    print(
        f"\n{'shape':12} {'N':>2} {'provider':>11} {'mode':>8} {'p50 ms':>9} {'x dense':>7} "
        f"{'first s':>7} {'a2a ms':>8} {'rel err':>9} {'scaling':>7}"
    )
    for r in rows:
        mode = "compiled" if r["compiled"] else "eager"
        print(
            f"{r['shape']:12} {r['ulysses_degree']:>2} {r['provider']:>11} {mode:>8} "
            f"{r['p50_ms']:>9} {r['speedup_vs_dense']:>7} {r['first_call_s']:>7} "
            f"{r['all_to_all_ms']:>8} {r['rel_error_vs_1gpu']:>9.2e} {r['scaling_efficiency']!s:>7}"
        )


if __name__ == "__main__":
    code = main()
    if "RANK" in os.environ:
        # Under torchrun a rank has written its rows and destroyed its process group by now. Its
        # interpreter's own shutdown can still abort it ("terminate called without an active
        # exception", SIGABRT: a torch thread destroyed while joinable, after the profiler
        # passes; seen in about one two-rank CPU dry run in 20), so it leaves without that
        # teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
