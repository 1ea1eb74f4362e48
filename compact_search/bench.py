"""The library of ``compact-search bench``: the kernel against dense SDPA and FlexAttention.

On one GPU, on the same random bf16 inputs: cuDNN SDPA (dense), FlashAttention-2 SDPA (dense),
FlexAttention with the identical block mask (built at block level) and this project's kernel,
for model-sized shapes and per-head masks of several pattern kinds at target densities. Every
sparse configuration is checked for correctness before it is timed. ``python -m
benchmarks.bench_kernel`` adds a launch-config sweep and redrawing the plot from a CSV.

``precision="fp8"`` (or ``"int8"``) runs the Triton providers on the 8-bit path (INT8 Q K^T, FP8
or INT8 P V); the dense baselines and FlexAttention stay bf16, and every row names the precision
it ran in its ``precision`` column.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from compact_search.config import check_precision
from compact_search.environment import environment
from compact_search.errors import UserInputError
from compact_search.geometry import DEFAULT_BLOCK_SIZE, Grid
from compact_search.patterns import FrameGroup, HeadPattern, Rect
from compact_search.runtime.attention import (
    EIGHT_BIT_TWINS,
    recorded_kernels,
    selected_kernel,
    sparse_attention,
)
from compact_search.runtime.kernels.flex import flex_block_mask
from compact_search.runtime.kernels.triton_portable import portable_sparse_attention

# "triton": what `sparse_attention` runs (the Gluon kernel on Hopper); "triton-portable": the
# portable `tl` kernel that runs everywhere else, timed side by side on Hopper.
PROVIDERS = ("cudnn", "fa2", "flex", "triton", "triton-portable")
# Not run by default: the portable kernel with plain pointer loads instead of tensor descriptors.
EXTRA_PROVIDERS = ("triton-pointers",)
# What each Triton provider runs, called as run(q, k, v, block_mask, block_size=...) in bf16
# (`triton_runs` gives them at another precision).
TRITON_RUNS: dict[str, Callable[..., torch.Tensor]] = {
    "triton": functools.partial(sparse_attention, backend="triton"),
    "triton-portable": functools.partial(sparse_attention, backend="triton-portable"),
    "triton-pointers": functools.partial(portable_sparse_attention, use_tma=False),
}
DENSE_PROVIDERS = ("cudnn", "fa2")
# Providers that run only bf16 (the dense baselines and FlexAttention run bf16 by design; the
# pointer-load variant has no 8-bit path).
BF16_ONLY_PROVIDERS = ("triton-pointers",)
# Relative error above which a run raises: the kernel against what it must compute (bf16: the
# fp32 reference, FlexAttention, cuDNN; 8 bits: the 8-bit emulation, the other 8-bit kernel).
MAX_REL_ERR = 2e-2


def triton_runs(precision: str) -> dict[str, Callable[..., torch.Tensor]]:
    """TRITON_RUNS at `precision` ("bf16": TRITON_RUNS itself; else without the bf16-only ones)."""
    if precision == "bf16":
        return TRITON_RUNS
    return {
        "triton": functools.partial(sparse_attention, backend="triton", precision=precision),
        "triton-portable": functools.partial(
            sparse_attention, backend="triton-portable", precision=precision
        ),
    }


DEFAULT_DENSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.0)
HEAD_KINDS = ("local", "cross", "temporal", "skip-near")
CSV_FIELDS = (
    "kernel",
    "provider",
    "precision",
    "shape",
    "tokens",
    "heads",
    "head_dim",
    "block_size",
    "target_density",
    "density",
    "head_kinds",
    "p20_ms",
    "p50_ms",
    "p80_ms",
    "speedup_vs_cudnn",
    "speedup_vs_fa2",
    "speedup_vs_flex",
    "share_of_ideal",
    "max_rel_err",
    "gpu",
    "torch",
    "triton",
    "git_sha",
    "date",
)


@dataclass(frozen=True)
class BenchShape:
    """One attention call of a video model: its latent grid (frame-major tokens) and heads."""

    name: str
    grid: tuple[int, int, int]
    heads: int
    head_dim: int = 128

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


SHAPES = {
    s.name: s
    for s in (
        BenchShape("wan2.1-1.3b-480p", (21, 30, 52), 12),
        BenchShape("wan2.1-14b-720p", (21, 45, 80), 40),
        BenchShape("hunyuan-720p", (33, 45, 80), 24),
    )
}


def shape_by_name(name: str) -> BenchShape:
    if name not in SHAPES:
        raise UserInputError(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    return SHAPES[name]


def parse_float_list(text: str, name: str) -> list[float]:
    """ "0.1,0.3" -> [0.1, 0.3]; values must lie in (0, 1]."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise UserInputError(f"{name} must be comma-separated numbers, got {text!r}") from exc
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise UserInputError(f"{name} must lie in (0, 1], got {text!r}")
    return values


def block_grid(shape: BenchShape, block_size: int) -> Grid:
    """A (frames, Ht, Wt) grid with at least nb cells, one cell per kernel block.

    Blocks of consecutive frame-major tokens are laid out frame by frame in the latent's aspect,
    so masks from the pattern family keep their structure (locality in frame and space).
    """
    frames, height, width = shape.grid
    num_blocks = math.ceil(shape.tokens / block_size)
    per_frame = math.ceil(num_blocks / frames)
    tile_height = max(1, round(math.sqrt(per_frame * height / width)))
    return Grid(frames, tile_height, math.ceil(per_frame / tile_height))


def _candidates(kind: str, grid: Grid) -> Iterable[HeadPattern]:
    """Patterns of one kind spanning sparse to nearly dense."""
    frames, height, width = grid.as_tuple()
    full = Rect(height - 1, width - 1)
    if kind == "local":
        for f in range(frames):
            for h in range(height):
                w = min(width - 1, round((h + 1) * width / height) - 1)
                yield HeadPattern.local(f, h, w)
    elif kind == "cross":
        for f in range(frames):
            for arm in range(min(height, width)):
                yield HeadPattern.cross(f, arm, grid)
    elif kind == "temporal":
        for f in range(frames):
            yield HeadPattern.global_(grid, frames=f)
    elif kind == "skip-near":
        # A small window on the nearest frames, nothing in between, a band of far frames in full.
        for near in (1, 2):
            for far in range(near + 1, frames):
                for span in (1, 2, 4, 8, 16, 32):
                    yield HeadPattern(
                        (
                            FrameGroup(0, near, (Rect(1, 1),)),
                            FrameGroup(near, far, ()),
                            FrameGroup(far, far + span, (full,)),
                        )
                    )
    else:
        raise UserInputError(f"unknown head kind {kind!r}; choose from {', '.join(HEAD_KINDS)}")


@functools.lru_cache(maxsize=32)
def _candidate_densities(
    kind: str, grid: Grid, num_blocks: int
) -> tuple[tuple[float, HeadPattern], ...]:
    """(density of the [nb, nb] crop, pattern) for every candidate of a kind."""
    return tuple(
        (p.tile_mask(grid)[:num_blocks, :num_blocks].float().mean().item(), p)
        for p in _candidates(kind, grid)
    )


def head_block_masks(
    shape: BenchShape, density: float, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, list[str]]:
    """Per-head block masks near a target density, head kinds cycling through HEAD_KINDS.

    Returns:
        bool ``[H, nb, nb]`` (nb = ceil(N / block_size)) and the kind of every head.
    """
    num_blocks = math.ceil(shape.tokens / block_size)
    kinds = [HEAD_KINDS[h % len(HEAD_KINDS)] for h in range(shape.heads)]
    if density >= 1.0:
        return torch.ones(shape.heads, num_blocks, num_blocks, dtype=torch.bool), ["dense"] * len(
            kinds
        )
    grid = block_grid(shape, block_size)
    best: dict[str, torch.Tensor] = {}
    for kind in set(kinds):
        candidates = _candidate_densities(kind, grid, num_blocks)
        _, pattern = min(candidates, key=lambda c: abs(c[0] - density))
        best[kind] = pattern.tile_mask(grid)[:num_blocks, :num_blocks]
    return torch.stack([best[kind] for kind in kinds]), kinds


def dense_sdpa(backend_name: str) -> Callable:
    """(q, k, v) -> SDPA output with the SDPA backend pinned (``"CUDNN_ATTENTION"``, ...)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return run


@dataclass(frozen=True)
class Timing:
    p20_ms: float
    p50_ms: float
    p80_ms: float


def time_call(fn: Callable[[], object], *, min_runs: int = 10, budget_ms: float = 1500) -> Timing:
    """Median and p20/p80 over at least ``min_runs`` runs with triton.testing.do_bench."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end), 1e-3)
    rep_ms = max(budget_ms, min_runs * estimate_ms)
    p20, p50, p80 = triton.testing.do_bench(
        fn, warmup=2 * estimate_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8]
    )
    return Timing(p20, p50, p80)


def _environment() -> dict[str, str]:
    env = environment()
    return {"gpu": env.pop("device"), **env}


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """||out - expected|| / ||expected|| in fp32."""
    diff = (out.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
    return diff.item()


def reference_errors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    out: torch.Tensor,
    block_size: int,
    precision: str,
    heads: int,
) -> dict[str, float]:
    """The kernel output ``out`` [B, H, N, D] on its first ``heads`` heads against the fp32
    reference ("reference") and, at 8 bits, the 8-bit path's exact emulation on the same inputs
    (named as its kernel, "reference-fp8" or "reference-int8")."""
    first = slice(0, heads)
    q, k, v, block_mask, out = (
        q[:, first],
        k[:, first],
        v[:, first],
        block_mask[first],
        out[:, first],
    )
    fp32 = sparse_attention(
        q.float(), k.float(), v.float(), block_mask, block_size=block_size, backend="reference"
    )
    errors = {"reference": relative_error(out, fp32)}
    if precision != "bf16":
        emulated = sparse_attention(
            q, k, v, block_mask, block_size=block_size, backend="reference", precision=precision
        )
        errors[EIGHT_BIT_TWINS[precision]["reference"]] = relative_error(out, emulated)
    return errors


def gated_errors(errors: dict[str, float], precision: str) -> dict[str, float]:
    """The errors a run is held to (MAX_REL_ERR): all of them in bf16; at 8 bits those against
    8-bit results (the emulation, the portable 8-bit kernel). The 8-bit path's distance to fp32,
    FlexAttention and cuDNN is the method's, logged but not gated."""
    if precision == "bf16":
        return errors
    eight_bit = (EIGHT_BIT_TWINS[precision]["reference"], "portable")
    return {name: err for name, err in errors.items() if name in eight_bit}


def run_kernel_benchmark(
    shapes: Iterable[BenchShape],
    densities: Iterable[float] = DEFAULT_DENSITIES,
    *,
    providers: Iterable[str] = PROVIDERS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    seed: int = 0,
    reference_heads: int = 2,
    precision: str = "bf16",
    log: Callable[[str], None] = print,
) -> list[dict[str, object]]:
    """Check, then time every provider on every shape and density; one CSV row per timing.

    For each shape the kernel is first checked against the reference backend (fp32) on its first
    ``reference_heads`` heads at the first density, and at every density against FlexAttention
    (when timed) and, at density 1.0, cuDNN. A relative error above ``MAX_REL_ERR`` (2e-2)
    raises. ``precision`` is the Triton providers' arithmetic; at 8 bits the kernel is held to the
    8-bit emulation instead (``gated_errors``), and ``max_rel_err`` is against that.

    Returns:
        Rows with the keys of ``CSV_FIELDS``.
    """
    check_precision(precision, "--precision")
    providers = tuple(providers)
    unknown = set(providers) - set(PROVIDERS + EXTRA_PROVIDERS)
    if unknown:
        raise UserInputError(
            f"unknown providers {sorted(unknown)}; choose from {PROVIDERS + EXTRA_PROVIDERS}"
        )
    bf16_only = sorted(set(providers) & set(BF16_ONLY_PROVIDERS))
    if precision != "bf16" and bf16_only:
        raise UserInputError(f"--precision {precision}: {', '.join(bf16_only)} runs bf16 only")
    if not torch.cuda.is_available():
        raise UserInputError("the kernel benchmark needs a CUDA GPU")
    densities = tuple(densities)
    env = _environment()
    rows: list[dict[str, object]] = []
    flex = None
    if "flex" in providers:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

    for shape in shapes:
        rows += _bench_shape(
            shape,
            densities,
            providers,
            flex,
            block_size,
            seed,
            reference_heads,
            env,
            log,
            precision,
        )
        torch.cuda.empty_cache()
    return add_speedups(rows)


def _bench_shape(
    shape: BenchShape,
    densities: tuple[float, ...],
    providers: tuple[str, ...],
    flex: Callable | None,
    block_size: int,
    seed: int,
    reference_heads: int,
    env: dict[str, str],
    log: Callable[[str], None],
    precision: str = "bf16",
) -> list[dict[str, object]]:
    """Rows of one shape: dense baselines, then check and time every density."""
    runs = triton_runs(precision)
    rows: list[dict[str, object]] = []
    generator = torch.Generator(device="cuda").manual_seed(seed)
    size = (1, shape.heads, shape.tokens, shape.head_dim)
    q, k, v = (
        torch.randn(size, device="cuda", dtype=torch.bfloat16, generator=generator)
        for _ in range(3)
    )
    base = {
        "kernel": "block_sparse_attention",
        "precision": "bf16",
        "shape": shape.name,
        "tokens": shape.tokens,
        "heads": shape.heads,
        "head_dim": shape.head_dim,
        "block_size": block_size,
        **env,
    }
    dense_ms: dict[str, float] = {}
    dense_out = {}
    for provider, backend in (("cudnn", "CUDNN_ATTENTION"), ("fa2", "FLASH_ATTENTION")):
        if provider not in providers:
            continue
        run = dense_sdpa(backend)
        dense_out[provider] = run(q, k, v)
        timing = time_call(lambda run=run: run(q, k, v))
        dense_ms[provider] = timing.p50_ms
        rows.append(
            {
                **base,
                "provider": provider,
                "target_density": 1.0,
                "density": 1.0,
                "head_kinds": "dense",
                **vars(timing),
            }
        )
        log(f"{shape.name} {provider} dense: {timing.p50_ms:.2f} ms")
    if "fa2" in dense_out and "cudnn" in dense_out:
        err = relative_error(dense_out["fa2"], dense_out["cudnn"])
        log(f"{shape.name} fa2 vs cudnn relative error {err:.1e}")
    dense_out.pop("fa2", None)

    for index, target in enumerate(densities):
        block_mask, kinds = head_block_masks(shape, target, block_size)
        block_mask = block_mask.cuda()
        density = block_mask.float().mean().item()
        sparse = {
            **base,
            "target_density": target,
            "density": round(density, 4),
            "head_kinds": "/".join(sorted(set(kinds))),
        }
        with recorded_kernels() as ran:
            out = runs["triton"](q, k, v, block_mask, block_size=block_size)
        log(f"{shape.name} density {density:.3f} triton ran {', '.join(ran)}")
        checks = {}
        if index == 0 and reference_heads:
            checks |= reference_errors(
                q, k, v, block_mask, out, block_size, precision, reference_heads
            )
        flex_mask = None
        if flex is not None:
            flex_mask = flex_block_mask(block_mask, shape.tokens, block_size)
            checks["flex"] = relative_error(out, flex(q, k, v, block_mask=flex_mask))
        if target >= 1.0 and "cudnn" in dense_out:
            checks["cudnn"] = relative_error(out, dense_out["cudnn"])
        if "triton-portable" in providers:
            portable = runs["triton-portable"](q, k, v, block_mask, block_size=block_size)
            checks["portable"] = relative_error(out, portable)
        if out.isnan().any():
            raise RuntimeError(f"{shape.name} density {target}: NaN in the kernel output")
        log(
            f"{shape.name} density {density:.3f}: "
            + ", ".join(f"rel err vs {name} {err:.1e}" for name, err in checks.items())
        )
        gated = gated_errors(checks, precision)
        bad = {name: err for name, err in gated.items() if err > MAX_REL_ERR}
        if bad:
            raise RuntimeError(f"{shape.name} density {target}: kernel disagrees: {bad}")
        max_rel_err = max(gated.values(), default=float("nan"))

        timings = {}
        for provider in (p for p in runs if p in providers):
            run = runs[provider]
            timings[provider] = time_call(
                lambda run=run, m=block_mask: run(q, k, v, m, block_size=block_size)
            )
            if provider == "triton" and precision == "bf16":  # the latest call's launch config
                kernel = selected_kernel(q, k, v, block_size=block_size, backend="triton")
                log(f"{shape.name} density {density:.3f} kernel: {kernel}")
        if flex is not None:
            timings["flex"] = time_call(lambda m=flex_mask: flex(q, k, v, block_mask=m))
        for provider, timing in timings.items():
            triton = provider.startswith("triton")
            rows.append(
                {
                    **sparse,
                    "provider": provider,
                    "precision": precision if triton else "bf16",
                    **vars(timing),
                    "max_rel_err": max_rel_err if triton else "",
                }
            )
            log(f"{shape.name} density {density:.3f} {provider}: {timing.p50_ms:.2f} ms")
    return rows


def add_speedups(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Fill speed-up columns against cuDNN, FA2 (same shape) and FlexAttention (same density).

    ``share_of_ideal`` is cuDNN dense time x density / time: 1.0 means the speed-up 1/density.
    """
    dense = {
        (r["shape"], r["provider"]): r["p50_ms"] for r in rows if r["provider"] in DENSE_PROVIDERS
    }
    flex = {(r["shape"], r["target_density"]): r["p50_ms"] for r in rows if r["provider"] == "flex"}
    for row in rows:
        ms = row["p50_ms"]
        cudnn = dense.get((row["shape"], "cudnn"))
        fa2 = dense.get((row["shape"], "fa2"))
        flex_ms = flex.get((row["shape"], row["target_density"]))
        row["speedup_vs_cudnn"] = round(cudnn / ms, 4) if cudnn else ""
        row["speedup_vs_fa2"] = round(fa2 / ms, 4) if fa2 else ""
        row["speedup_vs_flex"] = (
            round(flex_ms / ms, 4) if flex_ms and row["provider"] not in DENSE_PROVIDERS else ""
        )
        row["share_of_ideal"] = round(cudnn * float(row["density"]) / ms, 4) if cudnn else ""
        row.setdefault("max_rel_err", "")
    return rows


def csv_rows(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Rows as kernel.csv holds them: the columns of CSV_FIELDS in order, floats to 4 places."""

    def cell(value: object) -> object:
        return round(value, 4) if isinstance(value, float) else value

    return [{key: cell(row.get(key, "")) for key in CSV_FIELDS} for row in rows]


def plot_speedups(rows: list[dict[str, object]], path: Path) -> None:
    """PNG of speed-up over cuDNN dense vs density, per shape, with the 1/density ideal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    names = {"triton": "this kernel", "triton-portable": "portable kernel", "flex": "FlexAttention"}
    sparse = [r for r in rows if r["provider"] in names and r["speedup_vs_cudnn"]]
    shapes = sorted({r["shape"] for r in sparse})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, shape in zip(colors, shapes, strict=False):
        for provider, style in (("triton", "-o"), ("triton-portable", "-.s"), ("flex", "--x")):
            points = sorted(
                (float(r["density"]), float(r["speedup_vs_cudnn"]))
                for r in sparse
                if r["shape"] == shape and r["provider"] == provider
            )
            if points:
                xs, ys = zip(*points, strict=True)
                label = f"{shape} {names[provider]}"
                ax.plot(xs, ys, style, color=color, label=label, alpha=0.9)
    grid = [0.08 + i * 0.01 for i in range(93)]
    ax.plot(grid, [1 / d for d in grid], "k:", label="ideal 1/density")
    ax.plot(grid, [0.9 / d for d in grid], color="grey", lw=0.8, label="target 0.9/density")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("density (kept share of block pairs)")
    ax.set_ylabel("speed-up over cuDNN SDPA dense")
    ax.set_yscale("log")
    kernel_precisions = sorted({str(r.get("precision") or "bf16") for r in sparse}) or ["bf16"]
    ax.set_title(f"Block-sparse attention, {'/'.join(kernel_precisions)}, d 128")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    gpu = rows[0]["gpu"] if rows else ""
    fig.text(0.01, 0.01, f"{gpu}, torch {rows[0]['torch']}, triton {rows[0]['triton']}", size=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def rows_table(rows: list[dict[str, object]]):
    """A rich Table of the rows (one line per provider, shape and density)."""
    from rich.table import Table

    table = Table(title="Block-sparse attention (p50 ms; speed-ups from medians)")
    for column in (
        "shape",
        "provider",
        "precision",
        "density",
        "p50 ms",
        "p20-p80",
        "x cuDNN",
        "x FA2",
        "x Flex",
        "share of ideal",
    ):
        left = column in ("shape", "provider", "precision")
        table.add_column(column, justify="left" if left else "right")

    def show(value: object, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, float | int) and value != "" else "-"

    for r in rows:
        table.add_row(
            str(r["shape"]),
            str(r["provider"]),
            str(r.get("precision") or "bf16"),
            show(r["density"], ".3f"),
            show(r["p50_ms"], ".2f"),
            f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}",
            show(r["speedup_vs_cudnn"], ".2f"),
            show(r["speedup_vs_fa2"], ".2f"),
            show(r["speedup_vs_flex"], ".2f"),
            show(r["share_of_ideal"], ".2f"),
        )
    return table
