"""What the kernels share: the inputs the Triton kernels take, log2(e), the interpreter and
autotuning switches, the TMA layout rule, the lookup-table launch arguments, and the two helpers
that keep non-finite keys and values of masked-out blocks out of the PyTorch backends' results.

Plain facts and small functions, no kernel and no triton import. The kernel modules next to this
one never import each other; they, the chooser (``runtime/attention.py``) and the profiling
kernels read these from here.
"""

from __future__ import annotations

import os

import torch

from compact_search.runtime.lut import BlockLUT, cached_block_lut

# Inputs the attention kernels (portable and Gluon) take; other ones run the reference.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128)
# exp(x) = exp2(x * LOG2_E): kernels fold it into the softmax scale and work in log2 units.
LOG2_E = 1.4426950408889634
# Set to "0" to run the first config only (the tests do; the interpreter always does).
AUTOTUNE_ENV = "COMPACT_SEARCH_AUTOTUNE"


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1, set before triton loads)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """Autotune unless interpreting (one config is enough there) or switched off."""
    return not interpreting() and os.environ.get(AUTOTUNE_ENV, "1") != "0"


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the attention kernels cannot take q's head dim or dtype, or None when they can."""
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"head dim {q.shape[-1]} (kernel supports {KERNEL_HEAD_DIMS})"
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (kernel supports float16 and bfloat16)"
    return None


def tma_layout_ok(t: torch.Tensor) -> bool:
    """A tensor descriptor can address ``t``: 16-byte aligned base and strides, unit stride last."""
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])


def lut_tensors(lut: BlockLUT) -> tuple[torch.Tensor, ...]:
    """The five tables in the order both kernels take them."""
    return (lut.kv_block_ids, lut.full_counts, lut.total_counts, lut.key_lengths, lut.q_block_order)


def lut_sizes(lut: BlockLUT) -> tuple[int, int, int]:
    """(mask heads, blocks, table width): how a kernel indexes the tables."""
    return (lut.mask_heads, lut.num_blocks, lut.kv_block_ids.shape[-1])


def density_bucket(lut: BlockLUT) -> int:
    """The autotuning key's density part: 0-4 in steps of a quarter."""
    return round(lut.density * 4)


def nonfinite_keys(*tensors: torch.Tensor) -> torch.Tensor:
    """bool ``[N]``: key positions where any of the ``[B, H, N, D]`` tensors holds Inf or NaN in
    some batch or head.

    A sum over D is non-finite exactly then, or when finite values overflow fp32; such a key only
    takes the slower exact path. Costs one ``[B, H, N]`` reduction per tensor, no ``[.., D]`` mask.
    """
    bad = None
    for t in tensors:
        row_bad = ~torch.isfinite(t.sum(-1, dtype=torch.float32)).flatten(0, 1).all(dim=0)
        bad = row_bad if bad is None else bad | row_bad
    return bad


def masked_value_terms(
    probs: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """``[B, H, N, D]``: sum over keys j of ``probs[..., j] * values[:, :, j]`` where
    ``allowed[..., j]`` only.

    A matmul would multiply a non-finite value by the zero weight of a row that does not attend
    its key (0 * Inf is NaN); here those products are dropped. probs ``[B, H, N, J]``, values
    ``[B, H, J, D]``, allowed bool broadcastable to ``[B, H, N, J]``; J is small (the keys that
    `nonfinite_keys` found).
    """
    terms = probs.unsqueeze(-1) * values.unsqueeze(2)  # [B, H, N, J, D]
    return torch.where(allowed.unsqueeze(-1), terms, torch.zeros((), dtype=terms.dtype)).sum(-2)


def mask_lut(
    q: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int,
    key_block_lengths: torch.Tensor | None,
) -> BlockLUT:
    """The lookup tables of ``block_mask`` for q's length, on q's device (cached per mask): what
    each Triton kernel's mask entry point hands its tables entry point."""
    return cached_block_lut(
        block_mask,
        seq_len=q.shape[2],
        block_size=block_size,
        key_block_lengths=key_block_lengths,
        device=q.device,
    )
