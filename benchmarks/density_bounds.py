"""How low can a *static* tile mask go on a profile? Density bounds at a recall threshold (issue 7).

Measurement only: reads finished profiles (training and held-out) and, optionally, the demo's
exported config for its step schedule and as the reference on held-out prompts. Nothing in
`compact_search` changes. Every (bucket, layer, head) is solved on its own; densities are
averaged over the sparse steps the way the demo and the config summary do:

- `mean`: plain mean over (bucket, layer, head), as `CompactConfig.summary()` / export / check
  report it (the demo's 0.585);
- `step_mean`: each bucket weighted by the denoising steps it covers (the search objective's
  weighting; the dense warm-up steps are left out of both).

Variants (tile pairs are (query tile, key tile); a mask's recall on a sample is the mean over query
tiles of the kept mass, as docs/concepts.md defines recall):

- `freeform`: any set of tile pairs, one per (bucket, head), every training sample of the bucket
  >= tau (`min`) or the mean over them >= tau (`mean`).
- `rows`: any set of key tiles per query tile, each row keeping >= tau of its own mass on every
  sample (`min`) or on the mean (`mean`); for comparison (a stricter, row-wise constraint).
- `offsets`: any set of relative tile offsets (|df|, |dh|, |dw|) per (bucket, head), the repo's
  clipping rule (key j kept for query i iff |coords(i) - coords(j)| is kept); `offsets-signed`
  the same over signed offsets (df, dh, dw), which can follow a direction.
- `oracle`: one mask per sample (dynamic, what no static config can reach): the smallest set of
  pairs holding tau of that sample's mass; the per-sample bound of BENCHMARKS.md.

The `min` problems are covering programmes, solved by `benchmarks.covering.cover` with both a
feasible mask (`density`, an upper bound) and an LP-dual lower bound that no mask of that variant
can beat (`density_lb`); the `mean` problems are one knapsack constraint (`cover_mean`).

Bucketings: the demo's (from --config), and every way to cut the sparse captured steps into
1..n contiguous buckets with the search's rule (compact_search.search.study.schedule_of: a bound
sits halfway between captured steps), the best cut per bucket count in the printed table.

    .venv/bin/python -m benchmarks.density_bounds            # runs/demo-b32, tau 0.9

Appends to --out: summary rows (`level=model`), per-head rows of the demo bucketing
(`level=head`), and per-head content-dependence rows (`level=content`: the free-form mask over all
prompts vs one per prompt, the per-sample oracle, the recall a prompt's own mask keeps on the other
prompts, and the Pearson r of key-tile importance across prompts vs across steps).
Measured: about 2 minutes on 2 CPU threads for the demo profile (6 layers x 4 heads, 2,048 tokens).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks.common import RESULTS as RESULTS_DIR
from benchmarks.common import append_rows, git_sha
from benchmarks.covering import DTYPE, cover, cover_mean
from compact_search.config import load_config
from compact_search.geometry import TileShape, tile_coordinates
from compact_search.profiling import load_profile
from compact_search.search.offsets import offset_index
from compact_search.search.study import schedule_of

RESULTS = RESULTS_DIR / "density_bounds.csv"
# (variant, stat) pairs solved on every tile; "-" for the oracle, which has no constraint choice.
VARIANTS = (
    ("freeform", "min"),
    ("freeform", "mean"),
    ("rows", "min"),
    ("rows", "mean"),
    ("offsets", "min"),
    ("offsets", "mean"),
    ("offsets-signed", "min"),
    ("oracle", "-"),
)
# Solved only on the demo's bucketing and the per-step one (4 buckets: one per sparse captured
# step of the demo profile), to bound the run time.
COMPARISON_VARIANTS = ("rows", "oracle", "offsets-signed")
PER_STEP_BUCKETS = 4


def signed_offset_index(tile_grid) -> tuple[torch.Tensor, int]:
    coords = tile_coordinates(tile_grid)
    d = coords[:, None, :] - coords[None, :, :]  # query - key
    f, h, w = tile_grid.as_tuple()
    idx = (
        ((d[..., 0] + f - 1) * (2 * h - 1) + (d[..., 1] + h - 1)) * (2 * w - 1) + d[..., 2] + w - 1
    )
    return idx, (2 * f - 1) * (2 * h - 1) * (2 * w - 1)


def offset_tables(
    mass: torch.Tensor, index: torch.Tensor, n_off: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """mass [..., nq, nk] -> per-offset recall [..., n_off] and per-offset density [n_off]."""
    nt = mass.shape[-1]
    lead = mass.shape[:-2]
    flat = mass.reshape(-1, nt * nt).to(DTYPE)
    table = torch.zeros(flat.shape[0], n_off, dtype=DTYPE)
    table.index_add_(1, index.reshape(-1), flat)
    dens = torch.bincount(index.reshape(-1), minlength=n_off).to(DTYPE) / (nt * nt)
    return (table / nt).reshape(*lead, n_off), dens


def load_masses(profile, tile: TileShape) -> dict[int, torch.Tensor]:
    """step -> [prompts, L*H, nq, nk] float64 (rows sum to 1)."""
    per_step = {}
    g = len(profile.prompts) if profile.store == "per-prompt" else 1
    for step in profile.steps:
        layers = [profile.sample_tile_mass(layer, tile, [step]) for layer in profile.layers]
        x = torch.stack(layers, 1)  # [G, L, H, nq, nk]
        per_step[step] = x.reshape(g, -1, *x.shape[-2:]).to(DTYPE)
    return per_step


def bucket_samples(masses: dict[int, torch.Tensor], steps: tuple[int, ...]) -> torch.Tensor:
    """[N, S, nq, nk]: samples of these steps (step-major, then prompt) per (layer, head)."""
    x = torch.cat([masses[s] for s in steps], 0)  # [S, N, nq, nk]
    return x.transpose(0, 1)


def recalls(mask: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """mask [N, nq, nk] bool, samples [N, S, nq, nk] -> recall [N, S]."""
    nq = samples.shape[-2]
    return torch.einsum("nqk,nsqk->ns", mask.to(DTYPE), samples) / nq


@dataclass
class Solved:
    density: torch.Tensor  # [N]
    lower: torch.Tensor  # [N]
    mask: torch.Tensor | None  # [N, nq, nk] bool (static variants)


def solve(variant: str, stat: str, x: torch.Tensor, tau: float, tg) -> Solved:
    """Smallest mask of a variant on x: [N, S, nq, nk] samples of one bucket (tg: tile grid)."""
    n, s, nq, nk = x.shape
    if variant == "freeform":
        a = x.reshape(n, s, nq * nk) / nq
        res = cover(a, tau) if stat == "min" else cover_mean(a, tau)
        return Solved(res.cost / (nq * nk), res.lower / (nq * nk), res.mask.reshape(n, nq, nk))
    if variant == "rows":
        a = x.permute(0, 2, 1, 3).reshape(n * nq, s, nk)
        res = cover(a, tau) if stat == "min" else cover_mean(a, tau)
        dens = res.cost.reshape(n, nq).sum(1) / (nq * nk)
        low = res.lower.reshape(n, nq).sum(1) / (nq * nk)
        return Solved(dens, low, res.mask.reshape(n, nq, nk))
    if variant in ("offsets", "offsets-signed"):
        if variant == "offsets":
            index, n_off = offset_index(tg), tg.num_tokens
        else:
            index, n_off = signed_offset_index(tg)
        table, dens = offset_tables(x, index, n_off)  # [N, S, O], [O]
        keep = dens > 0
        sub = table[..., keep]
        res = (
            cover(sub, tau, dens[keep], prune_each=True)
            if stat == "min"
            else cover_mean(sub, tau, dens[keep])
        )
        sel = torch.zeros(n, n_off, dtype=torch.bool)
        sel[:, keep] = res.mask
        return Solved(res.cost, res.lower, sel[:, index])
    if variant == "oracle":  # one mask per sample, reported as the mean over samples
        a = x.reshape(n * s, 1, nq * nk) / nq
        res = cover(a, tau)
        d = res.cost.reshape(n, s).mean(1) / (nq * nk)
        return Solved(d, d, None)
    raise ValueError(variant)


class Bucketing(NamedTuple):
    """One way to cut the sparse steps: its bucket count, its buckets and whether it is the
    demo's; a bucket is (first step, stop step, captured steps inside)."""

    count: int
    buckets: list[tuple[int, int, tuple[int, ...]]]
    is_demo: bool


def bucketings(
    profile, dense_steps: int, demo_starts: tuple[int, ...] | None
) -> dict[str, Bucketing]:
    """Every contiguous cut of the sparse captured steps, named "<count>b@<bucket starts>"."""
    captured = list(profile.steps)
    live = [i for i, s in enumerate(captured) if s >= dense_steps]
    out = {}
    for k in range(1, len(live) + 1):
        for cuts in itertools.combinations(live[1:], k - 1):
            sched, _ = schedule_of(dense_steps, list(cuts), captured, 1, profile.num_steps)
            if sched is None:
                continue
            buckets = [
                (a, b, tuple(captured[i] for i in idx))
                for (a, b), idx in zip(sched.bounds, sched.samples, strict=True)
            ]
            starts = tuple(a for a, _, _ in buckets)
            name = f"{k}b@" + ",".join(map(str, starts))
            out[name] = Bucketing(k, buckets, starts == demo_starts)
    return out


@dataclass(frozen=True)
class Study:
    """What every tile's pass shares: the profiles, the demo's config and schedule, tau."""

    profile: object
    heldout: object | None
    config: object | None
    tau: float
    dense_steps: int
    demo_starts: tuple[int, ...] | None
    schemes: dict[str, Bucketing]
    base: dict[str, object]  # leading columns of every CSV row

    @property
    def sparse_total(self) -> int:
        return self.profile.num_steps - self.dense_steps

    @property
    def num_units(self) -> int:
        """(layer, head) pairs: the N of every [N, ...] tensor here."""
        return len(self.profile.layers) * self.profile.num_heads

    def layer_head(self, unit: int) -> tuple[int, int]:
        heads = self.profile.num_heads
        return self.profile.layers[unit // heads], unit % heads

    def step_weights(self, bounds: list[tuple[int, int]]) -> torch.Tensor:
        """[B] share of the sparse denoising steps each bucket covers."""
        return torch.tensor([(b - a) / self.sparse_total for a, b in bounds], dtype=DTYPE)

    def heldout_steps(self, start: int, stop: int) -> tuple[int, ...]:
        if self.heldout is None:
            return ()
        return tuple(s for s in self.heldout.steps if start <= s < stop)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="runs/demo-b32/profile")
    ap.add_argument("--heldout", default="runs/demo-b32/heldout-profile")
    ap.add_argument(
        "--config",
        default="runs/demo-b32/config.json",
        help="the demo's config: schedule and held-out reference ('' for none)",
    )
    ap.add_argument("--recall", type=float, default=0.9)
    ap.add_argument(
        "--dense-fraction", type=float, default=0.3, help="used when no --config gives the schedule"
    )
    ap.add_argument("--tiles", default="", help="e.g. 1x4x4,2x4x4 (default: smallest + config's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    return ap.parse_args(argv)


def load_study(args: argparse.Namespace) -> Study:
    """Profiles, the schedule (the config's, else --dense-fraction) and every bucketing."""
    prof = load_profile(args.profile)
    held = load_profile(args.heldout) if args.heldout else None
    config = load_config(args.config) if args.config else None
    if config is not None:
        dense_steps = config.schedule.dense_steps
        demo_starts = tuple(config.schedule.bucket_starts)
    else:
        dense_steps = round(args.dense_fraction * prof.num_steps)
        demo_starts = None
    base = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_sha(),
        "profile": args.profile,
        "heldout": args.heldout or "",
        "recall": args.recall,
        "dense_steps": dense_steps,
    }
    schemes = bucketings(prof, dense_steps, demo_starts)
    return Study(prof, held, config, args.recall, dense_steps, demo_starts, schemes, base)


def tiles_of(args: argparse.Namespace, study: Study) -> list[TileShape]:
    """--tiles, else the profile's smallest tile and the config's."""
    if args.tiles:
        return [TileShape.of(tuple(int(v) for v in t.split("x"))) for t in args.tiles.split(",")]
    smallest = min(study.profile.tiles, key=lambda t: t.volume)
    tiles = [smallest]
    if study.config is not None and study.config.geometry.tile != smallest:
        tiles.append(study.config.geometry.tile)
    return tiles


class TileSolver:
    """One tile's samples (training and held-out) and its solved masks, each solved once."""

    def __init__(self, study: Study, tile: TileShape, timings: dict[str, float]):
        self.study, self.tile, self.timings = study, tile, timings
        self.tile_grid = study.profile.tile_grid(tile)
        started = time.perf_counter()
        self.train = load_masses(study.profile, tile)
        self.heldout = load_masses(study.heldout, tile) if study.heldout else {}
        timings[f"load {tile}"] = time.perf_counter() - started
        self._solved: dict[tuple, Solved] = {}

    def get(self, variant: str, stat: str, steps: tuple[int, ...]) -> Solved:
        key = (variant, stat, steps)
        if key not in self._solved:
            started = time.perf_counter()
            samples = bucket_samples(self.train, steps)
            self._solved[key] = solve(variant, stat, samples, self.study.tau, self.tile_grid)
            name = f"{variant}-{stat} {self.tile}"
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
        return self._solved[key]

    def heldout_samples(self, start: int, stop: int) -> torch.Tensor | None:
        """[N, S', nq, nk] held-out samples of the steps in [start, stop); None if none."""
        steps = self.study.heldout_steps(start, stop)
        return bucket_samples(self.heldout, steps) if steps else None


def _leading(study, tile, level, variant, stat, buckets, starts, demo) -> dict[str, object]:
    return {
        **study.base,
        "level": level,
        "tile": str(tile),
        "variant": variant,
        "stat": stat,
        "buckets": buckets,
        "bucket_starts": starts,
        "demo_buckets": demo,
    }


def _heldout_recalls(solver: TileSolver, bounds, masks) -> list[torch.Tensor]:
    """[N, S'] held-out recall of each bucket's masks, for the buckets holding held-out steps."""
    out = []
    for (start, stop), mask in zip(bounds, masks, strict=True):
        samples = solver.heldout_samples(start, stop)
        if samples is not None:
            out.append(recalls(mask, samples))
    return out


def variant_rows(solver: TileSolver, variant: str, stat: str) -> list[dict]:
    """A model row per bucketing (comparison variants: the demo's and per-step only), and a row
    per (bucket, layer, head) of the demo's bucketing."""
    study, tile = solver.study, solver.tile
    rows = []
    for name, (k, buckets, is_demo) in study.schemes.items():
        if variant in COMPARISON_VARIANTS and not (is_demo or k == PER_STEP_BUCKETS):
            continue
        starts = name.split("@")[1]
        per_bucket = [solver.get(variant, stat, steps) for _, _, steps in buckets]
        dens = torch.stack([r.density for r in per_bucket])  # [B, N]
        low = torch.stack([r.lower for r in per_bucket])
        w = study.step_weights([(a, b) for a, b, _ in buckets])
        row = {
            **_leading(study, tile, "model", variant, stat, k, starts, int(is_demo)),
            "mean": round(float(dens.mean()), 4),
            "step_mean": round(float((w[:, None] * dens).sum(0).mean()), 4),
            "mean_lb": round(float(low.mean()), 4),
            "step_mean_lb": round(float((w[:, None] * low).sum(0).mean()), 4),
        }
        if study.heldout is not None and per_bucket[0].mask is not None:
            held = _heldout_recalls(
                solver, [(a, b) for a, b, _ in buckets], [r.mask for r in per_bucket]
            )
            if held:
                worst = torch.stack([h.min(1).values for h in held])  # [B', N]
                mean = torch.stack([h.mean(1) for h in held])
                row.update(_held_stats(worst, mean, study.tau))
        rows.append(row)
        if is_demo:
            rows += _demo_head_rows(solver, variant, stat, k, starts, buckets, per_bucket)
    return rows


def _demo_head_rows(solver, variant, stat, k, starts, buckets, per_bucket) -> list[dict]:
    study = solver.study
    rows = []
    for b, solved in enumerate(per_bucket):
        start, stop, _ = buckets[b]
        held = solver.heldout_samples(start, stop) if solved.mask is not None else None
        for unit in range(study.num_units):
            layer, head = study.layer_head(unit)
            row = {
                **_leading(study, solver.tile, "head", variant, stat, k, starts, 1),
                "bucket": b,
                "layer": layer,
                "head": head,
                "mean": round(float(solved.density[unit]), 4),
                "mean_lb": round(float(solved.lower[unit]), 4),
            }
            if held is not None:
                recall = recalls(solved.mask[unit : unit + 1], held[unit : unit + 1])
                row["heldout_worst"] = round(float(recall.min()), 4)
                row["heldout_mean"] = round(float(recall.mean()), 4)
            rows.append(row)
    return rows


def config_rows(solver: TileSolver) -> tuple[list[dict], torch.Tensor]:
    """The demo config's own masks at this tile: a model row with their held-out recall, a row
    per (bucket, layer, head), and their density [B, N]."""
    study, config = solver.study, solver.study.config
    bounds = [config.schedule.bucket_range(b) for b in range(config.schedule.num_buckets)]
    masks = [
        torch.cat([config.tile_masks(b, layer) for layer in study.profile.layers])
        for b in range(len(bounds))
    ]
    dens = torch.stack([m.float().mean((1, 2)).to(DTYPE) for m in masks])  # [B, N]
    w = study.step_weights(bounds)
    starts = ",".join(map(str, study.demo_starts))
    row = {
        **_leading(study, solver.tile, "model", "config", "min", len(bounds), starts, 1),
        "mean": round(float(dens.mean()), 4),
        "step_mean": round(float((w[:, None] * dens).sum(0).mean()), 4),
    }
    held = _heldout_recalls(solver, bounds, masks)
    if held:
        worst = torch.stack([h.min(1).values for h in held])
        mean = torch.stack([h.mean(1) for h in held])
        row.update(_held_stats(worst, mean, study.tau))
    rows = [row]
    for b in range(dens.shape[0]):
        for unit in range(study.num_units):
            layer, head = study.layer_head(unit)
            rows.append(
                {
                    **_leading(study, solver.tile, "head", "config", "min", len(bounds), starts, 1),
                    "bucket": b,
                    "layer": layer,
                    "head": head,
                    "mean": round(float(dens[b, unit]), 4),
                }
            )
    return rows, dens


def study_tile(study: Study, tile: TileShape, timings: dict[str, float]) -> list[dict]:
    """Every row of one tile, printing its summary table, per-head table and content report."""
    solver = TileSolver(study, tile, timings)
    rows = []
    for variant, stat in VARIANTS:
        rows += variant_rows(solver, variant, stat)
    config_density = None
    config = study.config
    if config is not None and config.geometry.tile == tile and study.heldout is not None:
        more, config_density = config_rows(solver)
        rows += more
    print_table([r for r in rows if r["level"] == "model"], str(tile))
    demo = [scheme for scheme in study.schemes.values() if scheme.is_demo]
    if not demo:
        return rows
    demo_buckets = demo[0].buckets
    per_head = {
        f"{v}-{st}": torch.stack(
            [solver.get(v, st, steps).density for _, _, steps in demo_buckets]
        ).mean(0)
        for v, st in VARIANTS
    }
    if config_density is not None:
        per_head = {"config": config_density.mean(0), **per_head}
    head_table(per_head, study.profile.layers, study.profile.num_heads)
    started = time.perf_counter()
    nl, nh = len(study.profile.layers), study.profile.num_heads
    for r in content_report(solver.train, demo_buckets, study.tau, nl, nh, study.profile, tile):
        rows.append(
            {
                **study.base,
                "level": "content",
                "tile": str(tile),
                "buckets": len(demo_buckets),
                "bucket_starts": ",".join(map(str, study.demo_starts)),
                "demo_buckets": 1,
                **r,
            }
        )
    timings[f"content {tile}"] = time.perf_counter() - started
    return rows


def _held_stats(worst: torch.Tensor, meanr: torch.Tensor, tau: float) -> dict:
    """worst/mean [B', N] held-out recall per (bucket, head)."""
    return {
        "heldout_worst_min": round(float(worst.min()), 4),
        "heldout_worst_mean": round(float(worst.mean()), 4),
        "heldout_mean_mean": round(float(meanr.mean()), 4),
        "heldout_below_0.02_worst": int((worst < tau - 0.02).sum()),
        "heldout_below_0.03_worst": int((worst < tau - 0.03).sum()),
        "heldout_below_0.02_mean": int((meanr < tau - 0.02).sum()),
        "heldout_below_0.03_mean": int((meanr < tau - 0.03).sum()),
        "heldout_head_buckets": int(worst.numel()),
        "heldout_heads_below_0.02_worst": int((worst < tau - 0.02).any(0).sum()),
        "heldout_heads_below_0.03_worst": int((worst < tau - 0.03).any(0).sum()),
    }


def head_table(per_head: dict[str, torch.Tensor], layers: list[int], nh: int) -> None:
    """Per-head density (mean over the demo buckets) of every variant, largest config or
    offsets-min excess over freeform-min first; then each gap's share by head."""
    names = list(per_head)
    ref = per_head.get("config", per_head["offsets-min"])
    gap = ref - per_head["freeform-min"]
    print("\n-- per head, demo buckets (mean over buckets): " + " ".join(names))
    for i in gap.argsort(descending=True).tolist():
        print(
            f"  L{layers[i // nh]}H{i % nh}: "
            + " ".join(f"{float(per_head[k][i]):.3f}" for k in names)
        )
    print("  mean: " + " ".join(f"{float(per_head[k].mean()):.3f}" for k in names))
    pairs = [
        ("config", "offsets-min"),
        ("offsets-min", "freeform-min"),
        ("freeform-min", "freeform-mean"),
        ("freeform-min", "oracle--"),
    ]
    for hi, lo in pairs:
        if hi in per_head and lo in per_head:
            d = per_head[hi] - per_head[lo]
            top = d.argsort(descending=True)[:5].tolist()
            print(
                f"  gap {hi} - {lo}: mean {float(d.mean()):.4f}; top heads "
                + ", ".join(f"L{layers[i // nh]}H{i % nh} {float(d[i]):+.3f}" for i in top)
                + f" (top 5 = {float(d[top].sum() / d.sum().clamp_min(1e-12)):.0%} of it)"
            )


def print_table(rows: list[dict], tile: str) -> None:
    print(
        f"\n== tile {tile}: mean density over (bucket, layer, head) [step-weighted] "
        "(lower bound); held-out recall of the static mask: min over (head, bucket) of the "
        "worst sample / mean recall; #(head, bucket) with worst sample < tau-0.02 / "
        "tau-0.03 of n (distinct heads); # with mean over samples < tau-0.02 / tau-0.03"
    )
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["variant"], r["stat"], r["buckets"])
        if r.get("demo_buckets") or key not in best or r["step_mean"] < best[key]["step_mean"]:
            if key in best and best[key].get("demo_buckets") and not r.get("demo_buckets"):
                continue
            best[key] = r
    for key in sorted(best, key=lambda k: (k[0], k[1], k[2])):
        r = best[key]
        ho = ""
        if "heldout_worst_min" in r:
            ho = (
                f"  held-out {r['heldout_worst_min']:.3f} / {r['heldout_mean_mean']:.3f}, "
                f"{r['heldout_below_0.02_worst']}/{r['heldout_below_0.03_worst']} "
                f"of {r['heldout_head_buckets']} (heads {r['heldout_heads_below_0.02_worst']}"
                f"/{r['heldout_heads_below_0.03_worst']}); by mean "
                f"{r['heldout_below_0.02_mean']}/{r['heldout_below_0.03_mean']}"
            )
        tag = "demo" if r.get("demo_buckets") else "best"
        lb = f" ({r['mean_lb']:.3f})" if "mean_lb" in r else ""
        print(
            f"{r['variant']:>15} {r['stat']:>4} {r['buckets']}b {tag} @{r['bucket_starts']:<9}"
            f" {r['mean']:.3f}{lb} [{r['step_mean']:.3f}]{ho}"
        )


def content_report(train, buckets, tau, nl, nh, prof, tile) -> list[dict]:
    """Per head: static free-form density per prompt vs over all prompts, cross-prompt recall of
    per-prompt masks, and key-tile importance correlation across prompts vs across steps."""
    g = next(iter(train.values())).shape[0]
    out = []
    print(
        f"\n-- content dependence, tile {tile}, demo buckets: per head "
        "[all-prompt mask, mean per-prompt mask, per-sample oracle] density; "
        "cross-prompt recall (mask of prompt p on prompt q != p, worst sample, mean over p,q); "
        "key-importance Pearson r across prompts (same step) / across steps (same prompt)"
    )
    for b, (_, _, steps) in enumerate(buckets):
        x = bucket_samples(train, steps)  # [N, S, nq, nk], S = steps x prompts
        n, s, nq, nk = x.shape
        allp = solve("freeform", "min", x, tau, None)
        per = x.reshape(n, len(steps), g, nq, nk).transpose(1, 2).reshape(n * g, len(steps), nq, nk)
        perp = solve("freeform", "min", per, tau, None)
        orc = solve("oracle", "-", x, tau, None)
        pmask = perp.mask.reshape(n, g, nq, nk)
        xs = x.reshape(n, len(steps), g, nq, nk)
        cross = torch.einsum("npqk,ntrqk->nptr", pmask.to(DTYPE), xs) / nq  # [N, P, T, R]
        off = ~torch.eye(g, dtype=torch.bool)
        cross_w = cross.min(2).values[:, off]  # [N, P*(R-1)] worst step
        keyimp = xs.mean(-2)  # [N, T, R, nk] mass each key tile gets, mean over queries
        kc = keyimp - keyimp.mean(-1, keepdim=True)
        kc = kc / kc.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        r_prompts = torch.einsum("ntpk,ntqk->ntpq", kc, kc)[..., off].mean((1, 2))
        if len(steps) > 1:
            offs = ~torch.eye(len(steps), dtype=torch.bool)
            r_steps = torch.einsum("nsrk,ntrk->nrst", kc, kc)[..., offs].mean((1, 2))
        else:
            r_steps = torch.full((n,), float("nan"), dtype=DTYPE)
        print(f" bucket {b} (steps {steps}):")
        order = (allp.density - orc.density).argsort(descending=True)
        for i in order.tolist():
            print(
                f"  L{prof.layers[i // nh]}H{i % nh}: {allp.density[i]:.3f} "
                f"{perp.density.reshape(n, g)[i].mean():.3f} {orc.density[i]:.3f}  "
                f"cross {cross_w[i].min():.3f}/{cross_w[i].mean():.3f}  "
                f"r {r_prompts[i]:.2f}/{r_steps[i]:.2f}"
            )
            out.append(
                {
                    "variant": "content",
                    "bucket": b,
                    "layer": prof.layers[i // nh],
                    "head": i % nh,
                    "mean": round(float(allp.density[i]), 4),
                    "per_prompt_density": round(float(perp.density.reshape(n, g)[i].mean()), 4),
                    "oracle_density": round(float(orc.density[i]), 4),
                    "cross_prompt_recall_worst": round(float(cross_w[i].min()), 4),
                    "cross_prompt_recall_mean": round(float(cross_w[i].mean()), 4),
                    "key_r_across_prompts": round(float(r_prompts[i]), 3),
                    "key_r_across_steps": round(float(r_steps[i]), 3),
                }
            )
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    study = load_study(args)
    prof, held = study.profile, study.heldout
    print(
        f"profile {args.profile}: steps {prof.steps}, {len(prof.prompts)} prompts, "
        f"{len(prof.layers)} layers x {prof.num_heads} heads; held-out {args.heldout}: "
        f"steps {held.steps if held else '-'}; tau {study.tau}; dense steps {study.dense_steps}; "
        f"demo buckets start {study.demo_starts}"
    )
    timings: dict[str, float] = {}
    rows: list[dict] = []
    for tile in tiles_of(args, study):
        rows += study_tile(study, tile, timings)
    wall = time.perf_counter() - t_start
    for r in rows:
        r["wall_s"] = round(wall, 1)
        r["threads"] = args.threads
    append_rows(Path(args.out), rows)
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"wall {wall:.1f} s; {len(rows)} rows appended to {args.out}")


if __name__ == "__main__":
    main()
