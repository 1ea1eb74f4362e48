"""The `compact-search` command line. Thin: parse, call one library function, render.

Exit codes: 0 ok, 1 check failed / regression, 2 bad input or usage.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from typer.exceptions import TyperException

from compact_search.errors import UserInputError
from compact_search.geometry import DEFAULT_BLOCK_SIZE, check_block_size

app = typer.Typer(
    name="compact-search",
    help="Search, export and run per-head structured sparse attention for video DiTs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    junit = "junit"


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


@app.command()
def profile(
    profile: Annotated[
        str, typer.Argument(help="Run profile: a .toml path or a name in profiles/ (default tiny).")
    ] = "tiny",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Capture folder (runs/NAME/profile).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard an unfinished run instead of resuming it.")
    ] = False,
) -> None:
    """Capture tile-level attention mass from sample denoising runs (resumable; torchrun-able)."""
    from rich.table import Table

    from compact_search.profiling.capture import profile_from_file

    result = profile_from_file(profile, out, device=device, restart=restart)
    if not result.complete:
        console.print(
            f"this rank captured {result.captured_units} layer-steps; rank 0 merges into "
            f"[bold]{result.path}[/]"
        )
        return
    meta = result.metadata
    table = Table(title=f"profile {meta['name']}", show_header=False)
    for key in ("model", "adapter", "grid", "prefix_tokens", "num_layers", "num_heads"):
        table.add_row(key, str(meta[key]))
    table.add_row("steps captured", f"{len(meta['steps'])} of {meta['num_steps']}")
    table.add_row("prompts", f"{len(meta['prompts'])} ({meta['store']})")
    table.add_row("tiles", ", ".join("x".join(map(str, t)) for t in meta["tiles"]))
    table.add_row(
        "layer-steps", f"{result.captured_units} captured, {result.skipped_units} resumed"
    )
    if result.repaired:
        table.add_row("recomputed", f"{len(result.repaired)} damaged units")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("fingerprint", meta["fingerprint"])
    console.print(table)
    console.print(f"profile written to [bold]{result.path}[/]")


PRECISION_HELP = (
    "Attention arithmetic of the sparse steps: bf16, fp8 (INT8 Q.K, FP8 P.V) or int8 (INT8 Q.K "
    "and P.V: slower than fp8, more accurate)."
)


def _precision_option(value: str | None) -> str | None:
    """--precision checked here (one line, exit 2) rather than as a typer choice, whose usage
    error spans several lines."""
    from compact_search.config import check_precision

    return None if value is None else check_precision(value, "--precision")


COMPILE_HELP = (
    "Evaluate with the transformer compiled (torch.compile, fullgraph; both runs warmed up "
    "first, self-attention not timed)."
)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for every stage's files.")] = Path("runs/demo"),
    trials: Annotated[int, typer.Option(help="Optuna trials of the search.")] = 24,
    prompts: Annotated[int, typer.Option(help="Held-out prompts to evaluate.")] = 4,
    block_size: Annotated[
        int | None, typer.Option(help="Mask block in tokens (default: the demo's, see docs).")
    ] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
) -> None:
    """profile -> optimize -> export -> check -> evaluate on the built-in model, with a summary."""
    from compact_search.demo import DemoOptions, run_demo

    options = DemoOptions(
        trials=trials,
        eval_prompts=prompts,
        compile_backend="inductor" if compile_model else None,
    )
    if block_size is not None:
        check_block_size(block_size, "--block-size")
        options = dataclasses.replace(options, block_size=block_size)
    summary = run_demo(out, options, say=console.print)
    render_evaluation(summary.evaluation, title="demo: dense vs compact on held-out prompts")
    check = summary.check
    verdict = "[green]PASS[/]" if check.passed else "[red]FAIL[/]"
    console.print(
        f"config [bold]{summary.export.path}[/]: mean density {summary.export.mean_density:.3f}, "
        f"mean cost {summary.export.mean_cost:.3f}, recall threshold {summary.export.recall}"
    )
    console.print(
        f"check on held-out prompts: {verdict} ({len(check.heads) - len(check.failed_heads)}/"
        f"{len(check.heads)} heads within {check.min_recall} - slack)"
    )
    console.print(
        "stage times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in summary.seconds.items())
        + f"; total {sum(summary.seconds.values()):.0f} s"
    )
    console.print(f"previews (dense | compact): [bold]{summary.out_dir / 'previews'}[/]")


def _precision_cell(report) -> str:
    """The precision a config asked for, and the one it ran where they differ."""
    ran = report.ran_precision
    return report.precision if ran == report.precision else f"{report.precision} (ran {ran})"


def render_evaluation(report, title: str, run=None) -> None:
    """One column per config (`report`: one EvaluationReport, or a list), dense first."""
    from rich.table import Table

    reports = report if isinstance(report, list) else [report]
    first = reports[0]
    table = Table(title=title)
    for column in ("", "dense", *(r.label for r in reports)):
        table.add_column(column, justify="right")

    def row(name, dense, value) -> None:
        table.add_row(name, dense, *(value(r) for r in reports))

    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    row("PSNR vs dense (dB)", "-", lambda r: f"{r.mean_psnr_db:.2f}")
    row("SSIM vs dense", "-", lambda r: f"{r.mean_ssim:.4f}")
    if first.mean_lpips is not None:
        row("LPIPS vs dense", "-", lambda r: f"{r.mean_lpips:.4f}")
    if first.dense_fidelity is not None:
        for key in ("colour", "shape", "direction", "all_three"):
            row(
                f"fidelity: {key}",
                f"{first.dense_fidelity[key]:.3f}",
                lambda r, key=key: f"{r.compact_fidelity[key]:.3f}",
            )
    timing_rows = (
        ("end to end per video (s)", "per_video_s", ".2f"),
        ("denoising step (s)", "per_step_s", ".3f"),
        ("text encoding (s)", "text_encode_s", ".2f"),
        ("VAE decode (s)", "decode_s", ".2f"),
        ("self-attention (s)", "attention_s", ".2f"),
        ("self-attention share", "attention_share", ".2f"),
    )
    for name, key, spec in timing_rows:
        if first.dense_timing.get(key) is not None:
            row(
                name,
                fmt(first.dense_timing[key], spec),
                lambda r, k=key, s=spec: fmt(r.compact_timing.get(k), s),
            )
    if first.dense_timing.get("peak_memory_bytes") is not None:
        row(
            "peak GPU memory (GiB)",
            f"{first.dense_timing['peak_memory_bytes'] / 2**30:.1f}",
            lambda r: fmt((r.compact_timing.get("peak_memory_bytes") or 0) / 2**30, ".1f"),
        )
    row("speed-up (end to end)", "1", lambda r: fmt(r.extra.get("speedup"), ".2f"))
    row("mean density", "1", lambda r: f"{r.mean_density:.3f}")
    row("precision", "-", _precision_cell)
    row("sparse kernels", "sdpa", lambda r: ", ".join(r.kernels) or "-")
    console.print(table)
    console.print(
        f"{len(first.prompts)} prompts, {first.num_steps} steps "
        f"({', '.join(f'{r.label}: {r.dense_steps} dense' for r in reports)}), "
        f"device {first.device}"
    )
    cached = first.dense_timing.get("cached_samples")
    if cached:
        console.print(f"dense: {cached} samples read from the cache (their times as measured then)")
    if "compiled" in first.extra:
        warmup = first.extra["warmup_s"]
        console.print(
            f"compiled ({first.extra['compiled']}): the times exclude one warm-up pass per run "
            f"({', '.join(f'{k} {v:.1f} s' for k, v in warmup.items())}, compilation included); "
            "self-attention is not timed"
        )
    for note in dict.fromkeys(n for r in reports for n in r.extra.get("notes", [])):
        console.print(f"[yellow]note:[/] {escape(note)}")
    if run is not None:
        for note in (run.lpips_note, run.preview_note):
            if note:
                console.print(f"[yellow]note:[/] {escape(note)}")
        console.print(f"prompts: {run.prompts_source}")


@app.command()
def evaluate(
    config: Annotated[
        list[Path], typer.Option("--config", "-c", help="Config to evaluate (repeat to compare).")
    ],
    profile: Annotated[
        str,
        typer.Argument(help="Run profile of the model: a .toml path or a name in profiles/."),
    ] = "tiny",
    prompts: Annotated[
        str,
        typer.Option(help="How many held-out prompts, or a file of prompts (one a line)."),
    ] = "8",
    seed: Annotated[int, typer.Option(help="Seed of the one batch of all prompts.")] = 1234,
    seeds: Annotated[
        str | None,
        typer.Option(help="One video per prompt: a seed each (comma list), or one for all (+i)."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Denoising steps (default: the run profile's).")
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Guidance scale (default: the run profile's).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for previews and the JSON report.")] = Path(
        "runs/evaluate"
    ),
    cache: Annotated[
        Path | None, typer.Option(help="Sample cache folder (default OUT/cache).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    backend: Annotated[
        str, typer.Option(help="Kernel, as apply's backend (auto: Triton on CUDA).")
    ] = "auto",
    rescale: Annotated[
        bool,
        typer.Option("--rescale", help="Adapt a config made for another token grid to the model."),
    ] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)] = False,
    precision: Annotated[
        str | None,
        typer.Option(help=PRECISION_HELP + " Default: each config's own (docs/config.md)."),
    ] = None,
    output_format: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
) -> None:
    """Dense vs compact from the same prompts and seeds: PSNR, SSIM, time, previews, JSON."""
    import json

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from compact_search.evaluate import EvaluateOptions, run_evaluation
    from compact_search.profiling import load_run_profile
    from compact_search.profiling.settings import resolve_run_profile

    precision = _precision_option(precision)
    count, prompts_file = (int(prompts), None) if prompts.isdigit() else (8, Path(prompts))
    seed_list = None
    if seeds is not None:
        try:
            seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
        except ValueError:
            raise UserInputError(f"--seeds: comma-separated integers, got {seeds!r}") from None
        if not seed_list:
            raise UserInputError("--seeds: give at least one seed")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    options = EvaluateOptions(
        prompt_count=count,
        prompts_file=prompts_file,
        seed=seed,
        seeds=seed_list,
        num_steps=steps,
        guidance_scale=guidance,
        backend=backend,
        rescale=rescale,
        compile_backend="inductor" if compile_model else None,
        cache_dir=cache,
        precision=precision,
    )
    run_profile = load_run_profile(resolve_run_profile(profile))
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=err_console) as progress:

        def on_phase(name: str, total: int):
            task = progress.add_task(f"sampling {name} (steps)", total=total)
            return lambda: progress.advance(task)

        run = run_evaluation(
            run_profile, list(config), out, torch.device(device), options, on_phase=on_phase
        )
    if output_format is OutputFormat.json:
        # soft_wrap: rich would otherwise break long strings (prompts) at the console width.
        text = json.dumps(run.to_json(), indent=1)
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    else:
        title = "dense vs compact: " + ", ".join(str(c) for c in config)
        render_evaluation(run.reports, title=title, run=run)
        console.print(
            f"report: [bold]{out / 'evaluation.json'}[/]; previews: {out / 'previews'}; "
            f"per-frame PSNR: {run.plots[0]}"
        )


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by `compact-search optimize`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Config file to write.")],
    profile: Annotated[
        Path | None, typer.Option(help="The capture the run searched (default: as recorded).")
    ] = None,
    recall: Annotated[
        float | None, typer.Option(help="Another recall level: each head's cheapest front point.")
    ] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="json, or flex: json + FlexAttention BlockMasks.")
    ] = "json",
    allow_below: Annotated[
        bool, typer.Option("--allow-below", help="Write even if heads miss the threshold.")
    ] = False,
    precision: Annotated[
        str | None,
        typer.Option(help=PRECISION_HELP + " Written into the config, for every expert."),
    ] = None,
) -> None:
    """Write the versioned config for a search run, re-checking recall on the profile."""
    from compact_search.export import export_run

    precision = _precision_option(precision)
    result = export_run(
        run,
        out,
        profile=profile,
        recall=recall,
        output_format=output_format,
        allow_below=allow_below,
        precision=precision,
    )
    written = [result.path] if result.sidecar is None else [result.path, result.sidecar]
    console.print("wrote " + " and ".join(f"[bold]{path}[/]" for path in written))
    # A bf16 config says nothing of its precision, as its file does not (docs/config.md).
    at = "" if result.config.precision == "bf16" else f"; precision {result.config.precision}"
    console.print(
        f"recall threshold {result.recall}: {len(result.below_threshold)} heads below it; "
        f"mean density {result.mean_density:.4f}, mean cost {result.mean_cost:.4f}{at}"
    )
    for line in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


@app.command()
def check(
    config: Annotated[Path, typer.Option("--config", "-c", help="Config to gate.")],
    profile: Annotated[
        Path, typer.Option("--profile", "-p", help="Capture folder of held-out prompts.")
    ],
    baseline: Annotated[
        Path | None, typer.Option(help="Committed baseline config to compare with.")
    ] = None,
    min_recall: Annotated[
        float | None,
        typer.Option(help="Recall floor per head (default: each bucket's search threshold)."),
    ] = None,
    max_density: Annotated[float | None, typer.Option(help="Ceiling on mean density.")] = None,
    statistic: Annotated[
        str, typer.Option(help="Recall over samples: mean, or min (the worst sample).")
    ] = "mean",
    tolerance: Annotated[float, typer.Option(help="Recall slack, absolute.")] = 0.0,
    kernel: Annotated[
        bool, typer.Option("--kernel", help="Also check the kernel against the reference.")
    ] = False,
    precision: Annotated[
        str | None,
        typer.Option(
            help=PRECISION_HELP + " With --kernel; default: the config's own (docs/config.md)."
        ),
    ] = None,
    output_format: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the report here (json, junit).")
    ] = None,
) -> None:
    """Gate a config on a profile: exit 0 pass, 1 regression, 2 bad input."""
    import os

    import torch

    precision = _precision_option(precision)
    if precision is not None and not kernel:
        raise UserInputError("--precision sets the kernel check's arithmetic: add --kernel")

    if kernel and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel's import
    from compact_search.check import check_config, junit_xml
    from compact_search.config import load_config
    from compact_search.profiling import load_profile

    cfg = load_config(config)
    base = load_config(baseline) if baseline is not None else None
    prof = load_profile(profile)
    report = check_config(
        cfg,
        prof,
        baseline=base,
        min_recall=min_recall,
        max_density=max_density,
        statistic=statistic,
        tolerance=tolerance,
        kernel=kernel,
        kernel_precision=precision,
    )
    if output_format is OutputFormat.table:
        render_check(report)
    else:
        import json

        from compact_search.io import atomic_write_text

        text = (
            json.dumps(report.to_json(), indent=1)
            if output_format is OutputFormat.json
            else junit_xml(report)
        )
        if output is not None:
            atomic_write_text(output, text + "\n")
            render_check(report, heads=False)
        else:
            console.print(text, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(0 if report.passed else 1)


def _missed_bound(reason: str) -> str:
    """'recall 0.81 < 0.9000; recall 0.81 < baseline 0.85' -> '0.9, base' (the baseline's
    value has its own column)."""
    bounds = [part.split(" < ", 1)[-1] for part in reason.split("; ")]
    return ", ".join("base" if b.startswith("baseline") else f"{float(b):g}" for b in bounds)


def render_check(report, heads: bool = True) -> None:
    from rich import box
    from rich.table import Table

    failed = report.failed_heads
    if heads and failed:
        # Fits 80 columns: the head as one "b0 l12 h3" cell, the reason as the bound it missed
        # (the JSON and JUnit reports keep the full sentences).
        table = Table(title=f"{len(failed)} failing heads", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("head", "pattern", "density", "mean", "min", "tile", "base", "below"):
            table.add_column(column, justify="left" if column in ("head", "pattern") else "right")
        for h in failed:
            base = "-" if h.baseline_recall is None else f"{h.baseline_recall:.4f}"
            table.add_row(
                (f"{h.expert} " if h.expert != "transformer" else "")
                + f"b{h.bucket} l{h.layer} h{h.head}",
                h.kind,
                f"{h.density:.3f}",
                f"{h.recall_mean:.4f}",
                f"{h.recall_min:.4f}",
                f"{h.recall_worst_tile:.4f}",
                base,
                _missed_bound(h.reason),
            )
        console.print(
            "recall over samples: mean, min; worst query tile; baseline; the bound it is below"
        )
        console.print(table)
    for name, expert in {"": report, **report.experts}.items():
        where = f"{name} " if name else ""
        for note in expert.notes:
            console.print(f"[yellow]note:[/] {where}{note}")
        for k in expert.kernel:
            state = "[green]ok[/]" if k.passed else "[red]FAIL[/]"
            against = f"rel. error {k.relative_error:.2e}"
            if k.reference != "fp32":
                against += f" vs {k.reference} ({k.fp32_relative_error:.2e} vs fp32)"
            console.print(
                f"{where}kernel bucket {k.bucket} layer {k.layer} ({k.kernel}): {against} {state}"
            )
    for name, expert in {"": report, **report.experts}.items():
        for failure in expert.config_failures:
            console.print(f"[red]FAIL[/] {name + ': ' if name else ''}{failure}")
        if name:
            console.print(f"{name}: mean density {expert.mean_density:.4f}")
    base = (
        ""
        if report.baseline_mean_density is None
        else (f" (baseline {report.baseline_mean_density:.4f})")
    )
    threshold = "-" if report.min_recall is None else f"{report.min_recall:.3f}"
    verdict = "[bold green]PASS[/]" if report.passed else "[bold red]FAIL[/]"
    checked = len(report.all_heads)
    console.print(
        f"{verdict}: {checked - len(failed)}/{checked} heads pass recall "
        f"({report.statistic} over samples >= {threshold}), mean density "
        f"{report.mean_density:.4f}{base}"
    )


@app.command()
def bench(
    shapes: Annotated[
        str, typer.Option(help="Comma-separated shapes: wan2.1-1.3b-480p, wan2.1-14b-720p, ...")
    ] = "wan2.1-1.3b-480p,wan2.1-14b-720p,hunyuan-720p",
    densities: Annotated[
        str, typer.Option(help="Comma-separated block densities.")
    ] = "0.1,0.2,0.3,0.4,0.5,0.6,1.0",
    providers: Annotated[
        str,
        typer.Option(
            help="Comma-separated: cudnn, fa2, flex, triton (what sparse_attention runs: the "
            "Gluon kernel on Hopper), triton-portable, triton-pointers."
        ),
    ] = "cudnn,fa2,flex,triton,triton-portable",
    out_dir: Annotated[
        Path, typer.Option(help="Folder for kernel.csv (appended) and kernel_speedup.png.")
    ] = Path("benchmarks/results"),
    precision: Annotated[
        str, typer.Option(help=PRECISION_HELP + " Of the triton providers; the others run bf16.")
    ] = "bf16",
) -> None:
    """Time the Triton kernel against cuDNN, FA2 and FlexAttention on a GPU (needs CUDA)."""
    from compact_search.bench import (
        csv_rows,
        parse_float_list,
        plot_speedups,
        rows_table,
        run_kernel_benchmark,
        shape_by_name,
    )
    from compact_search.environment import append_rows

    precision = _precision_option(precision)
    rows = run_kernel_benchmark(
        [shape_by_name(name.strip()) for name in shapes.split(",")],
        parse_float_list(densities, "densities"),
        providers=[p.strip() for p in providers.split(",")],
        precision=precision,
        log=lambda line: console.print(line, highlight=False),
    )
    append_rows(out_dir / "kernel.csv", csv_rows(rows))
    plot_speedups(rows, out_dir / "kernel_speedup.png")
    console.print(rows_table(rows))
    console.print(f"rows appended to [bold]{out_dir / 'kernel.csv'}[/]")


@app.command()
def optimize(
    profile_dir: Annotated[
        Path, typer.Argument(help="Capture folder written by `compact-search profile`.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Run folder: study, search.json, report (not with --join)."
        ),
    ] = None,
    recall: Annotated[float, typer.Option(help="Recall threshold tau every head must keep.")] = 0.9,
    dense_steps: Annotated[
        int | None, typer.Option(help="Dense warm-up steps K (default: searched).")
    ] = None,
    buckets: Annotated[int, typer.Option(help="Step buckets after the warm-up.")] = 2,
    trials: Annotated[
        int, typer.Option(help="Optuna trials (a resumed study counts its own).")
    ] = 40,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna storage: an RDB URL or journal:PATH (default sqlite in --out)."),
    ] = None,
    mean_over_samples: Annotated[
        bool,
        typer.Option("--mean-over-samples", help="Constrain the mean over samples, not each one."),
    ] = False,
    target_density: Annotated[
        float | None, typer.Option(help="Budget mode: allocate recall to hit this mean density.")
    ] = None,
    target_cost: Annotated[
        float | None, typer.Option(help="Budget mode: allocate recall to hit this mean cost.")
    ] = None,
    max_groups: Annotated[int, typer.Option(help="Most frame groups per pattern.")] = 8,
    workers: Annotated[int, typer.Option(help="Worker processes (layers are sharded).")] = 2,
    block_size: Annotated[
        int, typer.Option(help="Kernel block size the cost counts blocks of.")
    ] = DEFAULT_BLOCK_SIZE,
    warmup_recall: Annotated[
        float | None,
        typer.Option(
            help="Recall the warm-up steps (--dense-steps) are searched at, as a bucket of their "
            "own; heads no pattern serves stay dense. Default: 0.97 for a given --dense-steps, a "
            "dense warm-up when its length is searched (docs/search.md)."
        ),
    ] = None,
    dense_warmup: Annotated[
        bool,
        typer.Option("--dense-warmup", help="Run the warm-up steps dense instead."),
    ] = False,
    max_options: Annotated[
        int | None,
        typer.Option(
            help="Window options per frame group (near, wrapped, band tiers; default: what the "
            "trial budget affords for the profile's size)."
        ),
    ] = None,
    join: Annotated[
        bool,
        typer.Option(
            "--join",
            help="Add trials to the study another optimize started on this --storage (a "
            "database server) with the same profile and options; writes no run folder.",
        ),
    ] = False,
    heartbeat: Annotated[
        int,
        typer.Option(
            help="Seconds between a worker's heartbeats on a database server storage; a trial "
            "silent for 3 of them is retried by another worker."
        ),
    ] = 10,
) -> None:
    """Search per-head sparse patterns meeting the recall threshold; write the run folder.

    Several processes on one study: `--storage postgresql://user:password@host/db` here, and
    the same command with `--join` (no --out) on other hosts.
    """
    import optuna
    from rich.progress import Progress

    from compact_search.search import BudgetTarget, SearchConfig, join_study, optimize_profile
    from compact_search.search.report import summary_table
    from compact_search.search.run import waste_warnings
    from compact_search.search.study import AUTO

    if join and storage is None:
        raise UserInputError("--join needs --storage: the database the study lives in")
    if join and (out is not None or target_density is not None or target_cost is not None):
        raise UserInputError(
            "--join only adds trials: --out and budget targets belong to the starting worker"
        )
    if dense_warmup and warmup_recall is not None:
        raise UserInputError("give --warmup-recall or --dense-warmup, not both")
    if not join and out is None:
        raise UserInputError("--out is required (the run folder), unless --join")
    if target_density is not None and target_cost is not None:
        raise UserInputError("give --target-density or --target-cost, not both")
    target = None
    if target_density is not None:
        target = BudgetTarget(target_density, "density")
    elif target_cost is not None:
        target = BudgetTarget(target_cost, "cost")
    config = SearchConfig(
        recall=recall,
        mean_over_samples=mean_over_samples,
        num_buckets=buckets,
        dense_steps=dense_steps,
        max_groups=max_groups,
        n_trials=trials,
        seed=seed,
        workers=workers,
        block_size=block_size,
        warmup_recall=None if dense_warmup else (warmup_recall or AUTO),
        max_options=max_options,
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # On a terminal a live bar; elsewhere (a log, CI) a plain line per stage and every tenth
    # of the trials.
    plain = not console.is_terminal
    with Progress(console=console, transient=True, disable=plain) as progress:
        task = progress.add_task("trials", total=trials)
        reported = {"done": -1}

        def on_trial(study, trial) -> None:
            done = min(sum(t.state.is_finished() for t in study.trials), trials)
            progress.update(task, completed=done)
            step = max(1, trials // 10)
            if plain and done != reported["done"] and (done % step == 0 or done == trials):
                reported["done"] = done
                console.print(f"optimize: {done} of {trials} trials finished", highlight=False)

        def on_stage(line: str) -> None:
            console.print(f"optimize: {line}", highlight=False)

        if join:
            joined = join_study(
                profile_dir, config, storage, on_trial=on_trial, heartbeat=heartbeat
            )
        else:
            result = optimize_profile(
                profile_dir,
                out,
                config,
                storage=storage,
                target=target,
                on_trial=on_trial,
                heartbeat=heartbeat,
                on_stage=on_stage if plain else _resume_notice,
            )
    if join:
        console.print(
            f"joined study [bold]{joined.study_name}[/]: ran {joined.trials_run} trials; it has "
            f"{joined.trials_completed} of {joined.target} finished (the starting worker writes "
            "the result)"
        )
        return
    console.print(summary_table(result))
    for line in waste_warnings(result):
        err_console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    console.print(
        f"search written to [bold]{out / 'search.json'}[/]; report: heads.csv, heads.md, "
        "pareto.png, kinds.png"
    )
    for expert, folder in result.study.get("experts", {}).items():
        console.print(f"{expert}: searched on its own steps, written to [bold]{out / folder}[/]")


def _resume_notice(line: str) -> None:
    """On a terminal the bar shows the stages; only a resumed study is said in words."""
    if line.startswith("resuming"):
        console.print(f"optimize: {line}", highlight=False)


@app.command("train-tiny")
def train_tiny(
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Where tiny-wan.safetensors/.json go (default: package)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, data and noise.")] = 0,
    steps: Annotated[
        int, typer.Option(help="Total optimizer steps (a resumed run counts on).")
    ] = 8000,
    batch_size: Annotated[
        int, typer.Option(help="Videos per step (per rank under torchrun).")
    ] = 64,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate.")] = 5e-4,
    heads: Annotated[
        int, typer.Option(help="Attention heads per layer (new runs; a resume keeps its own).")
    ] = 4,
    head_dim: Annotated[int, typer.Option(help="Head dimension (new runs).")] = 64,
    compile_model: Annotated[
        bool, typer.Option("--compile", help="torch.compile the transformer (CUDA).")
    ] = False,
    warmup_steps: Annotated[int, typer.Option(help="Learning-rate warm-up steps.")] = 200,
    time_shift: Annotated[
        float, typer.Option(help="Shift of training times towards high noise (1 = none).")
    ] = 3.0,
    max_seconds: Annotated[
        float | None, typer.Option(help="Stop (and save) after this many seconds of training.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Write an fp32 EMA checkpoint here to resume from.")
    ] = None,
    resume_from: Annotated[
        Path | None, typer.Option(help="Continue from a --checkpoint-dir of an earlier run.")
    ] = None,
) -> None:
    """Train the built-in tiny video DiT with flow matching (docs/tiny-model.md)."""
    import torch
    from rich.table import Table

    from compact_search.models.tiny.pipeline import WEIGHTS_DIR, TinyModelConfig
    from compact_search.models.tiny.train import TrainConfig, train_and_save

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        config = TrainConfig(
            seed=seed,
            steps=steps,
            batch_size=batch_size,
            warmup_steps=warmup_steps,
            time_shift=time_shift,
            max_seconds=max_seconds,
            learning_rate=learning_rate,
            compile=compile_model,
        )
        asked = TinyModelConfig(num_heads=heads, head_dim=head_dim)  # validates the flags
        model_config = None if resume_from is not None else asked  # a resume keeps its own
    except ValueError as exc:
        raise UserInputError(str(exc)) from exc
    result = train_and_save(
        config,
        out or WEIGHTS_DIR,
        model_config=model_config,
        device=device,
        resume_from=resume_from,
        checkpoint_dir=checkpoint_dir,
        command=" ".join(["compact-search", *sys.argv[1:]]),
        log=console.print,
    )
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    table = Table(title="tiny model trained", show_header=False)
    for key in ("seed", "steps", "final_loss", "seconds", "device"):
        table.add_row(key, str(result.record[key]))
    table.add_row("weights", str(out or WEIGHTS_DIR))
    console.print(table)


@app.command()
def generate(
    prompt: Annotated[
        str,
        typer.Argument(help='e.g. "a red circle moves left slowly over a plain grey background"'),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Animated GIF to write.")] = Path(
        "tiny.gif"
    ),
    steps: Annotated[int, typer.Option(help="Euler steps.")] = 20,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 4.0,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Sample a video from the built-in tiny model and save it as a GIF."""
    import time

    from compact_search.models.tiny import load_tiny_pipeline, save_gif
    from compact_search.models.tiny.detector import detect

    if steps < 1:
        raise UserInputError(f"--steps must be >= 1, got {steps}")
    pipeline = load_tiny_pipeline(device)
    started = time.perf_counter()
    sample = pipeline(prompt, num_steps=steps, guidance_scale=guidance, seed=seed)
    seconds = time.perf_counter() - started
    save_gif(sample.videos[0], out)
    seen = detect(sample.videos[0])
    console.print(
        f"wrote [bold]{out}[/] ({seconds:.1f} s); detector reads: colour={seen.colour}, "
        f"shape={seen.shape}, direction={seen.direction}"
    )


@app.command("tiny-report")
def tiny_report(
    recall: Annotated[float, typer.Option(help="Recall each head must keep.")] = 0.9,
    tile: Annotated[str, typer.Option(help="Tile shape FxHxW in tokens.")] = "1x4x4",
    prompts: Annotated[int, typer.Option(help="Held-out prompts to sample.")] = 4,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
) -> None:
    """Per-head smallest density at a recall, built-in tiny model vs random weights."""
    from compact_search.models.tiny import load_tiny_pipeline
    from compact_search.models.tiny.report import (
        head_structure_report,
        random_weights_pipeline,
        render_head_report,
    )
    from compact_search.profiling import attention_tile_mass

    try:
        tile_shape = tuple(int(size) for size in tile.lower().split("x"))
    except ValueError as exc:
        raise UserInputError(f"--tile must look like 1x4x4, got {tile!r}") from exc
    if len(tile_shape) != 3 or not 0.0 < recall <= 1.0 or prompts < 1:
        raise UserInputError("need --tile FxHxW, 0 < --recall <= 1 and --prompts >= 1")
    trained = load_tiny_pipeline(device)
    reports = [
        head_structure_report(
            pipeline,
            label=label,
            tile_mass_fn=attention_tile_mass,
            recall=recall,
            tile=tile_shape,
            num_prompts=prompts,
        )
        for label, pipeline in (("trained", trained), ("random", random_weights_pipeline(trained)))
    ]
    console.print(render_head_report(reports))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry.

    Exit codes: 0 ok, 1 check failed or regression, 2 bad input or usage (one line on stderr),
    130 interrupted, 3 internal error (one line; `--debug` shows the traceback).
    """
    _state["debug"] = False
    # SIGTERM (a scheduler, `kill`) ends a command like Ctrl-C does: one line, exit 130.
    previous_sigterm = _catch_sigterm()
    try:
        code = app(args=argv, standalone_mode=False)
    except (UserInputError, OSError) as exc:
        if _state["debug"]:
            raise
        from compact_search.io import describe_os_error

        message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        # escape: messages may hold brackets (paths, "pip install 'pkg[extra]'") that rich would
        # otherwise read as markup and drop.
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print(INTERRUPTED, highlight=False, soft_wrap=True)
        sys.exit(130)
    except TyperException as exc:  # usage errors: missing or malformed options
        if not hasattr(exc, "show"):
            raise
        exc.show()
        sys.exit(2)
    except Exception as exc:
        if _state["debug"]:
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} "
            "(--debug shows the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(3)
    finally:
        _restore_sigterm(previous_sigterm)
    if code == 130:  # typer turns a KeyboardInterrupt inside a command into exit code 130
        err_console.print(INTERRUPTED, highlight=False, soft_wrap=True)
    sys.exit(code if isinstance(code, int) else 0)


INTERRUPTED = "interrupted; rerun the same command to resume"


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _catch_sigterm():
    """Turn SIGTERM into KeyboardInterrupt while a command runs; -> the handler it replaced
    (None off the main thread, where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
