"""Inputs and error measures shared by the 8-bit attention tests (CPU and GPU)."""

from __future__ import annotations

import torch

# Channels scaled x20 in q and k for the outlier case (DiT activations have a few such channels).
OUTLIER_CHANNELS = (3, 17, 40, 61)
OUTLIER_FACTOR = 20.0


def attention_inputs(
    kind: str,
    shape: tuple[int, int, int, int],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, H, N, D]``: "gaussian", "outliers" (a few q/k channels scaled x20), or
    "rising" (q x2, keys scaled from 0.5 to 3 along the sequence: rows' maxima keep moving,
    each row at other tiles, so the kernels' accumulator rescale runs in some rows of a tile and
    not in others)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=generator, device=device) for _ in range(3))
    if kind == "outliers":
        channels = torch.tensor(OUTLIER_CHANNELS, device=device) % shape[-1]
        q[..., channels] *= OUTLIER_FACTOR
        k[..., channels] *= OUTLIER_FACTOR
    elif kind == "rising":
        q *= 2.0
        k *= torch.linspace(0.5, 3.0, shape[2], device=device)[:, None]
    elif kind != "gaussian":
        raise ValueError(f"unknown input kind {kind!r}")
    return q.to(dtype), k.to(dtype), v.to(dtype)


def block_mask_with_edge_rows(
    heads: int, num_blocks: int, density: float, *, device: str = "cpu", seed: int = 0
) -> torch.Tensor:
    """bool ``[H, nb, nb]`` at about ``density``; head 0's first row empty, the last row full."""
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    shape = (heads, num_blocks, num_blocks)
    mask = torch.rand(shape, generator=generator, device=device) < density
    mask[-1, -1] = True
    mask[0, 0] = False
    return mask


def padded_key_lengths(
    num_blocks: int, block_size: int, *, device: str = "cpu", seed: int = 0
) -> torch.Tensor:
    """int32 ``[nb]``: random valid-key prefixes, block 1 with none and block 0 full."""
    generator = torch.Generator(device=device).manual_seed(seed + 2)
    lengths = torch.randint(
        1, block_size + 1, (num_blocks,), generator=generator, device=device
    ).to(torch.int32)
    lengths[0] = block_size
    if num_blocks > 2:
        lengths[1] = 0
    return lengths


def cosine_similarity(out: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = out.double().flatten(), expected.double().flatten()
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def relative_l2(out: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = out.double(), expected.double()
    return ((a - b).norm() / b.norm()).item()
