"""PSNR vs density on the built-in model for several recall thresholds (issue 7).

Reads a demo (or optimize) run folder, exports each head's Pareto point at every tau, samples the
same held-out prompts dense and compact, and records PSNR, SSIM and fidelity against density.
Usage: python -m benchmarks.bench_quality_curve RUN_ROOT  (a folder holding profile/ and run/,
e.g. runs/demo). Appends to benchmarks/results/quality_curve.csv and draws quality_curve.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import RESULTS, append_rows, environment
from compact_search.evaluate import evaluate_config
from compact_search.export import export_run
from compact_search.models.tiny.data import sample_scene_specs
from compact_search.models.tiny.pipeline import load_tiny_pipeline

TAUS = (0.8, 0.85, 0.9, 0.95)
PROMPTS, SEED = 4, 1234


def main(root: Path) -> None:
    env = environment()
    specs = sample_scene_specs(PROMPTS, torch.Generator().manual_seed(SEED), split="held_out")
    pipeline = load_tiny_pipeline("cpu")
    rows = []
    for tau in TAUS:
        exported = export_run(
            root / "run", root / f"curve-{tau}.json", profile=root / "profile", recall=tau
        )
        report = evaluate_config(
            pipeline, exported.config, [s.prompt for s in specs], seed=SEED, specs=specs
        )
        row = {
            "model": "tiny",
            "recall": tau,
            "dense_steps": exported.config.schedule.dense_steps,
            "mean_density": round(exported.mean_density, 4),
            "mean_cost": round(exported.mean_cost, 4),
            "psnr_db": round(report.mean_psnr_db, 2),
            "ssim": round(report.mean_ssim, 4),
            "fidelity_dense": report.dense_fidelity["all_three"],
            "fidelity_compact": report.compact_fidelity["all_three"],
            "prompts": PROMPTS,
            **env,
        }
        print(row, flush=True)
        rows.append(row)
    append_rows(RESULTS / "quality_curve.csv", rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["mean_density"] for r in rows], [r["psnr_db"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"tau {r['recall']}", (r["mean_density"], r["psnr_db"]), fontsize=8)
    ax.set_xlabel("mean density")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title("built-in model, 4 held-out prompts, 30% dense steps")
    fig.tight_layout()
    fig.savefig(RESULTS / "quality_curve.png", dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_root", type=Path, help="a demo or optimize run folder, e.g. runs/demo")
    main(parser.parse_args().run_root)
