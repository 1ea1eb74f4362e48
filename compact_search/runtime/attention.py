"""The public entry point: `sparse_attention`, argument checks and backend choice."""

from __future__ import annotations

import math

import torch

from compact_search.runtime.reference import chunked_reference, masked_reference

BACKENDS = ("auto", "reference", "triton", "flex")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16)
TRITON_HEAD_DIMS = (64, 128)
# Above this many query x key tokens per head the reference walks query blocks instead of
# building the [N, N] mask.
MASKED_REFERENCE_MAX_PAIRS = 4096 * 4096


def _check_arguments(q, k, v, block_mask, block_size, key_block_lengths) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("block_mask", block_mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have one shape [B, H, N, D]: q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must be fp16, bf16, fp32 or fp64, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device or block_mask.device != q.device:
        raise ValueError(
            f"q, k, v, block_mask must be on one device: q {q.device}, k {k.device}, "
            f"v {v.device}, block_mask {block_mask.device}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be torch.bool, got {block_mask.dtype}")
    b, h, n, _ = q.shape
    nb = math.ceil(n / block_size)
    if (
        block_mask.dim() != 3
        or block_mask.shape[0] not in (1, h)
        or block_mask.shape[1:] != (nb, nb)
    ):
        raise ValueError(
            f"block_mask must be [H or 1, nb, nb] = [{h} or 1, {nb}, {nb}] for N={n}, "
            f"block_size={block_size}; got {tuple(block_mask.shape)}"
        )
    if key_block_lengths is not None:
        if key_block_lengths.shape != (nb,):
            raise ValueError(
                f"key_block_lengths must be [nb] = [{nb}], got {tuple(key_block_lengths.shape)}"
            )
        if key_block_lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"key_block_lengths must be int32, got {key_block_lengths.dtype}")
        if key_block_lengths.device != q.device:
            raise ValueError(
                f"key_block_lengths must be on {q.device}, got {key_block_lengths.device}"
            )


def triton_supports(q: torch.Tensor) -> bool:
    """Whether the Triton kernel runs q's dtype and head dim (any device with a Triton driver)."""
    return q.dtype in TRITON_DTYPES and q.shape[-1] in TRITON_HEAD_DIMS


def choose_backend(q: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    # On CPU the interpreter is far slower than the reference, so auto never picks it there.
    return "triton" if q.is_cuda and triton_supports(q) else "reference"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    backend: str = "auto",
    key_block_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention.

    Args:
        q, k, v: [B, H, N, D], fp16, bf16, fp32 (or fp64 on the reference backend), one device.
        block_mask: bool [H, nb, nb] or [1, nb, nb], nb = ceil(N / block_size): query block i of
            head h attends key block j iff block_mask[h, i, j].
        block_size: tokens per mask block.
        scale: softmax scale, D ** -0.5 when None.
        backend: "reference" (PyTorch), "triton" (the kernel; the Triton interpreter on CPU),
            "flex" (FlexAttention with the same block mask, for comparison and interop), or
            "auto" (the kernel on CUDA when it supports dtype and head dim, else the reference).
        key_block_lengths: optional int32 [nb]: only the first key_block_lengths[j] keys of block
            j are valid (padding of tiled layouts); default all, with the ragged last block.

    Returns:
        [B, H, N, D] in q's dtype; a query with no valid kept key outputs zeros.
    """
    _check_arguments(q, k, v, block_mask, block_size, key_block_lengths)
    chosen = choose_backend(q, backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q.shape[2] == 0:
        return torch.empty_like(q)
    if chosen == "triton":
        from compact_search.runtime.triton_attention import triton_sparse_attention

        run = triton_sparse_attention
    elif chosen == "flex":
        from compact_search.runtime.flex import flex_sparse_attention

        run = flex_sparse_attention
    else:
        n = q.shape[2]
        run = masked_reference if n * n <= MASKED_REFERENCE_MAX_PAIRS else chunked_reference
    if key_block_lengths is not None:
        key_block_lengths = key_block_lengths.to(torch.int32)
    return run(
        q,
        k,
        v,
        block_mask,
        block_size=block_size,
        scale=scale,
        key_block_lengths=key_block_lengths,
    )
