"""8-bit block-sparse attention on one GPU: the FP8 kernel against the bf16 one and dense baselines.

    python -m benchmarks.bench_fp8                         # the default subset, ~5 min on an H200
    python -m benchmarks.bench_fp8 --shapes wan2.1-1.3b-480p --densities 0.2,0.5
    python -m benchmarks.bench_fp8 --probe                 # time Gluon FP8 config variants
    python -m benchmarks.bench_fp8 --probe --variants default,lookahead
    python -m benchmarks.bench_fp8 --probe --inputs rising  # row maxima that keep moving

On the same random bf16 inputs (B 1, head dim 128) and the same per-head block masks as
``compact-search bench`` (compact_search/bench.py), per shape: cuDNN and FlashAttention-2 SDPA
and SageAttention (``sageattn``, when importable) dense; then per density the bf16 Gluon kernel
(what ``sparse_attention`` runs) and the FP8 path, timed whole (pre-pass + kernel, what a caller
pays), and its pre-pass and kernel apart. Every provider's output is compared with an fp32
reference on a sample of query blocks of the first two heads (cosine, relative L2). TFLOP/s
count 4 N^2 d per head times the density. Prints a table, appends rows to
benchmarks/results/fp8.csv and, when the environment variable OUT names a folder, writes the
log and this run's rows there too.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import RESULTS, append_rows
from compact_search.bench import (
    SHAPES,
    dense_sdpa,
    head_block_masks,
    parse_float_list,
    shape_by_name,
    time_call,
)
from compact_search.environment import environment
from compact_search.runtime.attention import sparse_attention
from compact_search.runtime.kernels.gluon_hopper_fp8 import (
    LOOKAHEAD_MIN_PTXAS,
    GluonFP8Config,
    autotuned_config,
    gluon_fp8_attention,
    ptxas_version,
)
from compact_search.runtime.lut import cached_block_lut
from compact_search.runtime.quantize import FP8_V_TERMS, quantize_qkv

DEFAULT_SHAPES = tuple(SHAPES)
DEFAULT_DENSITIES = (0.1, 0.3, 0.6, 1.0)
PROBE_SHAPES = ("wan2.1-1.3b-480p", "wan2.1-14b-720p")
PROBE_DENSITIES = (0.3, 1.0)
BLOCK = 128
SAMPLED_BLOCKS = 8  # query blocks per checked head
CHECKED_HEADS = 2


class Log:
    """print, and the same lines into $OUT/bench_fp8.log when OUT is set."""

    def __init__(self) -> None:
        out = os.environ.get("OUT")
        self.path = Path(out) / "bench_fp8.log" if out else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        if self.path:
            with self.path.open("a") as handle:
                handle.write(line + "\n")


def _sage() -> Callable | None:
    try:
        from sageattention import sageattn
    except ImportError:
        return None
    return lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)


class SampledReference:
    """fp32 attention of a few query blocks of the first heads over their kept keys."""

    def __init__(self, q, k, v, block_mask: torch.Tensor) -> None:
        seq_len, head_dim = q.shape[2], q.shape[3]
        num_blocks = block_mask.shape[-1]
        picks = torch.linspace(0, num_blocks - 1, SAMPLED_BLOCKS).round().long().unique()
        self.rows, expected = [], []
        for head in range(min(CHECKED_HEADS, q.shape[1])):
            head_mask = block_mask[head % block_mask.shape[0]]
            for block in picks.tolist():
                kept = torch.nonzero(head_mask[block]).flatten()
                if kept.numel() == 0:
                    continue
                keys = (kept[:, None] * BLOCK + torch.arange(BLOCK, device=q.device)).flatten()
                keys = keys[keys < seq_len]
                rows = torch.arange(block * BLOCK, min((block + 1) * BLOCK, seq_len))
                scores = q[0, head, rows].float() @ k[0, head, keys].float().T * head_dim**-0.5
                expected.append(torch.softmax(scores, -1) @ v[0, head, keys].float())
                self.rows.append((head, rows))
        self.expected = torch.cat(expected)

    def errors(self, out: torch.Tensor) -> dict[str, float]:
        got = torch.cat([out[0, head, rows].float() for head, rows in self.rows])
        a, b = got.double().flatten(), self.expected.double().flatten()
        return {
            "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
            "rel_l2": ((a - b).norm() / b.norm()).item(),
        }


def _row(base: dict, provider: str, timing, flops: float, errors: dict, **extra) -> dict:
    return {
        **base,
        "provider": provider,
        "p20_ms": round(timing.p20_ms, 4),
        "p50_ms": round(timing.p50_ms, 4),
        "p80_ms": round(timing.p80_ms, 4),
        "tflops": round(flops / timing.p50_ms / 1e9, 1),
        "cosine": round(errors.get("cosine", float("nan")), 6),
        "rel_l2": round(errors.get("rel_l2", float("nan")), 5),
        **extra,
    }


INPUT_KINDS = ("gaussian", "rising")


def _inputs(shape, kind: str = "gaussian"):
    """q, k, v ``[1, H, N, D]`` bf16: Gaussian, or "rising" (q x2 and keys scaled from 0.5 to 3
    along the sequence, so rows' maxima keep moving and the 8-bit kernel's accumulator rescale
    runs in many tiles: the lazy rescale's worst case among these inputs)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    size = (1, shape.heads, shape.tokens, shape.head_dim)
    q, k, v = (
        torch.randn(size, device="cuda", dtype=torch.float32, generator=generator) for _ in range(3)
    )
    if kind == "rising":
        q *= 2.0
        k *= torch.linspace(0.5, 3.0, shape.tokens, device="cuda")[:, None]
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def _flops(shape, density: float) -> float:
    return 4.0 * shape.tokens**2 * shape.head_dim * shape.heads * density


def bench_shape(
    shape, densities, budget_ms: float, env: dict, log: Log, inputs: str = "gaussian"
) -> list[dict]:
    """Dense baselines, then bf16 and FP8 at every density."""
    q, k, v = _inputs(shape, inputs)
    base = {**env, "shape": shape.name, "tokens": shape.tokens, "heads": shape.heads}
    base["head_dim"] = shape.head_dim
    rows = []
    num_blocks = math.ceil(shape.tokens / BLOCK)
    dense_mask = torch.ones(1, num_blocks, num_blocks, dtype=torch.bool, device=q.device)
    dense_reference = SampledReference(q, k, v, dense_mask)
    dense = {
        "cudnn": dense_sdpa("CUDNN_ATTENTION"),
        "fa2": dense_sdpa("FLASH_ATTENTION"),
        "sage": _sage(),
    }
    for provider, run in dense.items():
        if run is None:
            log(f"{shape.name} {provider}: not importable, skipped")
            continue
        errors = dense_reference.errors(run(q, k, v))
        timing = time_call(lambda run=run: run(q, k, v), min_runs=5, budget_ms=budget_ms)
        rows.append(
            _row(
                {**base, "target_density": 1.0, "density": 1.0},
                provider,
                timing,
                _flops(shape, 1.0),
                errors,
            )
        )
        log(
            f"{shape.name} {provider} dense: {timing.p50_ms:.2f} ms, {rows[-1]['tflops']} "
            f"TFLOP/s, rel L2 {errors['rel_l2']:.2e}"
        )
    del dense_reference

    for target in densities:
        block_mask = head_block_masks(shape, target, BLOCK)[0].cuda()
        rows += _bench_density(shape, (q, k, v), block_mask, target, base, budget_ms, log)
        torch.cuda.empty_cache()
    return rows


def _bench_density(shape, qkv, block_mask, target, base, budget_ms, log) -> list[dict]:
    """bf16 and FP8 (whole, pre-pass, kernel) on one mask; rows with speed-ups over bf16."""
    q, k, v = qkv
    density = block_mask.float().mean().item()
    at = {**base, "target_density": target, "density": round(density, 4)}
    reference = SampledReference(q, k, v, block_mask)
    lut = cached_block_lut(block_mask, seq_len=shape.tokens, block_size=BLOCK)
    out = torch.empty_like(q)

    def prepass(v_terms: int = FP8_V_TERMS, v_format: str = "e4m3"):
        return quantize_qkv(
            q,
            k,
            v,
            block_size=BLOCK,
            key_lengths=lut.key_lengths,
            key_order="wgmma",
            v_terms=v_terms,
            v_format=v_format,
        )

    # The default path (whole, pre-pass, kernel), the kernel with V in the other number of e4m3
    # terms, each with its own pre-pass beside it, and precision "int8" (whole, pre-pass, kernel).
    other_terms = 3 - FP8_V_TERMS
    quantized, other, int8_v = prepass(), prepass(other_terms), prepass(1, "int8")
    scale = shape.head_dim**-0.5
    runs = {
        "bf16": lambda: sparse_attention(q, k, v, block_mask, backend="triton"),
        "fp8": lambda: sparse_attention(q, k, v, block_mask, backend="triton", precision="fp8"),
        "fp8-prepass": prepass,
        "fp8-kernel": lambda: gluon_fp8_attention(quantized, lut, out, scale=scale),
        f"fp8-{other_terms}v-prepass": lambda: prepass(other_terms),
        f"fp8-{other_terms}v-kernel": lambda: gluon_fp8_attention(other, lut, out, scale=scale),
        "int8": lambda: sparse_attention(q, k, v, block_mask, backend="triton", precision="int8"),
        "int8pv-prepass": lambda: prepass(1, "int8"),
        "int8pv-kernel": lambda: gluon_fp8_attention(int8_v, lut, out, scale=scale),
    }
    rows, measured = [], {}
    for provider, run in runs.items():
        result = run()
        errors = {} if provider.endswith("prepass") else reference.errors(result)
        timing = time_call(run, min_runs=5, budget_ms=budget_ms)
        measured[provider] = timing.p50_ms
        rows.append(_row(at, provider, timing, _flops(shape, density), errors))
    for row in rows:
        row["speedup_vs_bf16"] = round(measured["bf16"] / row["p50_ms"], 3)
    by_provider = {row["provider"]: row for row in rows}
    bf16_row, fp8_row = by_provider["bf16"], by_provider["fp8"]
    other_row, int8_row = by_provider[f"fp8-{other_terms}v-kernel"], by_provider["int8pv-kernel"]
    log(
        f"{shape.name} density {density:.3f}: bf16 {measured['bf16']:.2f} ms, fp8 "
        f"{measured['fp8']:.2f} ms (pre-pass {measured['fp8-prepass']:.3f} + kernel "
        f"{measured['fp8-kernel']:.2f}), x{measured['bf16'] / measured['fp8']:.2f} whole, "
        f"x{measured['bf16'] / measured['fp8-kernel']:.2f} kernel; fp8 rel L2 "
        f"{fp8_row['rel_l2']:.2e} cos {fp8_row['cosine']:.5f}, bf16 rel L2 "
        f"{bf16_row['rel_l2']:.2e}; fp8 config {autotuned_config()}; V in {other_terms} "
        f"e4m3 term(s): pre-pass {measured[f'fp8-{other_terms}v-prepass']:.3f} + kernel "
        f"{measured[f'fp8-{other_terms}v-kernel']:.2f} ms, rel L2 {other_row['rel_l2']:.2e} cos "
        f"{other_row['cosine']:.5f}; int8 {measured['int8']:.2f} ms (pre-pass "
        f"{measured['int8pv-prepass']:.3f} + kernel {measured['int8pv-kernel']:.2f}), "
        f"x{by_provider['int8']['speedup_vs_bf16']:.2f} whole, "
        f"x{int8_row['speedup_vs_bf16']:.2f} kernel, rel L2 {int8_row['rel_l2']:.2e} cos "
        f"{int8_row['cosine']:.5f}"
    )
    return rows


def probe_variants() -> dict[str, tuple[GluonFP8Config, int | str]]:
    """name -> (kernel config, V's e4m3 terms or "int8": INT8 P V). The lookahead schedule only
    under a ptxas that compiles it soundly (``TRITON_PTXAS_PATH`` >= 12.9): 12.8's build faults,
    which would poison the CUDA context of every later variant."""
    variants = {
        "default": (GluonFP8Config(), 1),
        "eager-rescale": (GluonFP8Config(lazy_rescale=False), 1),
        "threshold1": (GluonFP8Config(rescale_threshold=1.0), 1),
        "threshold3": (GluonFP8Config(rescale_threshold=3.0), 1),
        "pingpong": (GluonFP8Config(pingpong=True), 1),
        "pingpong-eager-rescale": (GluonFP8Config(pingpong=True, lazy_rescale=False), 1),
        "stages3": (GluonFP8Config(stages=3), 1),
        "fadd-row-sum": (GluonFP8Config(mma_row_sum=False), 1),
        "fadd-row-sum-pingpong": (GluonFP8Config(mma_row_sum=False, pingpong=True), 1),
        **{f"rows{r}": (GluonFP8Config(rows_per_cta=r), 1) for r in (2, 3, 4, 8)},
        "rows4-pingpong": (GluonFP8Config(rows_per_cta=4, pingpong=True), 1),
        "two-v-terms": (GluonFP8Config(), 2),
        "two-v-terms-pingpong": (GluonFP8Config(pingpong=True), 2),
        "two-v-terms-stages3": (GluonFP8Config(stages=3), 2),
        "int8-pv": (GluonFP8Config(), "int8"),
        "int8-pv-pingpong": (GluonFP8Config(pingpong=True), "int8"),
        "int8-pv-stages3": (GluonFP8Config(stages=3), "int8"),
    }
    if ptxas_version() >= LOOKAHEAD_MIN_PTXAS:
        variants["lookahead"] = (GluonFP8Config(lookahead=True), 1)
        variants["lookahead-stages3"] = (GluonFP8Config(lookahead=True, stages=3), 1)
        variants["lookahead-chain-rows"] = (GluonFP8Config(lookahead=True, tree_rows=False), 1)
    return variants


def probe_shape(
    shape,
    densities,
    budget_ms: float,
    env: dict,
    log: Log,
    variants: dict,
    inputs: str = "gaussian",
) -> list[dict]:
    """Each Gluon FP8 config of ``variants`` on the quantized inputs, error beside time, and
    the bf16 kernel on the same mask; cuDNN for scale."""
    q, k, v = _inputs(shape, inputs)
    base = {**env, "shape": shape.name, "tokens": shape.tokens, "heads": shape.heads}
    base["head_dim"] = shape.head_dim
    cudnn = dense_sdpa("CUDNN_ATTENTION")
    cudnn_ms = time_call(lambda: cudnn(q, k, v), min_runs=5, budget_ms=budget_ms).p50_ms
    log(f"{shape.name} cudnn dense: {cudnn_ms:.2f} ms")
    rows = []
    for target in densities:
        block_mask = head_block_masks(shape, target, BLOCK)[0].cuda()
        rows += _probe_density(
            shape, (q, k, v), block_mask, target, base, cudnn_ms, budget_ms, log, variants
        )
        torch.cuda.empty_cache()
    return rows


def _probe_density(
    shape, qkv, block_mask, target, base, cudnn_ms, budget_ms, log, variants
) -> list[dict]:
    q, k, v = qkv
    density = block_mask.float().mean().item()
    at = {**base, "target_density": target, "density": round(density, 4)}
    reference = SampledReference(q, k, v, block_mask)
    lut = cached_block_lut(block_mask, seq_len=shape.tokens, block_size=BLOCK)
    quantized = {
        (order, v_spec): quantize_qkv(
            q,
            k,
            v,
            block_size=BLOCK,
            key_lengths=lut.key_lengths,
            key_order=order,
            v_terms=1 if v_spec == "int8" else v_spec,
            v_format="int8" if v_spec == "int8" else "e4m3",
        )
        for order, v_spec in {
            ("wgmma" if config.permuted_keys else "natural", v_spec)
            for config, v_spec in variants.values()
        }
    }
    out = torch.empty_like(q)

    def bf16():
        return sparse_attention(q, k, v, block_mask, backend="triton")

    bf16_errors = reference.errors(bf16())
    bf16_timing = time_call(bf16, min_runs=5, budget_ms=budget_ms)
    rows = [_row(at, "bf16", bf16_timing, _flops(shape, density), bf16_errors, config="bf16")]
    log(
        f"{shape.name} density {density:.3f} bf16 Gluon: {bf16_timing.p50_ms:.3f} ms, "
        f"{rows[0]['tflops']} TFLOP/s, rel L2 {bf16_errors['rel_l2']:.3e}"
    )
    for name, (config, v_spec) in variants.items():
        inputs = quantized["wgmma" if config.permuted_keys else "natural", v_spec]

        def run(config=config, inputs=inputs):
            return gluon_fp8_attention(inputs, lut, out, scale=shape.head_dim**-0.5, config=config)

        try:
            errors = reference.errors(run())
            torch.cuda.synchronize()
        except Exception as exc:  # a variant the compiler rejects is a result, not a crash
            log(f"{shape.name} density {density:.3f} {name}: failed: {exc!r}"[:400])
            continue
        timing = time_call(run, min_runs=5, budget_ms=budget_ms)
        row = _row(at, "fp8-probe", timing, _flops(shape, density), errors, config=name)
        row["share_of_cudnn_ideal"] = round(cudnn_ms * density / timing.p50_ms, 3)
        row["speedup_vs_bf16"] = round(bf16_timing.p50_ms / timing.p50_ms, 3)
        rows.append(row)
        log(
            f"{shape.name} density {density:.3f} {name}: {timing.p50_ms:.3f} ms, "
            f"{row['tflops']} TFLOP/s, x{row['speedup_vs_bf16']} bf16, "
            f"x{row['share_of_cudnn_ideal']} cuDNN-ideal, rel L2 "
            f"{errors['rel_l2']:.3e}, cos {errors['cosine']:.5f}"
        )
    return rows


def print_table(rows: list[dict], log: Log) -> None:
    columns = (
        "shape",
        "density",
        "provider",
        "config",
        "p50_ms",
        "tflops",
        "speedup_vs_bf16",
        "rel_l2",
        "cosine",
    )
    log(" | ".join(columns))
    for row in rows:
        log(" | ".join(str(row.get(c, "")) for c in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--densities", help="comma-separated target densities in (0, 1]")
    parser.add_argument("--probe", action="store_true", help="time Gluon FP8 config variants")
    parser.add_argument(
        "--variants", help="with --probe: comma-separated names of probe_variants() (default: all)"
    )
    parser.add_argument("--budget-ms", type=float, default=600.0, help="timing budget per point")
    parser.add_argument(
        "--inputs", choices=INPUT_KINDS, default="gaussian", help="q/k/v kind (see _inputs)"
    )
    parser.add_argument("--csv", type=Path, default=RESULTS / "fp8.csv")
    args = parser.parse_args()
    variants = probe_variants()
    if args.variants:
        unknown = sorted(set(args.variants.split(",")) - set(variants))
        if unknown:
            parser.error(f"unknown --variants {unknown}; this ptxas offers {sorted(variants)}")
        variants = {name: variants[name] for name in args.variants.split(",")}
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8 needs a CUDA GPU")
    shapes = (
        args.shapes.split(",") if args.shapes else (PROBE_SHAPES if args.probe else DEFAULT_SHAPES)
    )
    densities = (
        parse_float_list(args.densities, "--densities")
        if args.densities
        else (PROBE_DENSITIES if args.probe else DEFAULT_DENSITIES)
    )
    env = environment()
    env = {"gpu": env.pop("device"), **env, "ptxas": "{}.{}".format(*ptxas_version())}
    env["inputs"] = args.inputs
    log = Log()
    log(
        f"bench_fp8 on {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
        f"ptxas {env['ptxas']}, git {env['git_sha']}, {env['date']}, {args.inputs} inputs"
    )
    rows = []
    for name in shapes:
        shape = shape_by_name(name)
        if args.probe:
            rows += probe_shape(shape, densities, args.budget_ms, env, log, variants, args.inputs)
        else:
            rows += bench_shape(shape, densities, args.budget_ms, env, log, args.inputs)
        torch.cuda.empty_cache()
    print_table(rows, log)
    append_rows(args.csv, rows)
    if log.path:
        append_rows(log.path.parent / "fp8.csv", rows)
    log(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
