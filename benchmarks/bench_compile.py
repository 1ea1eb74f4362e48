"""Compiled vs eager forward of diffusers Wan transformers (random bf16 weights) on a GPU.

For each shape, one process, one model: the stock diffusers processors (dense, SDPA pinned to
cuDNN) and `compact_search.apply` at mean density 0.3 (pattern-family masks, the configs of
`benchmarks/bench_e2e.py`), each eager and compiled with
`transformer.compile_repeated_blocks(fullgraph=True)`. Per row: forward p50 (and p20/p80) over
`--reps` timed calls after the first, the first call (compilation, autotuning, first launch),
the compiled graphs and graph breaks, and for compact the `apply` time (tables built on the GPU).

SDPA is pinned to cuDNN for the whole run, so cross-attention (and the compact runtime's dense
steps) use the same kernel as the dense baseline. The blocks are compiled once; eager rows run
them under `torch.compiler.set_stance("force_eager")`. The compiled compact row runs first on an
empty inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR unless one is set), so its first call is a
cold compile plus the kernel's autotuning; the eager compact row after it finds the kernel tuned.

Usage: python -m benchmarks.bench_compile [--shapes wan1.3b-480p,wan14b-720p] [--reps N]
       [--precisions bf16,fp8,int8]   (compact rows for each: the 8-bit kernels with fp8, int8)
Appends to benchmarks/results/compile.csv (or DIR/compile.csv with --out DIR); prints a table.
Expected wall time on an H200: about 1.5 min for the 1.3B, about 5 min for the 14B.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_e2e import SHAPES, random_config
from benchmarks.common import RESULTS, append_rows, cuda_event_ms, environment, p20_p50_p80
from compact_search import apply
from compact_search.geometry import Grid, TileShape
from compact_search.runtime.attention import EIGHT_BIT_PRECISIONS, PRECISIONS

DENSITY = 0.3
DEFAULT_REPS = {"wan1.3b-480p": 10, "wan14b-720p": 3}


def build_model(spec: dict):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return WanTransformer3DModel(**spec["model"]).eval()
    finally:
        torch.set_default_dtype(previous)


def time_calls(fn, reps: int) -> tuple[float, list[float]]:
    """Seconds of the first call, then the milliseconds of `reps` more, sorted."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    return first, sorted(cuda_event_ms(fn, reps))


def relative_l2(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out - expected).norm() / expected.norm()).item()


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def run_shape(
    name: str, reps: int, env: dict, log, precisions: tuple[str, ...] = ("bf16",)
) -> list[dict]:
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.nn.attention import SDPBackend, sdpa_kernel

    spec = SHAPES[name]
    start = time.perf_counter()
    model = build_model(spec)
    log(f"{name}: built in {time.perf_counter() - start:.1f} s")
    f, h, w = spec["latent"]
    grid = Grid(f, h // 2, w // 2)
    layers, heads = spec["model"]["num_layers"], spec["model"]["num_attention_heads"]
    config = random_config(name, layers, heads, grid, TileShape(*spec["tile"]), DENSITY)
    summary = config.summary()
    gen = torch.Generator(device="cuda").manual_seed(1)
    latents = torch.randn(1, 16, f, h, w, generator=gen, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 512, 4096, generator=gen, device="cuda", dtype=torch.bfloat16)
    timestep = torch.tensor([500.0], device="cuda")

    @torch.no_grad()
    def forward():
        return model(latents, timestep, text, return_dict=False)[0]

    rows, p50 = [], {}
    handle = None

    def record(provider: str, compiled: bool, first: float, times: list[float], extra: dict):
        p20, median, p80 = p20_p50_p80(times)
        p50[(provider, compiled, extra.get("precision", ""))] = median
        rows.append(
            {
                "shape": name,
                "tokens": grid.num_tokens,
                "layers": layers,
                "heads": heads,
                "provider": provider,
                "compiled": compiled,
                "density": round(summary["mean_density"], 4) if provider == "compact" else 1.0,
                "cost": round(summary["mean_cost"], 4) if provider == "compact" else 1.0,
                "reps": len(times),
                "p20_ms": round(p20, 1),
                "p50_ms": round(median, 1),
                "p80_ms": round(p80, 1),
                "first_call_s": round(first, 2),
                **extra,
                **env,
            }
        )
        log(
            f"{name} {provider:>11} {extra.get('precision', ''):>4} "
            f"{'compiled' if compiled else 'eager':>8}: p50 {median:9.1f} ms, first call "
            f"{first:6.1f} s"
        )

    def install_compact(precision: str) -> dict:
        nonlocal handle
        torch.cuda.synchronize()
        begin = time.perf_counter()
        handle = apply(model, config, grid=grid, backend="triton", precision=precision)
        handle.set_step(config.schedule.num_steps - 1)  # a sparse step
        torch.cuda.synchronize()
        return {"apply_s": round(time.perf_counter() - begin, 2), "precision": precision}

    counter = CompileCounterWithBackend("inductor")
    model.compile_repeated_blocks(fullgraph=True, backend=counter)

    def compiled_run(provider: str, extra: dict) -> None:
        frames, breaks = counter.frame_count, graph_breaks()
        first, times = time_calls(forward, reps)
        graphs = {"graphs": counter.frame_count - frames, "graph_breaks": graph_breaks() - breaks}
        record(provider, True, first, times, {**extra, **graphs})

    # cuDNN only: the dense baseline, and every SDPA call of the compact runs too. Eager rows run
    # the compiled blocks' Python (force_eager); the compact compiled row comes first, so its
    # first call pays compilation and autotuning, as in a fresh process.
    # Each precision's compact rows in turn (a new apply: the blocks recompile, and the first
    # call pays it again).
    outputs = {}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        with torch.compiler.set_stance("force_eager"):
            record("dense-cudnn", False, *time_calls(forward, reps), {})
            outputs["dense"] = forward().float()
        for precision in precisions:
            installed = install_compact(precision)
            compiled_run("compact", installed)
            with torch.compiler.set_stance("force_eager"):
                record("compact", False, *time_calls(forward, reps), {"precision": precision})
                outputs[precision] = forward().float()
            handle.revert()  # the stock processors again: their own graph
        compiled_run("dense-cudnn", {})
    for row in rows:
        dense = p50[("dense-cudnn", row["compiled"], "")]
        row["speedup_vs_dense"] = round(dense / row["p50_ms"], 3)
    # How far each precision's forward output lands from dense (and 8-bit from 16-bit compact).
    for row in rows:
        if row["provider"] == "compact":
            out = outputs[row["precision"]]
            row["rel_l2_vs_dense"] = round(relative_l2(out, outputs["dense"]), 5)
    for eight_bit in EIGHT_BIT_PRECISIONS:
        if eight_bit in outputs and "bf16" in outputs:
            gap = relative_l2(outputs[eight_bit], outputs["bf16"])
            log(f"{name}: {eight_bit} vs bf16 compact output rel L2 {gap:.3e}")
    for precision in precisions:
        compiled_speedup = p50[("dense-cudnn", True, "")] / p50[("compact", True, precision)]
        log(f"{name}: compiled compact {precision} {compiled_speedup:.2f}x compiled dense cuDNN")
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(DEFAULT_REPS), help="comma-separated")
    parser.add_argument("--reps", type=int, default=None, help="timed calls after the first")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--precisions", default="bf16", help="comma-separated compact precisions (bf16,fp8,int8)"
    )
    args = parser.parse_args()
    precisions = tuple(args.precisions.split(","))
    if not set(precisions) <= set(PRECISIONS):
        parser.error(f"--precisions takes {', '.join(PRECISIONS)}, got {args.precisions}")
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    # A cold inductor cache, so first calls include the whole compilation.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
    env = environment()
    import diffusers

    env["diffusers"] = diffusers.__version__

    def log(message: str) -> None:
        print(message, flush=True)

    all_rows = []
    for name in names:
        rows = run_shape(name, args.reps or DEFAULT_REPS[name], env, log, precisions)
        append_rows(args.out / "compile.csv", rows)
        all_rows += rows
    header = (
        f"\n{'shape':14} {'provider':>11} {'prec':>4} {'mode':>8} {'density':>7} {'p50 ms':>9} "
        f"{'x dense':>7} {'first s':>7} {'graphs':>6} {'breaks':>6}"
    )
    print(header)
    for r in all_rows:
        mode = "compiled" if r["compiled"] else "eager"
        print(
            f"{r['shape']:14} {r['provider']:>11} {r.get('precision', ''):>4} {mode:>8} "
            f"{r['density']:>7} "
            f"{r['p50_ms']:>9} {r['speedup_vs_dense']:>7} {r['first_call_s']:>7} "
            f"{r.get('graphs', ''):>6} {r.get('graph_breaks', ''):>6}"
        )


if __name__ == "__main__":
    main()
