"""Dense attention that also returns its softmax normaliser, so the tile mass can skip a pass.

The profiler must return the model's own dense attention output anyway; cuDNN (and FlashAttention)
compute the per-query log-sum-exp on the way and hand it back for free. Feeding it to the tile
mass kernel leaves only one extra pass over q and k (see ``triton_tile_mass.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _fused_with_log_sum_exp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cuDNN, then FlashAttention; None where neither takes these inputs."""
    try:
        result = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale
        )
        return result[0], result[1]
    except RuntimeError:
        pass
    try:
        result = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale
        )
        return result[0], result[1]
    except RuntimeError:
        return None


def dense_attention_with_log_sum_exp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA output [B, H, N, D] and log-sum-exp [B, H, N] fp32 (natural log of the scaled scores).

    The log-sum-exp is None where no fused kernel returns it (CPU, fp32 inputs, odd head dims):
    callers then compute it themselves.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        fused = _fused_with_log_sum_exp(q, k, v, scale)
        if fused is not None:
            out, lse = fused
            b, h, n, _ = q.shape
            # cuDNN may return [B, H, N, 1] or a padded N; keep [B, H, N].
            return out, lse.reshape(b, h, -1)[:, :, :n].float()
    return F.scaled_dot_product_attention(q, k, v, scale=scale), None
