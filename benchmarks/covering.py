"""A covering-programme solver with both bounds, for benchmarks/density_bounds.py.

`cover` solves, for each of N rows independently, min cost . x over x in {0,1}^P subject to
a[n, s] . x >= tau for every sample s. Any convex combination pi of the samples' constraints
relaxes them into one knapsack constraint whose fractional optimum is a *lower bound* (the LP
dual; it is the LP value at the best pi). `cover` maximises that bound over pi by
exponentiated-gradient steps on the samples that the current mixture leaves below tau, and takes
as the feasible mask (*upper bound*) the shortest prefix of the mixture's order (mass per cost)
that puts every sample over tau, then drops kept items whose removal keeps every sample over tau.
For unit costs an LP vertex has at most S fractional items, so the two bounds meet within a few
items. `cover_mean` is the mean-over-samples constraint: one knapsack row, exact for unit costs
(sort by mean mass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPE = torch.float64


@dataclass
class Cover:
    """One solution per row: a feasible mask, its cost and a bound no feasible mask beats."""

    mask: torch.Tensor  # [N, P] bool, feasible
    cost: torch.Tensor  # [N] cost of mask
    lower: torch.Tensor  # [N] lower bound on the cost of any feasible mask


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The rank of every item in a per-row order: rank[n, order[n, j]] = j."""
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
