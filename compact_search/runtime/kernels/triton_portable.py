"""Forward block-sparse flash attention in portable Triton: every GPU, any power-of-two block
size, and the Triton interpreter (CI).

Layers, top to bottom: the ``@triton.jit`` kernel and its helpers (with the autotune configs next
to it) -> ``_launch`` (picks the load path and block sizes, builds descriptors) ->
``portable_sparse_attention`` (validates, builds the lookup tables), which the chooser
(``runtime/attention.py``, backends "triton-portable" and "triton" where the Gluon Hopper kernel
does not run) calls.

One program computes one query block of one (batch, head): it walks the kept key blocks from the
lookup table (``lut.py``), first the blocks whose keys are all valid with no masking, then the ones
holding padded keys with a column mask, keeping an online softmax in fp32. On Hopper K/V (and Q,
O) move through tensor descriptors (TMA); elsewhere, and under the interpreter, through pointers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compact_search.geometry import DEFAULT_BLOCK_SIZE, check_block_size
from compact_search.runtime.kernels.common import (
    LOG2_E,
    autotune_enabled,
    density_bucket,
    interpreting,
    lut_sizes,
    lut_tensors,
    mask_lut,
    tma_layout_ok,
    unsupported_reason,
)
from compact_search.runtime.lut import BlockLUT

__all__ = [
    "portable_sparse_attention",
    "portable_lut_attention",
    "autotuned_config",
    "kernel_config",
]


def _set_descriptor_blocks(nargs: dict) -> None:
    """Config pre-hook: host tensor descriptors take their block shape from the config."""
    if nargs["q_desc"] is None:
        return
    block_m, block_n, head_dim = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"]
    nargs["q_desc"].block_shape = [1, 1, block_m, head_dim]
    nargs["o_desc"].block_shape = [1, 1, block_m, head_dim]
    nargs["k_desc"].block_shape = [1, 1, block_n, head_dim]
    nargs["v_desc"].block_shape = [1, 1, block_n, head_dim]


def kernel_config(
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> triton.Config:
    """A launch config: query/key tile sizes, warps and pipeline stages."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n},
        num_warps=num_warps,
        num_stages=num_stages,
        pre_hook=_set_descriptor_blocks,
    )


# The first fitting config is the one used without autotuning. On an H100 (bf16, d 128, N 32,760)
# these four were within 1-2% of each other at densities 0.08-0.3; 128 x 64 with 4 warps was best
# dense. 64-row query tiles (needed for 64-token mask blocks) were 7-15% slower there.
KERNEL_CONFIGS = [
    kernel_config(128, 64, 4, 3),
    kernel_config(128, 64, 4, 2),
    kernel_config(128, 128, 8, 2),
    kernel_config(128, 128, 8, 3),
    kernel_config(64, 64, 4, 3),
]


def _fitting_configs(block_size: int) -> list[triton.Config]:
    """Configs whose query and key tiles fit in one mask block (at least one)."""
    fitting = [
        c
        for c in KERNEL_CONFIGS
        if c.kwargs["BLOCK_M"] <= block_size and c.kwargs["BLOCK_N"] <= block_size
    ]
    return fitting or [kernel_config(block_size, block_size, 4, 2)]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    return [c for c in configs if c in _fitting_configs(kwargs["BLOCK_SIZE"])] or configs[:1]


@triton.jit
def _load_tile(
    base_ptr,
    desc,
    batch,
    head,
    row_start,
    seq_len,
    stride_n,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Rows ``[row_start, row_start + ROWS)`` of one head -> ``[ROWS, HEAD_DIM]``, zero past N."""
    if USE_TMA:
        tile = desc.load([batch, head, row_start, 0]).reshape(ROWS, HEAD_DIM)
    else:
        rows = row_start + tl.arange(0, ROWS)  # [ROWS]
        cols = tl.arange(0, HEAD_DIM)  # [D]
        tile = tl.load(
            base_ptr + rows[:, None] * stride_n + cols[None, :],
            mask=rows[:, None] < seq_len,
            other=0.0,
        )
    return tile


@triton.jit
def _attend_tile(
    acc,
    row_max,
    row_sum,
    q,
    k,
    v,
    qk_scale,
    col_valid,
    MASK_COLS: tl.constexpr,
):
    """One online-softmax step over a key tile.

    ``row_max`` is kept in log2 units (scores times ``qk_scale``, which folds in log2(e)), so
    exponentials are exp2 of one fused multiply-add.
    """
    scores = tl.dot(q, tl.trans(k))  # [BM, BN] fp32
    if MASK_COLS:
        # Padded keys never win the max: every tile that can be all padding comes after a tile of
        # the same row with a valid key (valid keys are a prefix of each block), so row_max is
        # finite by then and exp2(-inf) is a clean 0.
        scores = tl.where(col_valid[None, :], scores, float("-inf"))
        # A padded key's weight is 0, and 0 * Inf or 0 * NaN in P V is NaN: whatever a padding
        # slot holds must not reach the output.
        v = tl.where(col_valid[:, None], v, tl.zeros_like(v))
    new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)  # [BM]
    probs = tl.math.exp2(scores * qk_scale - new_max[:, None])  # [BM, BN]
    correction = tl.math.exp2(row_max - new_max)  # [BM]
    row_sum = row_sum * correction + tl.sum(probs, 1)
    acc = acc * correction[:, None]  # [BM, D]
    acc = tl.dot(probs.to(v.dtype), v, acc)
    return acc, new_max, row_sum


@triton.jit
def _block_sparse_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    kv_block_ids_ptr,
    full_counts_ptr,
    total_counts_ptr,
    key_lengths_ptr,
    q_block_order_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    num_heads,
    mask_heads,
    num_blocks,
    lut_width,
    seq_len,
    density_bucket,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr,
    COMPUTE_IN_FP32: tl.constexpr,
):
    """Grid ``(num_blocks * BLOCK_SIZE / BLOCK_M, B * H)``; q/k/v/o ``[B, H, N, D]``, unit stride
    along D. Each program takes BLOCK_M query rows of one mask block."""
    # Axis 0 runs fastest, so programs in flight together share one head's K/V in L2.
    SPLITS: tl.constexpr = BLOCK_SIZE // BLOCK_M
    order_slot = tl.program_id(0) // SPLITS
    split = tl.program_id(0) % SPLITS
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    mask_head = head % mask_heads
    row_index = mask_head * num_blocks
    q_block = tl.load(q_block_order_ptr + row_index + order_slot)
    row_index += q_block
    full_count = tl.load(full_counts_ptr + row_index)
    total_count = tl.load(total_counts_ptr + row_index)
    block_ids_ptr = kv_block_ids_ptr + row_index.to(tl.int64) * lut_width

    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    q_start = q_block * BLOCK_SIZE + split * BLOCK_M
    q = _load_tile(
        q_base, q_desc, batch, head, q_start, seq_len, stride_qn, BLOCK_M, HEAD_DIM, USE_TMA
    )  # [BM, D]
    if COMPUTE_IN_FP32:
        q = q.to(tl.float32)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [BM]
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BM]
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # [BM, D]
    col_offsets = tl.arange(0, BLOCK_N)  # [BN]
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_N

    # Key blocks with every key valid: no masking.
    for tile in range(0, full_count * TILES_PER_BLOCK):
        key_block = tl.load(block_ids_ptr + tile // TILES_PER_BLOCK)
        k_start = key_block * BLOCK_SIZE + (tile % TILES_PER_BLOCK) * BLOCK_N
        k = _load_tile(
            k_base, k_desc, batch, head, k_start, seq_len, stride_kn, BLOCK_N, HEAD_DIM, USE_TMA
        )  # [BN, D]
        v = _load_tile(
            v_base, v_desc, batch, head, k_start, seq_len, stride_vn, BLOCK_N, HEAD_DIM, USE_TMA
        )  # [BN, D]
        if COMPUTE_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        acc, row_max, row_sum = _attend_tile(
            acc, row_max, row_sum, q, k, v, qk_scale, col_offsets, MASK_COLS=False
        )

    # Key blocks holding padded keys (tile padding, the ragged last block): mask by length.
    for tile in range(full_count * TILES_PER_BLOCK, total_count * TILES_PER_BLOCK):
        key_block = tl.load(block_ids_ptr + tile // TILES_PER_BLOCK)
        key_length = tl.load(key_lengths_ptr + key_block)
        tile_offset = (tile % TILES_PER_BLOCK) * BLOCK_N
        k_start = key_block * BLOCK_SIZE + tile_offset
        k = _load_tile(
            k_base, k_desc, batch, head, k_start, seq_len, stride_kn, BLOCK_N, HEAD_DIM, USE_TMA
        )  # [BN, D]
        v = _load_tile(
            v_base, v_desc, batch, head, k_start, seq_len, stride_vn, BLOCK_N, HEAD_DIM, USE_TMA
        )  # [BN, D]
        if COMPUTE_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        col_valid = tile_offset + col_offsets < key_length  # [BN]
        acc, row_max, row_sum = _attend_tile(
            acc, row_max, row_sum, q, k, v, qk_scale, col_valid, MASK_COLS=True
        )

    # A row with no kept key block has row_sum 0 and acc 0: it outputs zeros.
    row_sum = tl.where(row_sum > 0.0, row_sum, 1.0)
    out = (acc / row_sum[:, None]).to(o_ptr.dtype.element_ty)  # [BM, D]
    if USE_TMA:
        o_desc.store([batch, head, q_start, 0], out.reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        rows = q_start + tl.arange(0, BLOCK_M)  # [BM]
        cols = tl.arange(0, HEAD_DIM)  # [D]
        o_base = o_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        tl.store(
            o_base + rows[:, None] * stride_on + cols[None, :], out, mask=rows[:, None] < seq_len
        )


_autotuned_kernel = triton.autotune(
    configs=KERNEL_CONFIGS,
    key=["seq_len", "HEAD_DIM", "density_bucket"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_block_sparse_attention_kernel)


def _tma_available(*tensors: torch.Tensor) -> bool:
    """Hopper or newer, compiled (not interpreted), and descriptor-compatible layouts."""
    if interpreting() or not tensors[0].is_cuda:
        return False
    if torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(tma_layout_ok(t) for t in tensors)


def _descriptor(t: torch.Tensor):
    """Host tensor descriptor over ``[B, H, N, D]``; the pre-hook sets the block shape."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, h, n, d = t.shape
    return TensorDescriptor(t, [b, h, n, d], list(t.stride()), [1, 1, 8, d])


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lut: BlockLUT,
    *,
    block_size: int,
    scale: float,
    use_tma: bool | None = None,
    config: triton.Config | None = None,
) -> None:
    batch, heads, seq_len, head_dim = q.shape
    if use_tma is None:
        use_tma = _tma_available(q, k, v, out)
    descs = [_descriptor(t) for t in (q, k, v, out)] if use_tma else [None] * 4

    def grid(meta: dict) -> tuple[int, int]:
        return (lut.num_blocks * (block_size // meta["BLOCK_M"]), batch * heads)

    if config is None and autotune_enabled():
        kernel, config_args = _autotuned_kernel, {}
    else:
        # The autotuner would time even a single config: launch one directly.
        config = config or _fitting_configs(block_size)[0]
        kernel = _block_sparse_attention_kernel
        config_args = {
            **config.kwargs,
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
        }
        if use_tma:
            names = ("q_desc", "k_desc", "v_desc", "o_desc")
            _set_descriptor_blocks(
                {**dict(zip(names, descs, strict=True)), **config.kwargs, "HEAD_DIM": head_dim}
            )
    kernel[grid](
        q,
        k,
        v,
        out,
        *descs,
        *lut_tensors(lut),
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        heads,
        *lut_sizes(lut),
        seq_len,
        density_bucket(lut),
        scale * LOG2_E,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        USE_TMA=use_tma,
        COMPUTE_IN_FP32=interpreting(),
        **config_args,
    )


def autotuned_config() -> str:
    """The config the autotuner picked for the latest launch (for benchmark logs)."""
    config = getattr(_autotuned_kernel, "best_config", None)
    return "untuned (first config)" if config is None else str(config)


def portable_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale: float | None = None,
    key_block_lengths: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    use_tma: bool | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Block-sparse attention with the portable Triton kernel.

    Args:
        q, k, v: ``[B, H, N, D]``, float16 or bfloat16, D in (64, 128), unit stride along D
            (ValueError otherwise: the chooser sends other inputs to the reference).
        block_mask: bool ``[H or 1, nb, nb]``, ``nb = ceil(N / block_size)``; query block i of
            head h attends key block j iff ``block_mask[h, i, j]``.
        block_size: tokens per mask block, a power of two >= 16 (also the kernel's query tile).
        scale: softmax scale; default ``D ** -0.5``.
        key_block_lengths: int32 ``[nb]`` valid keys per key block (a prefix of each block),
            shared by all heads; default: every block full but the ragged last one.
        out: optional ``[B, H, N, D]`` output buffer of q's dtype (tests pass a NaN-filled one).
        use_tma: force tensor-descriptor loads on or off; default: on where available.
        config: launch this :func:`kernel_config` instead of autotuning (tuning sweeps).

    Returns:
        ``[B, H, N, D]`` in q's dtype (``out`` when given); rows with no valid kept key are zeros.
    """
    lut = mask_lut(q, block_mask, block_size=block_size, key_block_lengths=key_block_lengths)
    return portable_lut_attention(
        q, k, v, lut, block_size=block_size, scale=scale, out=out, use_tma=use_tma, config=config
    )


def portable_lut_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: BlockLUT,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    use_tma: bool | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """:func:`portable_sparse_attention` from lookup tables built beforehand (``lut.py``), on q's
    device: no table is built or looked up here, so nothing reads a value back to the host."""
    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"the portable kernel cannot run {reason}")
    check_block_size(block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if out is None:
        # q's memory order (e.g. token-major [B, N, H, D] storage seen as [B, H, N, D]), so a
        # caller that gathers the output back along N reads whole rows.
        out = torch.empty_like(q)
    _launch(q, k, v, out, lut, block_size=block_size, scale=scale, use_tma=use_tma, config=config)
    return out
