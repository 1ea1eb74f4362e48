"""`compact-search demo`: the whole pipeline on the built-in model, on this machine.

profile (training-style prompts) -> optimize -> export -> profile held-out prompts -> check the
exported config on them -> evaluate dense vs compact on held-out scenes (PSNR, SSIM, fidelity,
time) -> a summary. Every stage writes under `out_dir` and resumes if run again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compact_search.check import CheckReport, check_config
from compact_search.evaluate import EvaluationReport, evaluate_config
from compact_search.export import ExportResult, export_run


@dataclass(frozen=True)
class DemoOptions:
    profile: str = "tiny"
    heldout_profile: str = "tiny-heldout"
    recall: float = 0.9
    dense_fraction: float = 0.3  # first 30% of the steps run dense
    num_buckets: int = 2
    trials: int = 24
    # 2,048 tokens in 32-token blocks: 64 blocks a row (real models at 128 have 256-590). Measured
    # at tau 0.9 (BENCHMARKS.md): mean density 0.660 at block 128, 0.628 at 64, 0.585 at 32, 0.566
    # at 16, PSNR 37.1, 35.4, 39.9, 39.9 dB; 32 keeps tensor-core tiles of a useful size on a GPU.
    block_size: int = 32
    eval_prompts: int = 4
    eval_seed: int = 1234
    check_tolerance: float = 0.03  # recall slack on held-out prompts
    workers: int = 2
    compile_backend: str | None = None  # evaluate compiled with this torch.compile backend


@dataclass
class DemoSummary:
    out_dir: Path
    export: ExportResult
    check: CheckReport
    evaluation: EvaluationReport
    seconds: dict[str, float] = field(default_factory=dict)


def run_demo(
    out_dir: Path,
    options: DemoOptions = DemoOptions(),
    *,
    say: Callable[[str], None] = print,
) -> DemoSummary:
    import optuna

    from compact_search.evaluate import evaluation_prompts
    from compact_search.models.adapters import load_model
    from compact_search.profiling import load_capture, load_run_profile
    from compact_search.profiling.capture import profile_from_file
    from compact_search.profiling.settings import resolve_run_profile
    from compact_search.search import SearchConfig, optimize_profile

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the stage header says enough
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def stage(name: str, fn):
        say(f"[bold]{name}[/]")
        start = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - start
        return value

    settings = load_run_profile(resolve_run_profile(options.profile))
    dense_steps = round(options.dense_fraction * settings.num_steps)
    stage("1/6 profile", lambda: profile_from_file(options.profile, out_dir / "profile"))
    search = SearchConfig(
        recall=options.recall,
        num_buckets=options.num_buckets,
        dense_steps=dense_steps,
        n_trials=options.trials,
        workers=options.workers,
        block_size=options.block_size,
    )
    stage("2/6 optimize", lambda: optimize_profile(out_dir / "profile", out_dir / "run", search))
    exported = stage(
        "3/6 export",
        lambda: export_run(out_dir / "run", out_dir / "config.json", profile=out_dir / "profile"),
    )
    stage(
        "4/6 profile held-out prompts",
        lambda: profile_from_file(options.heldout_profile, out_dir / "heldout-profile"),
    )
    report = stage(
        "5/6 check",
        lambda: check_config(
            exported.config,
            load_capture(out_dir / "heldout-profile"),
            tolerance=options.check_tolerance,
        ),
    )

    def evaluate():
        model = load_model(settings, torch.device("cpu"))
        return evaluate_config(
            model,
            exported.config,
            evaluation_prompts(model, settings.prompts, options.eval_prompts, options.eval_seed),
            seed=options.eval_seed,
            num_steps=settings.num_steps,
            guidance_scale=settings.guidance,
            out_dir=out_dir / "previews",
            compile_backend=options.compile_backend,
        )

    evaluation = stage("6/6 evaluate", evaluate)
    return DemoSummary(out_dir, exported, report, evaluation, seconds)
