"""Global budget mode: hit a target mean density (or cost) by allocating recall across heads.

One tau for every head spends compute where heads are hard and saves little where they are easy.
Given each head's Pareto front (cheapest pattern per recall level), budget mode picks one front
point per head to maximise the summed recall subject to the step-weighted mean density (or cost)
staying within the target: every head starts at its cheapest point and the upgrade with the
most recall per unit of resource is taken while the budget allows (a heap over heads; the
marginal-rate greedy of the multiple-choice knapsack).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import numpy as np

from compact_search.errors import UserInputError
from compact_search.search.result import HeadResult


@dataclass(frozen=True)
class BudgetTarget:
    """Target mean density or mean cost over the sparse steps' heads."""

    value: float
    resource: str = "density"  # density | cost

    def __post_init__(self) -> None:
        if self.resource not in ("density", "cost"):
            raise UserInputError(f"budget resource must be density or cost, got {self.resource!r}")
        if not 0.0 < self.value <= 1.0:
            raise UserInputError(f"target {self.resource} must lie in (0, 1], got {self.value}")


def allocate(
    heads: list[HeadResult], bucket_weights: np.ndarray, target: BudgetTarget, mean_only: bool
) -> tuple[list[HeadResult], dict]:
    """Re-pick every head's pattern from its front; -> (heads, summary of what was reached).

    bucket_weights [B]: each bucket's share of the sparse steps (sums to 1).
    """
    num_per_bucket = np.bincount([h.bucket for h in heads], minlength=len(bucket_weights))
    # weight of one head in the step-weighted mean over (bucket, head)
    weight = [bucket_weights[h.bucket] / num_per_bucket[h.bucket] for h in heads]

    def resource(entry) -> float:
        return entry.density if target.resource == "density" else entry.cost

    def recall_of(entry) -> float:
        return entry.recall_mean if mean_only else entry.recall_min

    position = [0] * len(heads)
    used = sum(w * resource(h.front[0]) for w, h in zip(weight, heads, strict=True))
    if used > target.value + 1e-12:
        raise UserInputError(
            f"target {target.resource} {target.value} is below the cheapest front points "
            f"({used:.4f}); raise the target"
        )
    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        front, k = heads[i].front, position[i]
        if k + 1 < len(front):
            extra = weight[i] * (resource(front[k + 1]) - resource(front[k]))
            gain = recall_of(front[k + 1]) - recall_of(front[k])
            heapq.heappush(heap, (-gain / max(extra, 1e-15), i))

    for i in range(len(heads)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        front, k = heads[i].front, position[i]
        extra = weight[i] * (resource(front[k + 1]) - resource(front[k]))
        if used + extra > target.value + 1e-12:
            continue  # this head's next step does not fit; cheaper steps of others may
        used += extra
        position[i] = k + 1
        push(i)
    chosen = []
    for head, k in zip(heads, position, strict=True):
        entry = head.front[k]
        chosen.append(
            replace(
                head,
                pattern=entry.pattern,
                recall_mean=entry.recall_mean,
                recall_min=entry.recall_min,
                recall_worst_tile=None,
                density=entry.density,
                cost=entry.cost,
            )
        )
    recalls = [recall_of(h.front[k]) for h, k in zip(heads, position, strict=True)]
    summary = {
        "resource": target.resource,
        "target": target.value,
        "reached": float(used),
        "recall_min_over_heads": float(min(recalls)),
        "recall_mean_over_heads": float(np.mean(recalls)),
    }
    return chosen, summary
