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
tiles of the kept mass, as in DESIGN.md):

- `freeform`: any set of tile pairs, one per (bucket, head), every training sample of the bucket
  >= tau (`min`) or the mean over them >= tau (`mean`).
- `rows`: any set of key tiles per query tile, each row keeping >= tau of its own mass on every
  sample (`min`) or on the mean (`mean`); for comparison (a stricter, row-wise constraint).
- `offsets`: any set of relative tile offsets (|df|, |dh|, |dw|) per (bucket, head), the repo's
  clipping rule (key j kept for query i iff |coords(i) - coords(j)| is kept); `offsets-signed`
  the same over signed offsets (df, dh, dw), which can follow a direction.
- `oracle`: one mask per sample (dynamic, what no static config can reach): the smallest set of
  pairs holding tau of that sample's mass; the per-sample bound of BENCHMARKS.md.

The `min` problems are covering programmes: minimise cost(x) subject to recall_s(x) >= tau for
every sample s. Any convex combination pi of the samples' constraints relaxes them into one
knapsack constraint whose fractional optimum is a *lower bound* (the LP dual; it is the LP value
at the best pi). The script maximises that bound over pi by exponentiated-gradient steps on the
samples that the current mixture leaves below tau, and takes as the feasible mask (*upper bound*)
the shortest prefix of the mixture's order (mass per cost) that puts every sample over tau, then
drops kept items whose removal keeps every sample over tau. Both bounds are reported (`density`
is always a feasible mask; `density_lb` no mask of that variant can beat). For `freeform` and
`rows` an LP vertex has at most S fractional items, so the two meet within a few pairs. The
`mean` problems are one knapsack constraint: exact for unit costs (sort by mean mass).

Bucketings: the demo's (from --config), and every way to cut the sparse captured steps into
1..n contiguous buckets with the search's rule (compact_search.search.study.schedule_of: a bound
sits halfway between captured steps), the best cut per bucket count in the printed table.

    .venv/bin/python benchmarks/density_bounds.py            # runs/demo-b32, tau 0.9

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
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS as RESULTS_DIR  # noqa: E402
from common import append_rows  # noqa: E402

from compact_search.config import load_config  # noqa: E402
from compact_search.geometry import TileShape, tile_coordinates  # noqa: E402
from compact_search.profiling import load_profile  # noqa: E402
from compact_search.search.offsets import offset_index  # noqa: E402
from compact_search.search.study import schedule_of  # noqa: E402

RESULTS = RESULTS_DIR / "density_bounds.csv"
DTYPE = torch.float64


# --- covering solver ---------------------------------------------------------------------------


@dataclass
class Cover:
    mask: torch.Tensor  # [N, P] bool, feasible
    cost: torch.Tensor  # [N] cost of mask
    lower: torch.Tensor  # [N] lower bound on the cost of any feasible mask


def _inverse(order: torch.Tensor) -> torch.Tensor:
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    return rank


def cover(
    a: torch.Tensor,
    tau: float,
    cost: torch.Tensor | None = None,
    *,
    iters: int = 200,
    rel_gap: float = 1e-3,
    prune: int = 4096,
    prune_each: bool = False,
) -> Cover:
    """min cost . x over x in {0,1}^P with a[n, s] . x >= tau for every s, for each n.

    a: [N, S, P] nonnegative contributions; cost: [P] or [N, P] positive, None = unit costs.
    Returns a feasible mask and the LP-dual lower bound (see the module doc). Rows stop once
    their bounds are within rel_gap; prune_each prunes every candidate (small P only).
    """
    n, s, p = a.shape
    a = a.to(DTYPE)
    c = torch.ones(n, p, dtype=DTYPE) if cost is None else cost.to(DTYPE).expand(n, p).clone()
    pi = torch.full((n, s), 1.0 / s, dtype=DTYPE)
    best_ub = torch.full((n,), math.inf, dtype=DTYPE)
    best_lb = torch.zeros(n, dtype=DTYPE)
    best_mask = torch.ones(n, p, dtype=torch.bool)
    best_pi = pi.clone()
    act = torch.arange(n)  # rows still iterating
    for t in range(iters if s > 1 else 1):
        aa, cc, pp = a[act], c[act], pi[act]
        na = len(act)
        rows = torch.arange(na)
        m = torch.einsum("ns,nsp->np", pp, aa)
        order = (m / cc).argsort(-1, descending=True)
        cum = aa.gather(2, order[:, None, :].expand(na, s, p)).cumsum(-1)  # [n, S, P]
        c_sorted = cc.gather(1, order)
        ccum = c_sorted.cumsum(-1)
        m_sorted = m.gather(1, order)
        mcum = m_sorted.cumsum(-1)
        # lower bound: fractional knapsack on the pi-mixture constraint
        k = (mcum < tau).sum(-1).clamp(max=p - 1)  # first index reaching tau
        prev = (k - 1).clamp(min=0)
        prev_m = torch.where(k > 0, mcum[rows, prev], 0.0)
        prev_c = torch.where(k > 0, ccum[rows, prev], 0.0)
        frac = ((tau - prev_m) / m_sorted[rows, k].clamp_min(1e-300)).clamp(0.0, 1.0)
        lb = prev_c + frac * c_sorted[rows, k]
        # upper bound: shortest prefix of this order meeting tau on every sample
        worst = cum.min(1).values  # [n, P], nondecreasing
        kf = (worst < tau).sum(-1).clamp(max=p - 1)
        mask = _inverse(order) <= kf[:, None]
        if prune_each:
            mask = _prune(aa, cc, mask, pp, tau, prune)
        ub = (mask * cc).sum(-1)
        better = ub < best_ub[act]
        best_mask[act] = torch.where(better[:, None], mask, best_mask[act])
        best_ub[act] = torch.where(better, ub, best_ub[act])
        up = lb > best_lb[act]
        best_lb[act] = torch.where(up, lb, best_lb[act])
        best_pi[act] = torch.where(up[:, None], pp, best_pi[act])
        open_ = (best_ub[act] - best_lb[act]) > rel_gap * best_ub[act]
        if s == 1 or not bool(open_.any()):
            break
        # exponentiated gradient: samples below tau at the mixture's own cut gain weight
        g = cum[rows, :, k] - tau  # [n, S]
        g = g / g.abs().amax(1, keepdim=True).clamp_min(1e-12)
        pp = pp * torch.exp(-g / math.sqrt(t + 1))
        pi[act] = pp / pp.sum(1, keepdim=True)
        act = act[open_]
    if prune and s > 1 and not prune_each:
        best_mask = _prune(a, c, best_mask, best_pi, tau, prune)
    final = (best_mask * c).sum(-1)
    return Cover(best_mask, final, torch.minimum(best_lb, final))


def _prune(
    a: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, pi: torch.Tensor, tau: float, limit: int
) -> torch.Tensor:
    """Drop kept items (highest cost first, then least mixture mass) while every sample stays
    >= tau; at most `limit` candidates per row."""
    n, s, p = a.shape
    mask = mask.clone()
    m = torch.einsum("ns,nsp->np", pi, a)
    key = torch.where(mask, -c * 1e6 + m, math.inf)  # kept: cost desc, then mass asc
    order = key.argsort(-1)[:, : min(limit, p)]
    rec = torch.einsum("nsp,np->ns", a, mask.to(a.dtype))
    rows = torch.arange(n)
    for j in range(order.shape[1]):
        item = order[:, j]
        kept = mask[rows, item]
        if not bool(kept.any()):
            break
        drop = a[rows, :, item]  # [N, S]
        ok = kept & ((rec - drop).min(1).values >= tau)
        if bool(ok.any()):
            rec = torch.where(ok[:, None], rec - drop, rec)
            mask[rows[ok], item[ok]] = False
    return mask


def cover_mean(a: torch.Tensor, tau: float, cost: torch.Tensor | None = None) -> Cover:
    """The mean-over-samples constraint: one knapsack row."""
    res = cover(a.mean(1, keepdim=True), tau, cost, prune=0)
    if cost is not None:  # costs differ: drop what the prefix overshoots
        res.mask = _prune(
            a.mean(1, keepdim=True).to(DTYPE),
            cost.to(DTYPE).expand_as(res.mask),
            res.mask,
            torch.ones(a.shape[0], 1, dtype=DTYPE),
            tau,
            4096,
        )
        res.cost = (res.mask * cost.to(DTYPE)).sum(-1)
    return res


# --- geometry --------------------------------------------------------------------------------


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


# --- data ------------------------------------------------------------------------------------


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


# --- variants --------------------------------------------------------------------------------


@dataclass
class Solved:
    density: torch.Tensor  # [N]
    lower: torch.Tensor  # [N]
    mask: torch.Tensor | None  # [N, nq, nk] bool (static variants)


def solve(variant: str, stat: str, x: torch.Tensor, tau: float, grid, tg) -> Solved:
    """x: [N, S, nq, nk] samples of one bucket."""
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


# --- main ------------------------------------------------------------------------------------


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bucketings(profile, dense_steps: int, demo_starts: tuple[int, ...] | None):
    """name -> list of (start, stop, captured steps), every contiguous cut of the sparse steps."""
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
            out[name] = (k, buckets, starts == demo_starts)
    return out


def main() -> None:
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tau = args.recall

    prof = load_profile(args.profile)
    held = load_profile(args.heldout) if args.heldout else None
    config = load_config(args.config) if args.config else None
    if config is not None:
        dense_steps = config.schedule.dense_steps
        demo_starts = tuple(config.schedule.bucket_starts)
    else:
        dense_steps = round(args.dense_fraction * prof.num_steps)
        demo_starts = None
    if args.tiles:
        tiles = [TileShape.of(tuple(int(v) for v in t.split("x"))) for t in args.tiles.split(",")]
    else:
        smallest = min(prof.tiles, key=lambda t: t.volume)
        tiles = [smallest]
        if config is not None and config.geometry.tile != smallest:
            tiles.append(config.geometry.tile)
    schemes = bucketings(prof, dense_steps, demo_starts)
    sparse_total = prof.num_steps - dense_steps
    nl, nh = len(prof.layers), prof.num_heads
    print(
        f"profile {args.profile}: steps {prof.steps}, {len(prof.prompts)} prompts, "
        f"{nl} layers x {nh} heads; held-out {args.heldout}: "
        f"steps {held.steps if held else '-'}; tau {tau}; dense steps {dense_steps}; "
        f"demo buckets start {demo_starts}"
    )

    base = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_sha(),
        "profile": args.profile,
        "heldout": args.heldout or "",
        "recall": tau,
        "dense_steps": dense_steps,
    }
    rows: list[dict] = []
    summary: list[dict] = []
    timings: dict[str, float] = {}
    variants = [
        ("freeform", "min"),
        ("freeform", "mean"),
        ("rows", "min"),
        ("rows", "mean"),
        ("offsets", "min"),
        ("offsets", "mean"),
        ("offsets-signed", "min"),
        ("oracle", "-"),
    ]
    for tile in tiles:
        tg = prof.tile_grid(tile)
        t0 = time.perf_counter()
        train = load_masses(prof, tile)
        heldm = load_masses(held, tile) if held else {}
        timings[f"load {tile}"] = time.perf_counter() - t0
        cache: dict[tuple, Solved] = {}

        def get(variant, stat, steps, cache=cache, train=train, tg=tg, tile=tile):
            key = (variant, stat, steps)
            if key not in cache:
                t = time.perf_counter()
                cache[key] = solve(variant, stat, bucket_samples(train, steps), tau, prof.grid, tg)
                timings[f"{variant}-{stat} {tile}"] = (
                    timings.get(f"{variant}-{stat} {tile}", 0.0) + time.perf_counter() - t
                )
            return cache[key]

        for variant, stat in variants:
            for name, (k, buckets, is_demo) in schemes.items():
                if variant in ("rows", "oracle", "offsets-signed") and not (is_demo or k == 4):
                    continue  # comparison variants: demo buckets and per-step only
                per_bucket = [get(variant, stat, steps) for _, _, steps in buckets]
                dens = torch.stack([r.density for r in per_bucket])  # [B, N]
                low = torch.stack([r.lower for r in per_bucket])
                w = torch.tensor([(b - a) / sparse_total for a, b, _ in buckets], dtype=DTYPE)
                row = {
                    **base,
                    "level": "model",
                    "tile": str(tile),
                    "variant": variant,
                    "stat": stat,
                    "buckets": k,
                    "bucket_starts": name.split("@")[1],
                    "demo_buckets": int(is_demo),
                    "mean": round(float(dens.mean()), 4),
                    "step_mean": round(float((w[:, None] * dens).sum(0).mean()), 4),
                    "mean_lb": round(float(low.mean()), 4),
                    "step_mean_lb": round(float((w[:, None] * low).sum(0).mean()), 4),
                }
                # held-out recall of the static masks (buckets holding held-out steps)
                if held is not None and per_bucket[0].mask is not None:
                    hr = []
                    for (a, b, _), r in zip(buckets, per_bucket, strict=True):
                        hsteps = tuple(s for s in held.steps if a <= s < b)
                        if hsteps:
                            hr.append(recalls(r.mask, bucket_samples(heldm, hsteps)))
                    if hr:
                        worst = torch.stack([h.min(1).values for h in hr])  # [B', N]
                        meanr = torch.stack([h.mean(1) for h in hr])
                        row.update(_held_stats(worst, meanr, tau))
                rows.append(row)
                if is_demo:
                    for b, r in enumerate(per_bucket):
                        for i in range(nl * nh):
                            hrow = {
                                **base,
                                "level": "head",
                                "tile": str(tile),
                                "variant": variant,
                                "stat": stat,
                                "buckets": k,
                                "bucket_starts": name.split("@")[1],
                                "demo_buckets": 1,
                                "bucket": b,
                                "layer": prof.layers[i // nh],
                                "head": i % nh,
                                "mean": round(float(r.density[i]), 4),
                                "mean_lb": round(float(r.lower[i]), 4),
                            }
                            a_, b_, _ = buckets[b]
                            hsteps = tuple(s for s in held.steps if a_ <= s < b_) if held else ()
                            if r.mask is not None and hsteps:
                                hrec = recalls(
                                    r.mask[i : i + 1], bucket_samples(heldm, hsteps)[i : i + 1]
                                )
                                hrow["heldout_worst"] = round(float(hrec.min()), 4)
                                hrow["heldout_mean"] = round(float(hrec.mean()), 4)
                            rows.append(hrow)
        # reference: the config's own masks on the same held-out samples
        if config is not None and config.geometry.tile == tile and held is not None:
            worst_l, mean_l, dens_l = [], [], []
            for b in range(config.schedule.num_buckets):
                a_, b_ = config.schedule.bucket_range(b)
                masks = torch.cat([config.tile_masks(b, layer) for layer in prof.layers])
                dens_l.append(masks.float().mean((1, 2)).to(DTYPE))
                hsteps = tuple(s for s in held.steps if a_ <= s < b_)
                if hsteps:
                    h = recalls(masks, bucket_samples(heldm, hsteps))
                    worst_l.append(h.min(1).values)
                    mean_l.append(h.mean(1))
            dens = torch.stack(dens_l)
            w = torch.tensor(
                [
                    (lambda r: (r[1] - r[0]) / sparse_total)(config.schedule.bucket_range(b))
                    for b in range(len(dens_l))
                ],
                dtype=DTYPE,
            )
            row = {
                **base,
                "level": "model",
                "tile": str(tile),
                "variant": "config",
                "stat": "min",
                "buckets": len(dens_l),
                "bucket_starts": ",".join(map(str, demo_starts)),
                "demo_buckets": 1,
                "mean": round(float(dens.mean()), 4),
                "step_mean": round(float((w[:, None] * dens).sum(0).mean()), 4),
            }
            if worst_l:
                row.update(_held_stats(torch.stack(worst_l), torch.stack(mean_l), tau))
            rows.append(row)
            config_dens = dens  # [B, N]
            for b in range(dens.shape[0]):
                for i in range(nl * nh):
                    rows.append(
                        {
                            **base,
                            "level": "head",
                            "tile": str(tile),
                            "variant": "config",
                            "stat": "min",
                            "buckets": dens.shape[0],
                            "bucket_starts": row["bucket_starts"],
                            "demo_buckets": 1,
                            "bucket": b,
                            "layer": prof.layers[i // nh],
                            "head": i % nh,
                            "mean": round(float(dens[b, i]), 4),
                        }
                    )
        else:
            config_dens = None
        summary.extend(r for r in rows if r["level"] == "model" and r["tile"] == str(tile))
        print_table(summary, str(tile))
        summary = []
        demo = [v for v in schemes.values() if v[2]]
        if demo:
            per_head = {
                f"{v}-{st}": torch.stack(
                    [get(v, st, steps).density for _, _, steps in demo[0][1]]
                ).mean(0)
                for v, st in variants
            }
            if config_dens is not None:
                per_head = {"config": config_dens.mean(0), **per_head}
            head_table(per_head, prof.layers, nh)
        # content dependence: per-prompt static masks on the demo buckets
        if demo:
            t = time.perf_counter()
            for r in content_report(train, demo[0][1], tau, nl, nh, prof, tile):
                rows.append(
                    {
                        **base,
                        "level": "content",
                        "tile": str(tile),
                        "buckets": len(demo[0][1]),
                        "bucket_starts": ",".join(map(str, demo_starts)),
                        "demo_buckets": 1,
                        **r,
                    }
                )
            timings[f"content {tile}"] = time.perf_counter() - t

    wall = time.perf_counter() - t_start
    for r in rows:
        r["wall_s"] = round(wall, 1)
        r["threads"] = args.threads
    append_rows(Path(args.out), rows)
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"wall {wall:.1f} s; {len(rows)} rows appended to {args.out}")


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
        allp = solve("freeform", "min", x, tau, None, None)
        per = x.reshape(n, len(steps), g, nq, nk).transpose(1, 2).reshape(n * g, len(steps), nq, nk)
        perp = solve("freeform", "min", per, tau, None, None)
        orc = solve("oracle", "-", x, tau, None, None)
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


if __name__ == "__main__":
    main()
