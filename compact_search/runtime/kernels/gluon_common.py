"""What the Gluon Hopper kernels (bf16 ``gluon_hopper``, 8-bit ``gluon_hopper_fp8``) share.

The CTA shape (two consumer warpgroups of 64 query rows, one loader warp per ring, the register
split between them), the loader partition that moves K (or V) tiles of a lookup-table row
through TMA into a ring of shared memory, and the ping-pong turns between the two consumer
warpgroups. Imports no kernel module (``tests/test_runtime_layout.py``).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

__all__ = [
    "GLUON_BLOCK_SIZE",
    "CONSUMER_WARPS",
    "CONSUMER_REGISTERS",
    "LOADER_WARPS",
    "LOADER_REGISTERS",
    "MAX_REGISTERS",
    "loader_partition",
    "take_turn",
    "pass_turn",
    "cta_barriers",
    "load_query_halves",
]

GLUON_BLOCK_SIZE = 128  # mask block = query block of one CTA
CONSUMER_WARPS = gl.constexpr(4)  # one warpgroup: 64 query rows
CONSUMER_REGISTERS = gl.constexpr(240)
LOADER_WARPS = gl.constexpr(1)
LOADER_REGISTERS = gl.constexpr(24)
# Registers per thread the launch asks for: 12 warps (2 consumer warpgroups, the loaders' warps
# rounded up to a warpgroup) x 168 = 64,512 of the SM's 65,536; the default partition gets what
# the workers leave: (168 * 12 - 240 * 4 - 24 * 4) / 4 = 240.
MAX_REGISTERS = 168


@gluon.jit
def loader_partition(
    desc,
    bufs,
    ready,
    empty,
    block_ids_ptr,
    num_tiles,
    batch,
    head,
    ring,
    BLOCK_SIZE: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    KEYS_LAST: gl.constexpr = False,
):
    """One warp: tile ``t`` of the row (K or V) into ring slot ``(ring + t) % STAGES`` through
    TMA, ``ring`` being the tiles earlier rows of the CTA took through it (0 for a CTA of one
    row; the 8-bit kernel's several rows a CTA call this once a row).

    K and V have a loader warp each, so a K tile waits only for its own buffer to drain (its
    Q K^T), never for the P V of an older V tile. ``KEYS_LAST``: the tensor is ``[B, H, D, Np]``
    (the 8-bit kernel's V^T), so a tile starts at column ``k_start`` rather than row.
    """
    TILES_PER_BLOCK: gl.constexpr = BLOCK_SIZE // BLOCK_N
    for tile in range(num_tiles):
        ring_tile = ring + tile
        slot = ring_tile % STAGES
        key_block = gl.load(block_ids_ptr + tile // TILES_PER_BLOCK)
        k_start = key_block * BLOCK_SIZE + (tile % TILES_PER_BLOCK) * BLOCK_N
        # Barriers start in phase 0; "empty" is awaited on the opposite parity, so the first
        # pass through the ring does not wait.
        mbarrier.wait(empty.index(slot), ((ring_tile // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), desc.block_type.nbytes)
        row = 0 if KEYS_LAST else k_start
        column = k_start if KEYS_LAST else 0
        tma.async_copy_global_to_shared(
            desc,
            [batch, head, row, column],
            ready.index(slot),
            bufs.index(slot)._reinterpret(desc.dtype, desc.block_type.shape, desc.layout),
        )


@gluon.jit
def take_turn(turns, turn, WARPGROUP: gl.constexpr, PINGPONG: gl.constexpr):
    """Wait until the other warpgroup has issued its matmuls of the previous turn.

    ``turns[w]`` completes a phase each time the other warpgroup passes the turn to w. Warpgroup
    0 goes first: its turn t waits for phase t - 1 (parity (t & 1) ^ 1, already complete for
    t = 0); warpgroup 1's turn t waits for warpgroup 0's turn t (parity t & 1).
    """
    if PINGPONG:
        if WARPGROUP == 0:
            mbarrier.wait(turns.index(0), (turn & 1) ^ 1)
        else:
            mbarrier.wait(turns.index(1), turn & 1)


@gluon.jit
def pass_turn(turns, WARPGROUP: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turns.index(1 - WARPGROUP), count=1)


@gluon.jit
def cta_barriers(STAGES: gl.constexpr, QUERY_BARRIERS: gl.constexpr = 0):
    """The CTA's barriers, initialized: Q's, each ring slot's ready and empty for K and V, and the
    two ping-pong turns. Returns (q_bar, k_ready, v_ready, k_empty, v_empty, turns).

    ``QUERY_BARRIERS`` 0: one barrier for both halves of Q (``[1]``); 2: one a consumer
    warpgroup, ``[2, 1]``, for a warpgroup that loads its own half (row after row)."""
    if QUERY_BARRIERS == 0:
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
    else:
        q_bar = gl.allocate_shared_memory(gl.int64, [QUERY_BARRIERS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(QUERY_BARRIERS):
            mbarrier.init(q_bar.index(i), count=1)
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        # Both consumer warpgroups release a buffer.
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)
    fence_async_shared()
    return q_bar, k_ready, v_ready, k_empty, v_empty, turns


@gluon.jit
def load_query_halves(q_desc, q_halves, q_bar, batch, head, q_start):
    """Q once, as two 64-row halves (one a consumer warpgroup), before the partitions split."""
    ROWS: gl.constexpr = q_desc.block_type.shape[2]  # the descriptor's box: [1, 1, 64, D]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    for half in gl.static_range(2):
        tma.async_copy_global_to_shared(
            q_desc,
            [batch, head, q_start + half * ROWS, 0],
            q_bar,
            q_halves.index(half)._reinterpret(q_desc.dtype, q_desc.block_type.shape, q_desc.layout),
        )
