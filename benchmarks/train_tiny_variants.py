"""Train several recipes of the built-in tiny model side by side, one GPU each, and score them.

Each variant trains from scratch (or resumes) for the same wall-clock budget on its own GPU, then
is scored on what issue #4 asks of the shipped model: the detector's fidelity on held-out prompts
(colour, shape, direction) and the head-structure report (mean over heads of the smallest density
that keeps recall 0.9, tile 1x4x4). Rows go to benchmarks/results/tiny_training.csv; the best
variant's fp16 model and fp32 checkpoint are copied to ``--keep``.

    python -m benchmarks.train_tiny_variants --seconds 400 --out runs/variants --keep $OUT \\
        --variant base:heads=8,head_dim=32 --variant wide:heads=4,head_dim=64

``--evaluate DIR`` scores a model folder (tiny-wan.safetensors/.json) without training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, append_rows, environment

# Children run `python -m benchmarks.train_tiny_variants` from here, whatever the parent's cwd.
ROOT = Path(__file__).resolve().parents[1]

VARIANT_KEYS = {
    "heads": int,
    "head_dim": int,
    "lr": float,
    "batch": int,
    "shift": float,
    "compile": int,
    "resume": str,
}


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, settings)."""
    name, _, rest = text.partition(":")
    settings: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS:
            raise SystemExit(f"unknown variant key {key!r}; known: {sorted(VARIANT_KEYS)}")
        settings[key] = VARIANT_KEYS[key](value)
    return name, settings


def evaluate_model(model_dir: Path, device: str, fidelity_prompts: int) -> dict:
    """Fidelity (held-out and training prompts) and head structure of a saved model."""
    from compact_search.models.tiny import load_tiny_pipeline
    from compact_search.models.tiny.detector import evaluate_fidelity
    from compact_search.models.tiny.report import head_structure_report

    pipeline = load_tiny_pipeline(device, weights_dir=model_dir)
    started = time.perf_counter()
    held_out = evaluate_fidelity(pipeline, split="held_out", count=fidelity_prompts, seed=1234)
    train = evaluate_fidelity(pipeline, split="train", count=fidelity_prompts // 2, seed=99)
    fine = head_structure_report(pipeline, label="trained", num_prompts=4)
    coarse = head_structure_report(pipeline, label="trained", num_prompts=4, tile=(1, 8, 8))
    return {
        **{f"heldout_{k}": round(v, 4) for k, v in held_out.as_dict().items() if k != "count"},
        "heldout_count": held_out.count,
        "train_direction": round(train.direction, 4),
        "train_all_three": round(train.all_three, 4),
        "head_mean_density_1x4x4": round(fine.mean, 4),
        "head_spread_1x4x4": round(fine.spread, 4),
        "head_mean_density_1x8x8": round(coarse.mean, 4),
        "head_densities_1x4x4": [[round(x, 3) for x in row] for row in fine.densities.tolist()],
        "eval_seconds": round(time.perf_counter() - started, 1),
    }


def run_child(args: argparse.Namespace) -> None:
    """Train one variant on the GPU the parent gave it, save, evaluate, write result.json."""
    from compact_search.models.tiny.pipeline import TinyModelConfig
    from compact_search.models.tiny.train import TrainConfig, train_and_save

    name, settings = parse_variant(args.child)
    out = Path(args.out) / name
    resume = Path(settings["resume"]) if "resume" in settings else None
    config = TrainConfig(
        seed=args.seed,
        steps=10**7,
        batch_size=settings.get("batch", 64),
        learning_rate=settings.get("lr", 5e-4),
        time_shift=settings.get("shift", 3.0),
        warmup_steps=100 if resume else 200,
        max_seconds=args.seconds,
        compile=bool(settings.get("compile", 0)),
        log_every=250,
    )
    model_config = None
    if resume is None:
        model_config = TinyModelConfig(
            num_heads=settings.get("heads", 8), head_dim=settings.get("head_dim", 32)
        )
    result = train_and_save(
        config,
        out / "model",
        model_config=model_config,
        device=args.device,
        resume_from=resume,
        checkpoint_dir=out / "checkpoint",
        command=f"python -m benchmarks.train_tiny_variants --variant {args.child}",
        log=lambda message: print(f"[{name}] {message}", flush=True),
    )
    scores = evaluate_model(out / "model", args.device, args.fidelity_prompts)
    row = {
        "variant": name,
        "settings": json.dumps(settings, sort_keys=True),
        "steps": result.steps_done,
        "train_seconds": round(result.seconds, 1),
        "steps_per_second": round(result.record["chunks"][-1]["steps"] / result.seconds, 2),
        "final_loss": result.record["final_loss"],
        **scores,
    }
    (out / "result.json").write_text(json.dumps(row, indent=2) + "\n")
    print(
        f"[{name}] done: {json.dumps({k: v for k, v in row.items() if 'densities' not in k})}",
        flush=True,
    )


def run_parent(args: argparse.Namespace) -> None:
    variants = [parse_variant(text) for text in args.variant]
    gpus = args.gpus or list(range(len(variants)))
    if len(gpus) < len(variants):
        raise SystemExit(f"{len(variants)} variants need {len(variants)} GPUs, got {gpus}")
    children = []
    for (name, _), text, gpu in zip(variants, args.variant, gpus, strict=False):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "PYTHONUNBUFFERED": "1"}
        command = [
            sys.executable,
            "-m",
            "benchmarks.train_tiny_variants",
            "--child",
            text,
            "--out",
            args.out,
            "--seconds",
            str(args.seconds),
            "--seed",
            str(args.seed),
            "--fidelity-prompts",
            str(args.fidelity_prompts),
            "--device",
            args.device,
        ]
        children.append((name, subprocess.Popen(command, env=env, cwd=ROOT)))
    failed = [name for name, child in children if child.wait() != 0]
    rows = []
    for name, _ in variants:
        path = Path(args.out) / name / "result.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    facts = environment()
    for row in rows:
        row.update({key: facts[key] for key in ("device", "torch", "git_sha", "date")})
    csv_rows = [{k: v for k, v in row.items() if "densities" not in k} for row in rows]
    append_rows(RESULTS / "tiny_training.csv", csv_rows)
    for row in rows:
        print(json.dumps(row))
    if args.keep and rows:
        best = max(rows, key=lambda r: (r["heldout_all_three"], -r["head_mean_density_1x4x4"]))
        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        source = Path(args.out) / best["variant"]
        for path in [*(source / "model").iterdir(), *(source / "checkpoint").iterdir()]:
            shutil.copy(path, keep / path.name)
        shutil.copy(RESULTS / "tiny_training.csv", keep / "tiny_training.csv")
        (keep / "variants.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(f"kept variant {best['variant']} in {keep}")
    if failed:
        raise SystemExit(f"variants failed: {failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="name:key=value,...")
    parser.add_argument("--gpus", type=int, nargs="*", default=None)
    parser.add_argument("--seconds", type=float, default=400.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fidelity-prompts", type=int, default=128)
    parser.add_argument("--out", default="runs/tiny-variants")
    parser.add_argument("--keep", default=None, help="copy the best variant's files here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", default=None, help="score this model folder and exit")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.evaluate:
        scores = evaluate_model(Path(args.evaluate), args.device, args.fidelity_prompts)
        print(json.dumps(scores))
    elif args.child:
        run_child(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
