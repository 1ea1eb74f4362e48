"""Hopper block-sparse flash attention written in Gluon (warp-specialized, FA3-style).

Same contract and lookup tables as the portable kernel (``triton_portable.py``, same results):
a Hopper-only fast path for 128-token mask blocks. Gluon exposes what plain Triton decides for
itself on Hopper, and the difference is where the time goes. One CTA computes one 128-row query
block:

- a **K loader warp** and a **V loader warp** walk the row's lookup table and move key/value
  tiles into rings of shared-memory buffers through TMA, each buffer with a "ready" mbarrier;
  the consumers release a buffer on its "empty" mbarrier once their wgmma reads of it are done
  (K and V separately, so a K buffer is refilled as soon as its Q K^T has run);
- **two consumer warpgroups**, each its own partition (so neither waits for the other's
  barrier arrivals), own 64 query rows each and keep the online softmax in registers; the loaders
  give their registers to them (24 per loader thread, 240 per consumer thread);
- **intra-warpgroup overlap**: a consumer issues tile j's Q K^T and tile j-1's P V as
  asynchronous wgmma, waits for Q K^T only and computes tile j's softmax while P V still runs (P
  stays in registers as the A operand);
- optional **ping-pong** (``GluonConfig.pingpong``): the two warpgroups take turns issuing their
  matmuls, FA3's inter-warpgroup schedule. Measured on an H200 it was within a few percent either
  way of letting the warp schedulers interleave them freely (BENCHMARKS.md), so it is off by
  default.

It needs a CUDA device of compute capability 9.x, TMA-compatible q/k/v/o layouts and
``block_size == 128``: ``gluon_supports`` says whether a call qualifies, and the chooser
(``runtime/attention.py``) runs the portable kernel otherwise. Gluon does not run under the
Triton interpreter, so CI compiles this kernel for sm_90 (tests/test_gluon_compile.py) and the
GPU tests check its numbers against the reference.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

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
from compact_search.runtime.kernels.gluon_common import (
    CONSUMER_REGISTERS,
    CONSUMER_WARPS,
    GLUON_BLOCK_SIZE,
    LOADER_REGISTERS,
    LOADER_WARPS,
    MAX_REGISTERS,
    cta_barriers,
    load_query_halves,
    loader_partition,
    pass_turn,
    take_turn,
)
from compact_search.runtime.lut import BlockLUT

__all__ = [
    "gluon_sparse_attention",
    "gluon_lut_attention",
    "gluon_supports",
    "GLUON_BLOCK_SIZE",
    "GluonConfig",
]


class GluonConfig:
    """Key tile (BLOCK_N, a divisor of the mask block), K/V ring depth and the ping-pong switch.

    Shared memory per CTA: Q (128 x D) + 2 rings x stages x BLOCK_N x D, in the input dtype; at
    D = 128, 128-key tiles fit 3 stages at most (224 KB of the 227 KB a CTA may use).
    """

    def __init__(self, block_n: int = 128, stages: int = 2, pingpong: bool = False):
        if GLUON_BLOCK_SIZE % block_n or block_n < 64:
            raise ValueError(f"block_n must divide {GLUON_BLOCK_SIZE} and be >= 64, got {block_n}")
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        self.block_n = block_n
        self.stages = stages
        self.pingpong = pingpong

    def __repr__(self) -> str:
        return (
            f"GluonConfig(block_n={self.block_n}, stages={self.stages}, pingpong={self.pingpong})"
        )


@gluon.jit
def _softmax_step(
    scores,
    row_max,
    row_sum,
    qk_scale,
    key_length,
    tile,
    full_tiles,
    BLOCK_N: gl.constexpr,
    TILES_PER_BLOCK: gl.constexpr,
    s_layout: gl.constexpr,
):
    """Online-softmax update for one ``[BM, BN]`` score tile (fp32, in the wgmma layout).

    Returns unnormalised probabilities, the new row max (log2 units), the new row sum and the
    factor the accumulator must be scaled by before this tile's P V is added.
    """
    if tile >= full_tiles:
        # A block with padded keys: only its first key_length keys are valid (a prefix).
        cols = (tile % TILES_PER_BLOCK) * BLOCK_N + gl.arange(
            0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)
        )  # [BN]
        scores = gl.where(gl.expand_dims(cols < key_length, 0), scores, float("-inf"))
    new_max = gl.maximum(row_max, gl.max(scores, axis=1) * qk_scale)  # [BM]
    probs = gl.exp2(scores * qk_scale - gl.expand_dims(new_max, 1))  # [BM, BN]
    correction = gl.exp2(row_max - new_max)  # [BM]
    row_sum = row_sum * correction + gl.sum(probs, axis=1)
    return probs, new_max, row_sum, correction


@gluon.jit
def _consumer_partition(
    shared,
    WARPGROUP: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_SIZE: gl.constexpr,
    STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    """One warpgroup: 64 query rows of the block, softmax and both matmuls.

    Per key tile j: issue S_j = Q K_j^T and O += P_{j-1} V_{j-1} (asynchronous wgmma), wait for
    S_j only, and compute tile j's softmax while P_{j-1} V_{j-1} runs. With ``PINGPONG`` the two
    warpgroups take turns issuing their matmuls (an mbarrier pair), so one's softmax runs while
    the other's matmuls occupy the tensor cores (FA3's inter-warpgroup schedule).
    """
    q_halves, o_desc, q_bar, turns, rings, row = shared
    k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty = rings
    key_lengths_ptr, block_ids_ptr, num_tiles, full_tiles, batch, head, q_start, qk_scale = row
    ROWS: gl.constexpr = 64
    TILES_PER_BLOCK: gl.constexpr = BLOCK_SIZE // BLOCK_N
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_smem = q_halves.index(WARPGROUP)  # [64, D]
    dtype: gl.constexpr = q_smem.dtype

    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)  # [64, D]
    mbarrier.wait(q_bar, 0)  # also before an empty row reuses q_smem for the output
    if num_tiles > 0:
        row_max = gl.full([ROWS], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        row_sum = gl.zeros([ROWS], gl.float32, layout=gl.SliceLayout(1, s_layout))
        zero_scores = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)  # [64, BN]

        # Prologue: S_0 (turn 0).
        take_turn(turns, 0, WARPGROUP, PINGPONG)
        mbarrier.wait(k_ready.index(0), 0)
        scores_token = warpgroup_mma(
            q_smem, k_bufs.index(0).permute((1, 0)), zero_scores, use_acc=False, is_async=True
        )
        pass_turn(turns, WARPGROUP, PINGPONG)
        scores = warpgroup_mma_wait(0, deps=(scores_token,))
        mbarrier.arrive(k_empty.index(0), count=1)
        key_length = gl.load(key_lengths_ptr + gl.load(block_ids_ptr))
        probs, row_max, row_sum, correction = _softmax_step(
            scores,
            row_max,
            row_sum,
            qk_scale,
            key_length,
            0,
            full_tiles,
            BLOCK_N,
            TILES_PER_BLOCK,
            s_layout,
        )
        p = gl.convert_layout(probs.to(dtype), p_layout)  # [64, BN] as the A operand

        for tile in range(1, num_tiles):
            slot = tile % STAGES
            prev_slot = (tile - 1) % STAGES
            take_turn(turns, tile, WARPGROUP, PINGPONG)
            mbarrier.wait(k_ready.index(slot), (tile // STAGES) & 1)
            scores_token = warpgroup_mma(
                q_smem,
                k_bufs.index(slot).permute((1, 0)),
                zero_scores,
                use_acc=False,
                is_async=True,
            )  # S_j
            mbarrier.wait(v_ready.index(prev_slot), ((tile - 1) // STAGES) & 1)
            acc_token = warpgroup_mma(p, v_bufs.index(prev_slot), acc, is_async=True)
            pass_turn(turns, WARPGROUP, PINGPONG)
            scores = warpgroup_mma_wait(1, deps=(scores_token,))  # S_j; P V may still run
            mbarrier.arrive(k_empty.index(slot), count=1)

            # Softmax of tile j while the tensor cores run P_{j-1} V_{j-1}.
            key_length = gl.load(key_lengths_ptr + gl.load(block_ids_ptr + tile // TILES_PER_BLOCK))
            probs, row_max, row_sum, correction = _softmax_step(
                scores,
                row_max,
                row_sum,
                qk_scale,
                key_length,
                tile,
                full_tiles,
                BLOCK_N,
                TILES_PER_BLOCK,
                s_layout,
            )

            acc, p = warpgroup_mma_wait(0, deps=(acc_token, p))
            mbarrier.arrive(v_empty.index(prev_slot), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(correction, o_rows), 1)
            p = gl.convert_layout(probs.to(dtype), p_layout)

        # Epilogue: the last tile's P V (turn num_tiles).
        last = num_tiles - 1
        take_turn(turns, num_tiles, WARPGROUP, PINGPONG)
        mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
        acc_token = warpgroup_mma(p, v_bufs.index(last % STAGES), acc, is_async=True)
        pass_turn(turns, WARPGROUP, PINGPONG)
        acc, p = warpgroup_mma_wait(0, deps=(acc_token, p))
        mbarrier.arrive(v_empty.index(last % STAGES), count=1)
        # Every row saw at least one valid key (blocks without one are not in the table).
        acc = acc / gl.expand_dims(gl.convert_layout(row_sum, o_rows), 1)

    # Rows past N are clipped by the TMA store; an empty row stores zeros.
    q_smem.store(acc.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(
        o_desc,
        [batch, head, q_start + WARPGROUP * ROWS, 0],
        q_smem._reinterpret(dtype, o_desc.block_type.shape, o_desc.layout),
    )
    tma.store_wait(0)


@gluon.jit
def _gluon_block_sparse_attention_kernel(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    kv_block_ids_ptr,
    full_counts_ptr,
    total_counts_ptr,
    key_lengths_ptr,
    q_block_order_ptr,
    num_heads,
    mask_heads,
    num_blocks,
    lut_width,
    qk_scale,
    seq_len,  # autotuning key only: TMA clips at N by itself
    density_bucket,  # autotuning key only
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    """Grid ``(num_blocks, B * H)``; one CTA = one 128-row query block of one (batch, head).

    Partitions: warpgroup 0 (default, 4 warps) and warpgroup 1 (worker, 4 warps) compute 64 rows
    each; a K loader warp and a V loader warp feed them.
    """
    ROWS: gl.constexpr = 64  # query rows per consumer warpgroup
    BLOCK_SIZE: gl.constexpr = 128
    TILES_PER_BLOCK: gl.constexpr = BLOCK_SIZE // BLOCK_N
    batch_head = gl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    row_index = (head % mask_heads) * num_blocks
    q_block = gl.load(q_block_order_ptr + row_index + gl.program_id(0))
    row_index += q_block
    num_tiles = gl.load(total_counts_ptr + row_index) * TILES_PER_BLOCK
    full_tiles = gl.load(full_counts_ptr + row_index) * TILES_PER_BLOCK
    block_ids_ptr = kv_block_ids_ptr + row_index.to(gl.int64) * lut_width
    q_start = q_block * BLOCK_SIZE

    dtype: gl.constexpr = q_desc.dtype
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_halves = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar, k_ready, v_ready, k_empty, v_empty, turns = cta_barriers(STAGES)
    load_query_halves(q_desc, q_halves, q_bar, batch, head, q_start)

    # What both consumers share: buffers, barriers and the query block's lookup-table row.
    rings = (k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty)
    row = (key_lengths_ptr, block_ids_ptr, num_tiles, full_tiles, batch, head, q_start, qk_scale)
    shared = (q_halves, o_desc, q_bar, turns, rings, row)
    gl.warp_specialize(
        [
            (_consumer_partition, (shared, 0, HEAD_DIM, BLOCK_N, BLOCK_SIZE, STAGES, PINGPONG)),
            (_consumer_partition, (shared, 1, HEAD_DIM, BLOCK_N, BLOCK_SIZE, STAGES, PINGPONG)),
            (
                loader_partition,
                (
                    k_desc,
                    k_bufs,
                    k_ready,
                    k_empty,
                    block_ids_ptr,
                    num_tiles,
                    batch,
                    head,
                    0,  # one row a CTA: its tiles start the ring
                    BLOCK_SIZE,
                    BLOCK_N,
                    STAGES,
                ),
            ),
            (
                loader_partition,
                (
                    v_desc,
                    v_bufs,
                    v_ready,
                    v_empty,
                    block_ids_ptr,
                    num_tiles,
                    batch,
                    head,
                    0,  # one row a CTA: its tiles start the ring
                    BLOCK_SIZE,
                    BLOCK_N,
                    STAGES,
                ),
            ),
        ],
        [CONSUMER_WARPS, LOADER_WARPS, LOADER_WARPS],
        [CONSUMER_REGISTERS, LOADER_REGISTERS, LOADER_REGISTERS],
    )


_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


def gluon_supports(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    *,
    out: torch.Tensor | None = None,
) -> bool:
    """Whether the Gluon kernel runs this call: compiled (not interpreted) on Hopper (9.x),
    128-token blocks, the kernels' dtypes and head dims, TMA layouts of q, k, v (and ``out``)."""
    if interpreting() or not q.is_cuda or block_size != GLUON_BLOCK_SIZE:
        return False
    if unsupported_reason(q) is not None:
        return False
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    tensors = (q, k, v) if out is None else (q, k, v, out)
    return all(tma_layout_ok(t) for t in tensors)


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """Descriptor over ``[B, H, N, D]`` moving ``[1, 1, rows, D]`` boxes (zero past N)."""
    block_shape = [1, 1, rows, t.shape[-1]]
    layout = gl.NVMMASharedLayout.get_default_for(block_shape, _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block_shape, layout)


# What the autotuner times per (N, head dim, density bucket): with and without ping-pong turns,
# each ahead by a few percent at some shape on an H200 (BENCHMARKS.md); 128-key tiles, 2 stages.
# 64-key tiles were 15% slower everywhere and are not candidates.
AUTOTUNE_CONFIGS = [
    triton.Config({"PINGPONG": pingpong}, num_warps=CONSUMER_WARPS.value, maxnreg=MAX_REGISTERS)
    for pingpong in (False, True)
]
_autotuned_kernel = triton.autotune(
    configs=AUTOTUNE_CONFIGS, key=["seq_len", "HEAD_DIM", "density_bucket"]
)(_gluon_block_sparse_attention_kernel)


def autotuned_config() -> str:
    """The config the latest launch used without a ``config`` argument (for benchmark logs)."""
    if not autotune_enabled():
        return repr(GluonConfig())
    config = getattr(_autotuned_kernel, "best_config", None)
    return "not tuned yet" if config is None else str(config)


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lut: BlockLUT,
    *,
    scale: float,
    config: GluonConfig | None = None,
    autotune: bool = True,
) -> torch.Tensor:
    """Run the kernel into ``out`` (all ``[B, H, N, D]``; see :func:`gluon_supports`).

    ``config`` launches that config directly; otherwise the autotuner picks among
    ``AUTOTUNE_CONFIGS`` (``autotune=False``: the default :class:`GluonConfig`).
    """
    batch, heads, seq_len, head_dim = q.shape
    tuned = config is None and autotune
    config = config or GluonConfig()
    grid = (lut.num_blocks, batch * heads)
    args = (
        _descriptor(q, GLUON_BLOCK_SIZE // 2),
        _descriptor(k, config.block_n),
        _descriptor(v, config.block_n),
        _descriptor(out, GLUON_BLOCK_SIZE // 2),
        *lut_tensors(lut),
        heads,
        *lut_sizes(lut),
        scale * LOG2_E,
        seq_len,
        density_bucket(lut),
    )
    if tuned:
        _autotuned_kernel[grid](*args, HEAD_DIM=head_dim, BLOCK_N=config.block_n, STAGES=2)
    else:
        _gluon_block_sparse_attention_kernel[grid](
            *args,
            HEAD_DIM=head_dim,
            BLOCK_N=config.block_n,
            STAGES=config.stages,
            PINGPONG=config.pingpong,
            num_warps=CONSUMER_WARPS.value,
            maxnreg=MAX_REGISTERS,
        )
    return out


def gluon_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = GLUON_BLOCK_SIZE,
    scale: float | None = None,
    key_block_lengths: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: GluonConfig | None = None,
) -> torch.Tensor:
    """Block-sparse attention with the Gluon Hopper kernel.

    Args: as the portable kernel's (``[B, H, N, D]`` q, k, v; bool ``[H or 1, nb, nb]`` mask;
    int32 ``[nb]`` key lengths; an optional output buffer), where :func:`gluon_supports` holds
    (ValueError otherwise). ``config`` launches that :class:`GluonConfig` instead of autotuning.
    """
    lut = mask_lut(q, block_mask, block_size=block_size, key_block_lengths=key_block_lengths)
    return gluon_lut_attention(
        q, k, v, lut, block_size=block_size, scale=scale, out=out, config=config
    )


def gluon_lut_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: BlockLUT,
    *,
    block_size: int = GLUON_BLOCK_SIZE,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: GluonConfig | None = None,
) -> torch.Tensor:
    """:func:`gluon_sparse_attention` from lookup tables built beforehand (``lut.py``), on q's
    device: no table is built or looked up here, so nothing reads a value back to the host."""
    if out is None:
        # q's memory order, as the portable kernel: a token-major caller reads whole rows back.
        out = torch.empty_like(q)
    if not gluon_supports(q, k, v, block_size, out=out):
        raise ValueError(
            "the Gluon kernel needs a compiled (not interpreted) Hopper GPU, block_size 128, "
            "fp16/bf16, head dim 64 or 128 and 16-byte aligned strides"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _launch(q, k, v, out, lut, scale=scale, config=config, autotune=autotune_enabled())
