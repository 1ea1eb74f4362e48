"""The paper's greedy shrink baseline, vectorised over heads.

Start dense (every frame group keeps the whole tile grid); repeatedly take the one move, over all
groups, whose recall loss per unit of cost saved is smallest while the recall constraint still
holds: shrink a group's window by one tile in height, or in width, or drop the group (skip those
frame distances; dropping the farthest live group shrinks the temporal window). Stop when no
move keeps recall >= tau. Every group holds one near window, as in the paper.
"""

from __future__ import annotations

import numpy as np

from compact_search.search.offsets import WindowOptions

# Recall comparisons allow this much float error (tables are float64 sums of float32 masses).
RECALL_EPS = 1e-9


def constraint_measure(recall: np.ndarray, mean_over_samples: bool) -> np.ndarray:
    """Per-sample recall [..., S] -> the number the constraint compares with tau: min or mean."""
    return recall.mean(axis=-1) if mean_over_samples else recall.min(axis=-1)


def greedy_shrink(
    recall_sums: np.ndarray,
    cost_sums: np.ndarray,
    options: WindowOptions,
    tau: float,
    mean_over_samples: bool,
) -> np.ndarray:
    """Greedy shrink for every head at once.

    recall_sums [H, S, G, Ht*Wt + 1] and cost_sums [G, Ht*Wt + 1] are group rect sums
    (`group_rect_sums`). Returns [H, G] option indices into `options` (0 = none, else the single
    near window 1 + h * Wt + w).
    """
    num_heads, _, num_groups, _ = recall_sums.shape
    ht, wt, none = options.height, options.width, options.none
    height = np.full((num_heads, num_groups), ht - 1)
    width = np.full((num_heads, num_groups), wt - 1)
    alive = np.ones((num_heads, num_groups), dtype=bool)
    head_idx = np.arange(num_heads)[:, None]
    group_idx = np.arange(num_groups)[None, :]

    def flat(h: np.ndarray, w: np.ndarray, keep: np.ndarray) -> np.ndarray:
        return np.where(keep, h * wt + w, none)

    current = flat(height, width, alive)  # [H, G]
    # Advanced indices around the sample slice put it last: [H, G, S] -> [H, S]
    cur_recall = recall_sums[head_idx, :, group_idx, current].sum(axis=1)
    cur_cost = cost_sums[group_idx, current].sum(axis=1)  # [H]
    active = np.ones(num_heads, dtype=bool)
    while active.any():
        # Moves: [H, G, 3] new flat index for shrink height, shrink width, drop.
        moves = np.stack(
            [
                flat(height - 1, width, alive & (height > 0)),
                flat(height, width - 1, alive & (width > 0)),
                np.full_like(current, none),
            ],
            axis=-1,
        )
        valid = np.stack([alive & (height > 0), alive & (width > 0), alive], axis=-1)
        # recall of each group now vs after the move: [H, G, S] and [H, G, 3, S]
        before = recall_sums[head_idx, :, group_idx, current]
        after = recall_sums[head_idx[..., None], :, group_idx[..., None], moves]
        new_recall = cur_recall[:, None, None, :] - before[:, :, None, :] + after
        saved = cost_sums[group_idx, current][..., None] - cost_sums[group_idx[..., None], moves]
        loss = (before[:, :, None, :] - after).mean(axis=-1)  # [H, G, 3]
        feasible = valid & active[:, None, None] & (saved > 0)
        feasible &= constraint_measure(new_recall, mean_over_samples) >= tau - RECALL_EPS
        score = np.where(feasible, loss / np.where(saved > 0, saved, 1.0), np.inf)
        flat_score = score.reshape(num_heads, -1)
        best = flat_score.argmin(axis=1)  # [H]
        moving = np.isfinite(flat_score[np.arange(num_heads), best])
        active = moving
        if not moving.any():
            break
        rows = np.nonzero(moving)[0]
        g, m = np.divmod(best[rows], 3)
        height[rows, g] -= m == 0
        width[rows, g] -= m == 1
        alive[rows, g] &= m != 2
        cur_recall[rows] = new_recall[rows, g, m]
        cur_cost[rows] -= saved[rows, g, m]
        current = flat(height, width, alive)
    return np.where(alive, 1 + height * wt + width, 0)
