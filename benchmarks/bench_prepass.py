"""The 8-bit pre-pass on one GPU: the whole call, its parts, its kernels and its launch variants.

    python -m benchmarks.bench_prepass                      # both shapes, ~2 min on an H200
    python -m benchmarks.bench_prepass --shapes wan2.1-1.3b-480p

On random bf16 inputs (B 1, head dim 128, block 128, every key valid), per shape (Wan2.1-14B
720p: H 40, N 75,600; Wan2.1-1.3B 480p: H 12, N 32,760):

- ``quantize_qkv(..., key_order="wgmma")`` whole (what the Gluon 8-bit path pays), with head-major
  ``[B, H, N, D]`` inputs and with token-major ones (``[B, N, H, D]`` storage, as DiTs pass them),
  and the host time to issue one call (no synchronisation: if it exceeds the GPU time, the
  pre-pass is launch-bound);
- its parts apart: the statistics kernel, the launch that sums its partials, the quantization
  kernel and the launch that corrects V's mean;
- the per-kernel CUDA time table of torch.profiler over 10 whole calls, and the registers and
  spills of each compiled pre-pass kernel as the driver loaded it;
- every launch variant of ``quantize._launch_prepass`` (warps, key blocks per statistics
  program, the statistics kernel rotating every key as it did before instead of its sum
  afterwards, V's rows stored at their permuted addresses byte by byte instead of permuted in
  registers, Q, K and V quantized by one launch instead of a launch each, V in two e4m3
  terms, V rounded to e4m3 in integer arithmetic as the interpreter does instead of by the
  conversion instruction, Q's and K's programs taking 1-8 blocks with 1-3 load stages), whole
  and the part it changes, each checked against the default's
  outputs: "bits" (equal, V's corrected mean within 1e-5 of a scale step), "rounding" (the
  statistics summed in another order: Q/K entries off by one step and V bytes changed on < 1e-3
  of entries) or "DIFFERS".

Timings: CUDA events, median (and p20/p80) of >= 20 runs after a warm-up
(``compact_search.bench.time_call``). GB/s counts the ~13 bytes a q/k/v element moves (the
statistics read K and V; the quantization reads Q, K, V and writes three 8-bit tensors). Prints
lines and appends rows to benchmarks/results/prepass.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, append_rows
from compact_search.bench import SHAPES, shape_by_name, time_call
from compact_search.environment import environment
from compact_search.geometry import valid_block_lengths
from compact_search.runtime import quantize
from compact_search.runtime.quantize import (
    QuantizedQKV,
    _assemble,
    _launch_prepass,
    _quantize_blocks,
    _stats_from_partials,
    _stats_partials,
    quantize_qkv,
)

DEFAULT_SHAPES = ("wan2.1-14b-720p", "wan2.1-1.3b-480p")
BLOCK = 128
BYTES_PER_ELEMENT = 13  # K, V read twice (2 + 2 + 2 + 2 bytes), Q once (2), three 1-byte writes
MIN_RUNS = 20
VARIANTS = {
    "default": {},
    "token-order V store": {"permute_in_registers": False},
    "quantize 4 warps": {"quantize_num_warps": 4},
    "Q/K/V in one launch": {"split_quantize": False},
    "Q/K/V in one launch, token-order V store": {
        "split_quantize": False,
        "permute_in_registers": False,
    },
    "two V terms": {"v_terms": 2},
    "V rounded in integer arithmetic": {"hardware_e4m3": False},
    "stats 8 warps": {"stats_num_warps": 8},
    "stats kernel rotates every key": {"stats_rotate_in_kernel": True},
    "stats 2 blocks/program": {"stats_blocks_per_program": 2},
    "stats 16 blocks/program": {"stats_blocks_per_program": 16},
    "stats whole blocks reduced as loaded": {"stats_rows": 0},
    "stats 32 rows a step": {"stats_rows": 32},
    "stats 8 warps, 32 rows a step": {"stats_num_warps": 8, "stats_rows": 32},
    "Q/K 2 blocks/program, 2 load stages": {"qk_blocks_per_program": 2, "qk_load_stages": 2},
    "Q/K 4 blocks/program, 2 load stages": {"qk_blocks_per_program": 4, "qk_load_stages": 2},
    "Q/K 4 blocks/program, 3 load stages": {"qk_blocks_per_program": 4, "qk_load_stages": 3},
    "Q/K 8 blocks/program, 3 load stages": {"qk_blocks_per_program": 8, "qk_load_stages": 3},
    "Q/K 4 blocks/program, no pipelining": {"qk_blocks_per_program": 4, "qk_load_stages": 1},
}
STATS_OPTIONS = {
    "stats_blocks_per_program": "blocks_per_program",
    "stats_num_warps": "num_warps",
    "stats_rotate_in_kernel": "rotate_in_kernel",
    "stats_rows": "rows",
}
QUANTIZE_ARGUMENTS = dict(block_size=BLOCK, rotate=True, key_order="wgmma")
QUANTIZE_OPTIONS = {
    "quantize_num_warps": "num_warps",
    "permute_in_registers": "permute_in_registers",
    "split_quantize": "split_parts",
    "v_terms": "v_terms",
    "hardware_e4m3": "hardware_e4m3",
    "qk_blocks_per_program": "qk_blocks_per_program",
    "qk_load_stages": "qk_load_stages",
}


def _inputs(shape, token_major: bool = False):
    generator = torch.Generator(device="cuda").manual_seed(0)
    size = (1, shape.heads, shape.tokens, shape.head_dim)
    if token_major:
        size = (1, shape.tokens, shape.heads, shape.head_dim)
    tensors = [
        torch.randn(size, device="cuda", dtype=torch.bfloat16, generator=generator)
        for _ in range(3)
    ]
    return tuple(t.transpose(1, 2) if token_major else t for t in tensors)


def _agreement(got: QuantizedQKV, want: QuantizedQKV) -> str:
    """ "bits", "rounding" or "DIFFERS: ..." (see the module docstring). A two-term V^T is held
    to its first term ("... (first V term)"), and its mean, corrected for both terms' rounding,
    is not compared."""
    if got.v_terms != want.v_terms:
        first_term = got.v_t[:, :, : want.v_t.shape[2]]
        got = dataclasses.replace(got, v_t=first_term, v_mean=want.v_mean)
        return _agreement(got, want) + " (first V term)"
    bits = lambda t: t.view(torch.uint8)  # noqa: E731
    exact = ("q", "q_scale", "k", "k_scale", "v_scale", "k_mean")
    mean_gap = ((got.v_mean - want.v_mean).abs() / want.v_scale).max().item()
    if (
        all(torch.equal(getattr(got, n), getattr(want, n)) for n in exact)
        and torch.equal(bits(got.v_t), bits(want.v_t))
        and mean_gap <= 1e-5
    ):
        return "bits"
    off = {n: (getattr(got, n).int() - getattr(want, n).int()).abs() for n in ("q", "k")}
    v_changed = (bits(got.v_t) != bits(want.v_t)).float().mean().item()
    close = all(
        torch.allclose(getattr(got, n), getattr(want, n), rtol=1e-5, atol=1e-6)
        for n in ("q_scale", "k_scale", "v_scale", "k_mean")
    )
    if (
        close
        and all(o.max() <= 1 and o.float().mean() < 1e-3 for o in off.values())
        and v_changed < 1e-3
        and mean_gap <= 1e-3
    ):
        return "rounding"
    worst = {n: o.max().item() for n, o in off.items()}
    return f"DIFFERS: q/k max step {worst}, V bytes changed {v_changed:.2e}, v_mean {mean_gap:.2e}"


def _kernel_resources() -> list[str]:
    """Registers and spills of every compiled pre-pass kernel (after the driver loaded them)."""
    lines = []
    for name in ("_key_value_stats_kernel", "_quantize_kernel"):
        kernel = getattr(quantize, name)
        try:
            for compiled in kernel.device_caches[torch.cuda.current_device()][0].values():
                compiled._init_handles()
                constants = getattr(getattr(compiled, "src", None), "constants", {})
                constants = {kernel.arg_names[i[0]]: c for i, c in constants.items()}
                lines.append(
                    f"{name}: num_warps {compiled.metadata.num_warps}, {compiled.n_regs} "
                    f"registers, {compiled.n_spills} spilled, shared {compiled.metadata.shared}"
                    f" B, constexprs {constants}"
                )
        except (AttributeError, KeyError, IndexError, TypeError) as error:
            lines.append(f"{name}: resources not readable from this Triton ({error!r})")
    return lines


def _profile(run, log) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(10):
            run()
        torch.cuda.synchronize()
    averages = profiler.key_averages()
    try:
        table = averages.table(sort_by="self_device_time_total", row_limit=12)
    except AttributeError:  # torch before 2.4 names it after CUDA
        table = averages.table(sort_by="self_cuda_time_total", row_limit=12)
    for line in table.splitlines():
        log(line)


def _host_ms(run, calls: int = 50) -> float:
    """Median wall time to issue one call (the GPU works behind it)."""
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[calls // 2]


class Recorder:
    """Times a call, prints one line and keeps its CSV row."""

    def __init__(self, shape, env: dict, log) -> None:
        self.shape, self.log, self.rows = shape, log, []
        self.base = {**env, "shape": shape.name, "tokens": shape.tokens, "heads": shape.heads}
        self.base["head_dim"] = shape.head_dim
        self.elements = shape.heads * shape.tokens * shape.head_dim

    def __call__(self, layout: str, variant: str, part: str, run, agreement: str = "") -> float:
        timing = time_call(run, min_runs=MIN_RUNS, budget_ms=300)
        whole = part == "whole"
        gbps = BYTES_PER_ELEMENT * self.elements / (timing.p50_ms * 1e6) if whole else None
        self.rows.append(
            {
                **self.base,
                "layout": layout,
                "variant": variant,
                "part": part,
                "p20_ms": round(timing.p20_ms, 4),
                "p50_ms": round(timing.p50_ms, 4),
                "p80_ms": round(timing.p80_ms, 4),
                "gbps": round(gbps, 1) if gbps else "",
                "agreement": agreement,
            }
        )
        rate = f", {gbps:.0f} GB/s" if gbps else ""
        check = f", {agreement}" if agreement else ""
        self.log(
            f"{self.shape.name} {layout} {variant} {part}: {timing.p50_ms:.3f} ms{rate}{check}"
        )
        return timing.p50_ms


def bench_whole(record: Recorder, qkv, arguments: dict, layout: str):
    """The default call, timed on the GPU and for its host-side issue."""
    q, k, v = qkv

    def whole():
        return quantize_qkv(q, k, v, **arguments)

    record(layout, "default", "whole", whole)
    host = _host_ms(whole)
    record.rows[-1]["host_ms"] = round(host, 4)
    record.log(f"{record.shape.name} {layout} default: host time to issue one call {host:.3f} ms")
    return whole


def bench_parts(record: Recorder, qkv, lengths: torch.Tensor) -> None:
    q, k, v = qkv
    partials = _stats_partials(k, v, lengths, block_size=BLOCK)
    stats = _stats_from_partials(partials, lengths, k.shape, rotate_sum=True)
    outputs = _quantize_blocks(q, k, v, lengths, stats, **QUANTIZE_ARGUMENTS)
    parts = {
        "stats kernel": lambda: _stats_partials(k, v, lengths, block_size=BLOCK),
        "stats sums (one launch)": lambda: _stats_from_partials(
            partials, lengths, k.shape, rotate_sum=True
        ),
        "quantize kernel": lambda: _quantize_blocks(q, k, v, lengths, stats, **QUANTIZE_ARGUMENTS),
        "mean correction (one launch)": lambda: _assemble(
            outputs, stats, lengths, BLOCK, q.shape[2], True, "wgmma"
        ),
    }
    total = sum(record("head-major", "default", part, run) for part, run in parts.items())
    record.log(f"{record.shape.name} head-major default: parts add up to {total:.3f} ms")


def bench_variants(record: Recorder, qkv, lengths: torch.Tensor, arguments: dict) -> None:
    q, k, v = qkv
    partials = _stats_partials(k, v, lengths, block_size=BLOCK)
    stats = _stats_from_partials(partials, lengths, k.shape, rotate_sum=True)
    default = quantize_qkv(q, k, v, **arguments)
    for variant, options in VARIANTS.items():
        if not options:
            continue

        def whole(options=options):
            return _launch_prepass(q, k, v, **arguments, **options)

        record("head-major", variant, "whole", whole, _agreement(whole(), default))
        stats_options = {STATS_OPTIONS[o]: x for o, x in options.items() if o in STATS_OPTIONS}
        if stats_options:

            def stats_kernel(options=stats_options):
                return _stats_partials(k, v, lengths, block_size=BLOCK, **options)

            record("head-major", variant, "stats kernel", stats_kernel)
        quantize_options = {
            QUANTIZE_OPTIONS[o]: x for o, x in options.items() if o in QUANTIZE_OPTIONS
        }
        if quantize_options:

            def quantize_kernel(options=quantize_options):
                return _quantize_blocks(q, k, v, lengths, stats, **QUANTIZE_ARGUMENTS, **options)

            record("head-major", variant, "quantize kernel", quantize_kernel)


def bench_shape(shape, env: dict, log) -> list[dict]:
    record = Recorder(shape, env, log)
    lengths = valid_block_lengths(shape.tokens, BLOCK).cuda()
    arguments = dict(block_size=BLOCK, key_lengths=lengths, rotate=True, key_order="wgmma")
    qkv = _inputs(shape)
    whole = bench_whole(record, qkv, arguments, "head-major")
    bench_parts(record, qkv, lengths)
    bench_variants(record, qkv, lengths, arguments)
    _profile(whole, log)
    del qkv, whole
    torch.cuda.empty_cache()
    bench_whole(record, _inputs(shape, token_major=True), arguments, "token-major")
    torch.cuda.empty_cache()
    return record.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--csv", type=Path, default=RESULTS / "prepass.csv")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_prepass needs a CUDA GPU")
    env = environment()
    env = {"gpu": env.pop("device"), **env}
    print(
        f"bench_prepass on {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
        f"git {env['git_sha']}, {env['date']}",
        flush=True,
    )
    log = lambda line: print(line, flush=True)  # noqa: E731
    for name in args.shapes.split(",") if args.shapes else DEFAULT_SHAPES:
        rows = bench_shape(shape_by_name(name), env, log)
        append_rows(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}", flush=True)
    for line in _kernel_resources():
        log(line)


if __name__ == "__main__":
    main()
