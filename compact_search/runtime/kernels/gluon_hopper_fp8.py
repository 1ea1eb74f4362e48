"""Hopper 8-bit block-sparse attention in Gluon: INT8 Q K^T, FP8 e4m3 P V, warp-specialized.

The schedule of the bf16 kernel (``gluon_hopper``; the pieces they share are in
``gluon_common``): one CTA per 128-row query block, a K loader warp and a V loader warp moving
tiles through TMA into rings of shared memory, two consumer warpgroups of 64 rows as separate
partitions, each issuing tile j's ``S_j = Q8 K8_j^T`` and tile j-1's ``P_{j-1} V8_{j-1}`` as
asynchronous wgmma and computing tile j's softmax while the latter runs (optional ping-pong
turns between the warpgroups). What the 8-bit operands change:

- Q and K are INT8 (``m64n128k32.s32.s8.s8``): the scores arrive as exact int32 and become
  fp32 with one integer add (``MAGIC_I2F``: ``2^23 + 2^22 + S`` read as a float, exact for
  ``|S| < 2^22``, which D <= 128 guarantees; the bias is folded into the row's softmax offset)
  rather than the slower ``cvt`` (the switch exists so a GPU run can compare them);
- each score is scaled by ``q_scale_i * k_scale_j * scale * log2(e) / D`` inside the fused
  multiply-add of the online softmax; P is ``448 * exp2(s - m)``, rounded to e4m3 four values to
  a register and fed as the wgmma A operand (``m64nDk32.f32.e4m3.e4m3``), V^T (``[B, H, D, Np]``,
  laid out by the pre-pass) as its K-major B operand;
- P never leaves its thread (``PERMUTED_KEYS``, default): the accumulator layout of Q K^T and
  the A-operand layout of the 8-bit P V give a thread different keys, so the pre-pass stores V's
  keys in the order that makes them agree (``quantize.wgmma_key_order``; a sum over keys does
  not care about their order) and P goes from the scores to the tensor cores without a shuffle,
  repack or trip through shared memory. P is carried to the next tile's issue in fp32 and
  rounded there, in the block that issues its wgmma (8-bit values carried across the loop were
  repacked byte by byte: ~3 integer instructions a score);
- ``MMA_ROW_SUM`` (on by default): the tile's row sums come from the tensor cores, a fourth
  wgmma of the same P registers, ``P ones^T`` (``m64n8k32``, the ``[8, 128]`` ones tile in
  shared memory, row 0 ones), into a ``[64, 8]`` accumulator whose column 0 is the sum; the
  running sums are kept in that layout, ``l = (l + rowsum(P_{j-1})) * correction_j`` like the
  output accumulator, and reduced over the 8 columns once in the epilogue. It replaces the
  FADD tree of 64 scores a thread and tile (and its 4 shuffles) on the CUDA cores, which are
  what bounds the loop, with 1/16 of P V's tensor-core work, which is not; the sums are of the
  rounded P that P V multiplies (the emulation's ``sum_rounded_p``);
- ``TWO_LEVEL`` (off by default): each tile's P V starts from a zero accumulator and is added to
  the fp32 output accumulator with the rescale, ``acc = (acc + pv) * correction``, against the
  FP8 wgmma's reduced-precision accumulation; measured, it changes the error by < 1% of itself
  (BENCHMARKS.md) and its second accumulator spills registers, so P V accumulates in place as in
  the bf16 kernel;
- ``LOOKAHEAD`` (off by default): a tile issues P_{j-1} V_{j-1} and S_{j+1} before its
  softmax, so both matmuls of the warpgroup overlap it, not only P V (FlashAttention-3's
  intra-warpgroup overlap); S_{j+1} is waited for at the end of the tile, as ptxas serializes
  the kernel's wgmma if a score tile stays in flight across the loop's back edge (and registers
  allow the overlap only in the loop over full tiles); launched only under ptxas >= 12.9
  (``LOOKAHEAD_MIN_PTXAS``: 12.8 miscompiles it);
- ``LAZY_RESCALE`` (on by default): a thread branches over its accumulator rescale (D / 2
  multiplies on the path from one P V to the next) when neither of its rows' max moved, which
  after a row's first tiles is most tiles; only multiplies by exactly 1 are skipped, so the
  output is the eager rescale's bit for bit (``RESCALE_THRESHOLD`` > 0 would let a max lag, with
  P scaled down to stay in e4m3: supported, measured no faster, less accurate);
- V in two e4m3 terms (``QuantizedQKV.v_terms`` 2, V^T ``[B, H, 2 D, Np]``): each V tile's TMA
  box carries both, and a second P V wgmma of the same P registers adds the second term into the
  same accumulator;
- the epilogue applies V's per-channel scale and mean, ``out = acc / l * v_scale + v_mean``, and
  stores through a separate shared-memory tile in the output dtype.

Needs a Hopper GPU (9.x) and block size 128; ``runtime/attention.py`` chooses it. Gluon does not
run under the interpreter: CI compiles it for sm_90 (tests/test_fp8_gluon_compile.py) and
tests/test_fp8_kernel_gpu.py checks its numbers on a GPU.
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
    tma_layout_ok,
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
from compact_search.runtime.quantize import (
    LOG2_INT8_P_SCALE_C,
    LOG2_P_SCALE_C,
    RESCALE_THRESHOLD,
    ROUNDING_MAGIC_C,
    QuantizedQKV,
    quantize_qkv,
    runtime_v_terms,
)

__all__ = [
    "gluon_fp8_attention",
    "gluon_fp8_lut_attention",
    "gluon_fp8_supports",
    "GluonFP8Config",
    "AUTOTUNE_CONFIGS",
]

# The bits of 2^23 + 2^22 as an fp32: int32 x + these bits, read as fp32, is 12582912 + x.
MAGIC_BITS = gl.constexpr(0x4B400000)
# The bits of 1.0 in e4m3 (sign 0, exponent 7 = the bias, mantissa 0).
E4M3_ONE = gl.constexpr(0x38)


class GluonFP8Config:
    """Launch options: ring depth, ping-pong turns, two-level accumulation, int -> float path,
    the key order of V (``permuted_keys``: the pre-pass writes V in the order that lets P stay
    in its registers; the launcher quantizes to match), the row reductions' order and the
    ``lookahead`` schedule (S_{j+1} issued before tile j's softmax; without ping-pong turns or
    two-level accumulation), the ``lazy_rescale`` branch (a thread multiplies its accumulator
    rows only in tiles where their max moved) and the ``rescale_threshold`` a tile's max must
    pass a row's max by to move it (log2 units; ``quantize.RESCALE_THRESHOLD``, which the
    emulation and the portable kernel use, unless a probe asks for another), and
    ``mma_row_sum``: each tile's row sums of the rounded P by a wgmma against a ones tile rather
    than an FADD tree (on unless ``lookahead``, which keeps the tree), and ``rows_per_cta``:
    query blocks a CTA computes one after the other (1-8; not with the lookahead), so the next
    block's Q and first K/V tiles load during the current one's last tiles and epilogue, and a
    CTA's launch and set-up are paid once for all of them. Measured on the H200 (BENCHMARKS.md):
    it cuts the fixed cost a block from 5.1 to 3.4 us (4 rows) but costs 6% more a tile, so it
    is off; ``benchmarks.bench_cta_cost`` separates the two.

    Shared memory per CTA at D = 128: Q 16 KB + 2 rings x stages x 16 KB + the output tile 32 KB
    (bf16), so 2 stages take 112 KB and 4 stages 176 KB of the 227 KB a CTA may use; V in two
    terms doubles the V ring (2 stages: 144 KB); the row sum's ones tile takes 1 KB.
    """

    def __init__(
        self,
        stages: int = 2,
        pingpong: bool = False,
        two_level: bool = False,
        magic_i2f: bool = True,
        permuted_keys: bool = True,
        tree_rows: bool = True,
        lookahead: bool = False,
        lazy_rescale: bool = True,
        rescale_threshold: float = RESCALE_THRESHOLD,
        mma_row_sum: bool | None = None,
        rows_per_cta: int = 1,
    ):
        if not 1 <= stages <= 4:
            raise ValueError(f"stages must be 1-4, got {stages}")
        if lookahead and (pingpong or two_level):
            raise ValueError("lookahead runs without ping-pong turns and two-level accumulation")
        if mma_row_sum is None:
            mma_row_sum = not lookahead
        if lookahead and mma_row_sum:
            raise ValueError("lookahead sums P's rows on the CUDA cores: it has no mma_row_sum")
        if lookahead and stages < 2:
            raise ValueError("lookahead holds two K tiles at once: it needs stages >= 2")
        if not 1 <= rows_per_cta <= 8:
            raise ValueError(f"rows_per_cta must be 1-8, got {rows_per_cta}")
        if lookahead and rows_per_cta > 1:
            raise ValueError("lookahead runs one row a CTA: it has no rows_per_cta")
        if not 0.0 <= rescale_threshold <= 8.0:
            raise ValueError(f"rescale_threshold must be 0-8 (log2 units), got {rescale_threshold}")
        self.stages = stages
        self.pingpong = pingpong
        self.two_level = two_level
        self.magic_i2f = magic_i2f
        self.permuted_keys = permuted_keys
        self.tree_rows = tree_rows
        self.lookahead = lookahead
        self.lazy_rescale = lazy_rescale
        self.rescale_threshold = float(rescale_threshold)
        self.mma_row_sum = mma_row_sum
        self.rows_per_cta = rows_per_cta

    def kwargs(self) -> dict:
        return {
            "STAGES": self.stages,
            "PINGPONG": self.pingpong,
            "TWO_LEVEL": self.two_level,
            "MAGIC_I2F": self.magic_i2f,
            "PERMUTED_KEYS": self.permuted_keys,
            "TREE_ROWS": self.tree_rows,
            "LOOKAHEAD": self.lookahead,
            "LAZY_RESCALE": self.lazy_rescale,
            "RESCALE_THRESHOLD": self.rescale_threshold,
            "MMA_ROW_SUM": self.mma_row_sum,
            "ROWS_PER_CTA": self.rows_per_cta,
        }

    def __repr__(self) -> str:
        return (
            f"GluonFP8Config(stages={self.stages}, pingpong={self.pingpong}, "
            f"two_level={self.two_level}, magic_i2f={self.magic_i2f}, "
            f"permuted_keys={self.permuted_keys}, tree_rows={self.tree_rows}, "
            f"lookahead={self.lookahead}, lazy_rescale={self.lazy_rescale}, "
            f"rescale_threshold={self.rescale_threshold:g}, mma_row_sum={self.mma_row_sum}, "
            f"rows_per_cta={self.rows_per_cta})"
        )


@gluon.jit
def _softmax_step(
    scores,
    row_max,
    row_sum,
    row_scale,
    key_length,
    s_layout: gl.constexpr,
    MASKED: gl.constexpr,
    MAGIC_I2F: gl.constexpr,
    TREE_ROWS: gl.constexpr,
    THRESHOLD: gl.constexpr,
    SUM_ROWS: gl.constexpr = True,
):
    """Online-softmax update for one ``[64, 128]`` int32 score tile (the wgmma layout).

    ``row_scale`` ``[64]`` turns integer scores into log2 units. Returns P
    (``448 * 2^-THRESHOLD * exp2(s - m)``, fp32), the new row max, the new row sum and the
    accumulator's rescale factor. A row's max m moves only to a tile max above
    ``m + THRESHOLD``; where it stays, the factor is exactly 1 (``_rescaled`` skips it).

    ``MAGIC_I2F``: the int32 scores become fp32 by one integer add, ``2^23 + 2^22 + S`` read as a
    float (exact for ``|S| < 2^22``, which D <= 128 guarantees), and the bias is not subtracted
    from each score but folded into the row's offset: ``(S + B) r - (m - log2 448 + B r)``, one
    fused multiply-add a score as before. The folded offset is rounded once, a per-row shift of
    at most ulp(B r) / 2 in log2 units (B r is a few times the row's largest possible score),
    common to the tile's P and its row sum.

    ``SUM_ROWS`` off (``MMA_ROW_SUM``): ``row_sum`` is returned as it came, the caller sums P's
    rows on the tensor cores (``_issue_pv``) and applies the factor itself.
    """
    if MAGIC_I2F:
        scores = (scores + MAGIC_BITS).to(gl.float32, bitcast=True)  # [64, 128], B + S
        bias: gl.constexpr = ROUNDING_MAGIC_C
    else:
        scores = scores.to(gl.float32)
        bias: gl.constexpr = 0.0
    if MASKED:
        # A block with padded keys: only its first key_length keys are valid (a prefix).
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, s_layout))  # [128]
        scores = gl.where(gl.expand_dims(cols < key_length, 0), scores, float("-inf"))
    # row_scale > 0, so the max of the scaled scores is the scaled max; max - B is exact.
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    tile_max = (_row_reduce(scores, rows_layout, TREE_ROWS, True) - bias) * row_scale  # [64]
    if THRESHOLD == 0.0:
        new_max = gl.maximum(row_max, tile_max)  # [64], the same values in fewer instructions
    else:
        new_max = gl.where(tile_max > row_max + THRESHOLD, tile_max, row_max)  # [64]
    offset = new_max - (LOG2_P_SCALE_C - THRESHOLD) + bias * row_scale  # [64]
    probs = gl.exp2(scores * gl.expand_dims(row_scale, 1) - gl.expand_dims(offset, 1))
    correction = gl.exp2(row_max - new_max)  # [64]
    if SUM_ROWS:
        row_sum = row_sum * correction + _row_reduce(probs, rows_layout, TREE_ROWS, False)
    return probs, new_max, row_sum, correction


@gluon.jit
def _row_reduce(x, rows_layout: gl.constexpr, TREE_ROWS: gl.constexpr, MAX: gl.constexpr):
    """Max (``MAX``) or sum over the 128 columns of ``[64, 128]`` in the accumulator layout.

    A thread holds 32 columns of each of its 2 rows; reduced in order, that is a chain of 31
    dependent instructions a row on the path from S to P. ``TREE_ROWS`` first combines the four
    32-column quarters (whose index lives in the thread's registers) elementwise, 8 independent
    chains of 3, then the 8 left: a chain of ~10 for the same instruction count.
    """
    if TREE_ROWS:
        quarters = gl.reshape(x, [64, 4, 32])  # column = 32 quarter + r
        if MAX:
            total = gl.max(gl.max(quarters, axis=1), axis=1)  # [64, 32] first, then [64]
        else:
            total = gl.sum(gl.sum(quarters, axis=1), axis=1)
        return gl.convert_layout(total, rows_layout)
    if MAX:
        return gl.max(x, axis=1)
    return gl.sum(x, axis=1)


@gluon.jit
def _pv_operand(probs, p_layout: gl.constexpr, PERMUTED_KEYS: gl.constexpr):
    """P ``[64, 128]`` fp32 in the accumulator layout of Q K^T -> fp32 in the layout of P V's A
    operand (``_issue_pv`` rounds it to e4m3 as it issues the wgmma).

    A thread holds score columns ``8 i + 2 c + {0, 1}`` (``c`` its lane mod 4, ``i`` the n8 chunk)
    and the 8-bit A operand wants ``4 c + {0..3}`` (and ``16 + 4 c + {0..3}``) of each 32 keys.
    ``PERMUTED_KEYS``: the pre-pass stored V's keys in the order that makes a thread's own scores
    its operand bytes (``quantize.wgmma_key_order``), so P's columns are relabelled here,
    ``32 h + 16 j4 + 8 j3 + 4 j2 + 2 j1 + j0 -> 32 h + 16 j4 + 8 j2 + 4 j1 + 2 j3 + j0``, and the
    conversion only renames registers. Off, it moves P between the lanes of a quad.
    """
    if PERMUTED_KEYS:
        probs = gl.reshape(probs, [64, 4, 2, 2, 2, 2, 2])  # (row, h, j4, j3, j2, j1, j0)
        probs = gl.permute(probs, [0, 1, 2, 4, 5, 3, 6])  # (row, h, j4, j2, j1, j3, j0)
        probs = gl.reshape(probs, [64, 128])
    return gl.convert_layout(probs, p_layout)


@gluon.jit
def _to_e4m3_packed(x):
    """fp32 -> e4m3 (nearest even, saturating), four values into one 32-bit register.

    The operand layout keeps 4 consecutive keys in a thread's consecutive registers: written as
    one register they are the bytes the wgmma reads, with no repacking (the generic cast
    converts pairs, then unpacks and repacks their bytes: ~3 integer instructions a pair).
    """
    return gl.inline_asm_elementwise(
        """
        {
        .reg .b16 lo, hi;
        cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;
        cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;
        mov.b32 $0, {lo, hi};
        }
        """,
        "=r,r,r,r,r",
        [x],
        dtype=gl.float8e4nv,
        is_pure=True,
        pack=4,
    )


def _rescale_asm(pack: int) -> tuple[str, str]:
    """PTX and constraints of ``_rescaled`` for a thread's ``pack`` accumulator values.

    Operands: ``$0..`` the outputs, tied to the inputs that follow (``$pack..``: a skipped value
    stays in its register), then the row factors (``$2 pack..``). A thread holds two rows of the
    accumulator, and its value 0 is in one and value 2 in the other (register bases ``[0, 1]``,
    ``[8, 0]``; tests/test_fp8_gluon_compile.py checks in the PTX that the two factors tested
    are different registers), so testing those two factors covers both rows (testing all of
    them costs a compare each: ptxas does not merge the repeats). ``setp.neu`` counts NaN as
    moved, so the result is ``acc * factor`` bit for bit either way.
    """
    factors = 2 * pack
    products = "\n".join(f"mul.f32 ${i}, ${pack + i}, ${factors + i};" for i in range(pack))
    asm = f"""
        {{
        .reg .pred moved, moved_high;
        setp.neu.f32 moved, ${factors}, 0f3F800000;
        setp.neu.f32 moved_high, ${factors + 2}, 0f3F800000;
        or.pred moved, moved, moved_high;
        @!moved bra SKIP;
        {products}
        SKIP:
        }}
        """
    constraints = ",".join(["=f"] * pack + [str(i) for i in range(pack)] + ["f"] * pack)
    return asm, constraints


# A consumer thread holds 64 (D 128) or 32 (D 64) accumulator values: one asm block for all.
RESCALE_ASM_D128, RESCALE_CONSTRAINTS_D128 = (gl.constexpr(x) for x in _rescale_asm(64))
RESCALE_ASM_D64, RESCALE_CONSTRAINTS_D64 = (gl.constexpr(x) for x in _rescale_asm(32))


@gluon.jit
def _rescaled(acc, factor):
    """``acc * factor`` (``[64, D]`` by ``[64, 1]``), the multiplies branched over in a thread
    whose two rows' factors are both 1 (their max did not move: most tiles of a row, once its
    first few have set it). One branch a tile instead of D / 2 multiplies on the path from a
    P V product to the next one's issue; a warp runs them if any of its threads must."""
    if acc.type.shape[1] == 128:
        return gl.inline_asm_elementwise(
            RESCALE_ASM_D128, RESCALE_CONSTRAINTS_D128, [acc, factor], gl.float32, True, 64
        )
    else:
        return gl.inline_asm_elementwise(
            RESCALE_ASM_D64, RESCALE_CONSTRAINTS_D64, [acc, factor], gl.float32, True, 32
        )


@gluon.jit
def _tile_scale(row, tile, q_scale):
    """Tile ``tile``'s key block: ``[64]`` factor from int scores to log2 units, its length."""
    key_lengths_ptr, block_ids_ptr, k_scale_ptr, qk_scale = row
    key_block = gl.load(block_ids_ptr + tile)
    row_scale = q_scale * (gl.load(k_scale_ptr + key_block) * qk_scale)
    return row_scale, gl.load(key_lengths_ptr + key_block)


@gluon.jit
def _merged_sums(row_sum, tile_sums, correction):
    """``(l + rowsum(P)) * correction`` for the ``[64, 8]`` row sums of ``MMA_ROW_SUM``."""
    sums_rows: gl.constexpr = gl.SliceLayout(1, tile_sums.type.layout)
    factor = gl.expand_dims(gl.convert_layout(correction, sums_rows), 1)  # [64, 1]
    return (row_sum + tile_sums) * factor


@gluon.jit
def _issue_pv(
    p,
    v_bufs,
    v_ready,
    tile,
    acc,
    zero_pv,
    sums,
    STAGES: gl.constexpr,
    TWO_LEVEL: gl.constexpr,
    MMA_ROW_SUM: gl.constexpr,
):
    """Issue P_tile V_tile (asynchronous; ``tile`` counts the CTA's ring, over all its rows):
    into a zero accumulator, or into ``acc``. Returns the P V token and, with ``MMA_ROW_SUM``,
    the row-sum token (else 0).

    With V in two e4m3 terms (the ring's tiles are ``[2 D, 128]``), a second wgmma of the same P
    registers adds P V_low into the same accumulator: two commit groups, the caller's waits
    count ``V_TERMS`` of them. ``MMA_ROW_SUM``: ``sums`` is (the ``[8, 128]`` ones tile, a zero
    ``[64, 8]`` accumulator), and a last wgmma of the same registers, ``P ones^T`` (``m64n8k32``),
    sums the tile's rows of the rounded P into column 0: one more commit group.
    """
    HEAD_DIM: gl.constexpr = zero_pv.type.shape[1]
    V_TERMS: gl.constexpr = v_bufs.shape[1] // HEAD_DIM
    slot = tile % STAGES
    mbarrier.wait(v_ready.index(slot), (tile // STAGES) & 1)
    v_tiles = v_bufs.index(slot)  # [V_TERMS * D, 128]
    v_tile = v_tiles.slice(0, HEAD_DIM).permute((1, 0))  # [128, D], keys contiguous: K-major
    # Rounded here, in the block that issues the wgmma: packed registers go straight in.
    p8 = _to_e4m3_packed(p)  # [64, 128] e4m3
    if TWO_LEVEL:
        token = warpgroup_mma(p8, v_tile, zero_pv, use_acc=False, is_async=True)
    else:
        token = warpgroup_mma(p8, v_tile, acc, is_async=True)
    if V_TERMS == 2:
        v_low = v_tiles.slice(HEAD_DIM, HEAD_DIM).permute((1, 0))  # [128, D]
        token = warpgroup_mma(p8, v_low, token, is_async=True)
    if MMA_ROW_SUM:
        ones, zero_sums = sums
        # [64, 128] x [128, 8] (K-major: the ones tile's rows are its columns) -> [64, 8]
        ones_t = ones.permute((1, 0))  # [128, 8]
        sums_token = warpgroup_mma(p8, ones_t, zero_sums, use_acc=False, is_async=True)
    else:
        sums_token = 0
    return token, sums_token


@gluon.jit
def _key_tile(
    state,
    tile,
    turn_offset,
    operands,
    row,
    q_scale,
    WARPGROUP: gl.constexpr,
    STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
    TWO_LEVEL: gl.constexpr,
    MAGIC_I2F: gl.constexpr,
    PERMUTED_KEYS: gl.constexpr,
    TREE_ROWS: gl.constexpr,
    LAZY_RESCALE: gl.constexpr,
    THRESHOLD: gl.constexpr,
    MMA_ROW_SUM: gl.constexpr,
    MASKED: gl.constexpr,
):
    """Key tile j >= 1: issue S_j and P_{j-1} V_{j-1}, softmax j while the latter runs, merge.

    ``state`` is (acc, P_{j-1} in fp32 in the A operand's layout, row max, row sum); returns the
    same for j. With ``MMA_ROW_SUM`` the row sum is ``[64, 8]`` (column 0 holds it, the others
    stay 0) and merges like the accumulator: ``(l + rowsum(P_{j-1})) * correction_j``.
    ``tile`` counts the CTA's ring over all its rows (``row``'s table pointer is shifted to
    match), and the tile's ping-pong turn is ``turn_offset + tile``.
    """
    acc, p, row_max, row_sum = state
    q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turns, zeros = operands
    zero_scores, zero_pv, sums = zeros
    s_layout: gl.constexpr = zero_scores.type.layout
    o_layout: gl.constexpr = zero_pv.type.layout
    p_layout: gl.constexpr = p.type.layout
    # Commit groups issued after S_j: V's e4m3 terms, and the row sum's.
    PV_GROUPS: gl.constexpr = v_bufs.shape[1] // zero_pv.type.shape[1] + MMA_ROW_SUM
    slot = tile % STAGES
    previous_slot = (tile - 1) % STAGES
    take_turn(turns, turn_offset + tile, WARPGROUP, PINGPONG)
    mbarrier.wait(k_ready.index(slot), (tile // STAGES) & 1)
    scores_token = warpgroup_mma(
        q_smem, k_bufs.index(slot).permute((1, 0)), zero_scores, use_acc=False, is_async=True
    )  # S_j
    pv_token, sums_token = _issue_pv(
        p, v_bufs, v_ready, tile - 1, acc, zero_pv, sums, STAGES, TWO_LEVEL, MMA_ROW_SUM
    )
    pass_turn(turns, WARPGROUP, PINGPONG)
    row_scale, key_length = _tile_scale(row, tile, q_scale)
    # P is not a dependency of the waits: the wgmma reads the e4m3 registers _issue_pv made for
    # it alone, which nothing writes again.
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    if MASKED:
        # Tiles of padded blocks (a few per row at most) wait for P V before their softmax:
        # the column mask's indices need the registers a P V sum in flight would hold.
        if MMA_ROW_SUM:
            scores, pv, tile_sums = warpgroup_mma_wait(0, deps=(scores_token, pv_token, sums_token))
        else:
            scores, pv = warpgroup_mma_wait(0, deps=(scores_token, pv_token))
        mbarrier.arrive(k_empty.index(slot), count=1)
        mbarrier.arrive(v_empty.index(previous_slot), count=1)
        acc = acc + pv if TWO_LEVEL else pv
        probs, row_max, row_sum, correction = _softmax_step(
            scores,
            row_max,
            row_sum,
            row_scale,
            key_length,
            s_layout,
            True,
            MAGIC_I2F,
            TREE_ROWS,
            THRESHOLD,
            not MMA_ROW_SUM,
        )
        acc = acc * gl.expand_dims(gl.convert_layout(correction, o_rows), 1)
        if MMA_ROW_SUM:
            row_sum = _merged_sums(row_sum, tile_sums, correction)
    else:
        # S_j; P V (PV_GROUPS commit groups, issued after it) may still run.
        scores = warpgroup_mma_wait(PV_GROUPS, deps=(scores_token,))
        mbarrier.arrive(k_empty.index(slot), count=1)
        # Softmax of tile j while the tensor cores run P_{j-1} V_{j-1}.
        probs, row_max, row_sum, correction = _softmax_step(
            scores,
            row_max,
            row_sum,
            row_scale,
            key_length,
            s_layout,
            False,
            MAGIC_I2F,
            TREE_ROWS,
            THRESHOLD,
            not MMA_ROW_SUM,
        )
        if MMA_ROW_SUM:
            pv, tile_sums = warpgroup_mma_wait(0, deps=(pv_token, sums_token))
            row_sum = _merged_sums(row_sum, tile_sums, correction)
        else:
            pv = warpgroup_mma_wait(0, deps=(pv_token,))
        mbarrier.arrive(v_empty.index(previous_slot), count=1)
        scale_rows = gl.expand_dims(gl.convert_layout(correction, o_rows), 1)
        if TWO_LEVEL:
            acc = (acc + pv) * scale_rows
        elif LAZY_RESCALE:
            acc = _rescaled(pv, scale_rows)
        else:
            acc = pv * scale_rows
    p = _pv_operand(probs, p_layout, PERMUTED_KEYS)
    return acc, p, row_max, row_sum


@gluon.jit
def _issue_scores(q_smem, k_bufs, k_ready, tile, zero_scores, STAGES: gl.constexpr):
    """Issue S_tile = Q8 K8_tile^T (asynchronous) once K_tile has landed."""
    slot = tile % STAGES
    mbarrier.wait(k_ready.index(slot), (tile // STAGES) & 1)
    return warpgroup_mma(
        q_smem, k_bufs.index(slot).permute((1, 0)), zero_scores, use_acc=False, is_async=True
    )


@gluon.jit
def _first_scores(
    operands,
    tile_row,
    q_scale,
    ring,
    turn_base,
    WARPGROUP: gl.constexpr,
    STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    """A row's first score tile S_0 (its turn ``turn_base``), waited for: (the int32 scores
    ``[64, 128]``, the tile's factor to log2 units, its key length)."""
    q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turns, zeros = operands
    take_turn(turns, turn_base, WARPGROUP, PINGPONG)
    mbarrier.wait(k_ready.index(ring % STAGES), (ring // STAGES) & 1)
    scores_token = warpgroup_mma(
        q_smem,
        k_bufs.index(ring % STAGES).permute((1, 0)),
        zeros[0],
        use_acc=False,
        is_async=True,
    )
    pass_turn(turns, WARPGROUP, PINGPONG)
    row_scale, key_length = _tile_scale(tile_row, 0, q_scale)
    scores = warpgroup_mma_wait(0, deps=(scores_token,))
    mbarrier.arrive(k_empty.index(ring % STAGES), count=1)
    return scores, row_scale, key_length


@gluon.jit
def _paired_tiles(
    acc,
    row_max,
    row_sum,
    operands,
    tile_row,
    q_scale,
    num_tiles,
    full_tiles,
    counters,
    WARPGROUP: gl.constexpr,
    STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
    TWO_LEVEL: gl.constexpr,
    MAGIC_I2F: gl.constexpr,
    PERMUTED_KEYS: gl.constexpr,
    TREE_ROWS: gl.constexpr,
    LAZY_RESCALE: gl.constexpr,
    THRESHOLD: gl.constexpr,
    MMA_ROW_SUM: gl.constexpr,
):
    """Every key tile of a row (``num_tiles >= 1``) in the default schedule (``_key_tile``: S_j
    issued with P_{j-1} V_{j-1}), then the last P V; returns the unnormalized output
    accumulator, the row max and the row sum. ``counters``: the ring tiles and the turns the
    CTA's earlier rows took; this row takes ``num_tiles`` more of each and one turn more. Its
    loops run over ring tiles, the table pointer shifted to match, so a tile's ring slot and
    phase cost what they cost with one row a CTA."""
    q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turns, zeros = operands
    zero_scores, zero_pv, sums = zeros
    s_layout: gl.constexpr = zero_scores.type.layout
    p_layout: gl.constexpr = gl.DotOperandLayout(
        operand_index=0, parent=zero_pv.type.layout, k_width=4
    )
    ring, turn_base = counters
    key_lengths_ptr, block_ids_ptr, k_scale_ptr, qk_scale = tile_row
    ring_row = (key_lengths_ptr, block_ids_ptr - ring, k_scale_ptr, qk_scale)  # by ring tile
    turn_offset = turn_base - ring
    # Prologue: S_0 (turn 0).
    scores, row_scale, key_length = _first_scores(
        operands, tile_row, q_scale, ring, turn_base, WARPGROUP, STAGES, PINGPONG
    )
    if full_tiles > 0:
        probs, row_max, row_sum, correction = _softmax_step(
            scores,
            row_max,
            row_sum,
            row_scale,
            key_length,
            s_layout,
            False,
            MAGIC_I2F,
            TREE_ROWS,
            THRESHOLD,
            not MMA_ROW_SUM,
        )
    else:
        probs, row_max, row_sum, correction = _softmax_step(
            scores,
            row_max,
            row_sum,
            row_scale,
            key_length,
            s_layout,
            True,
            MAGIC_I2F,
            TREE_ROWS,
            THRESHOLD,
            not MMA_ROW_SUM,
        )
    p = _pv_operand(probs, p_layout, PERMUTED_KEYS)  # [64, 128] fp32, A operand layout
    state = (acc, p, row_max, row_sum)

    for tile in range(ring + 1, ring + full_tiles):
        state = _key_tile(
            state,
            tile,
            turn_offset,
            operands,
            ring_row,
            q_scale,
            WARPGROUP,
            STAGES,
            PINGPONG,
            TWO_LEVEL,
            MAGIC_I2F,
            PERMUTED_KEYS,
            TREE_ROWS,
            LAZY_RESCALE,
            THRESHOLD,
            MMA_ROW_SUM,
            False,
        )
    for tile in range(ring + gl.maximum(full_tiles, 1), ring + num_tiles):
        state = _key_tile(
            state,
            tile,
            turn_offset,
            operands,
            ring_row,
            q_scale,
            WARPGROUP,
            STAGES,
            PINGPONG,
            TWO_LEVEL,
            MAGIC_I2F,
            PERMUTED_KEYS,
            TREE_ROWS,
            LAZY_RESCALE,
            THRESHOLD,
            MMA_ROW_SUM,
            True,
        )
    acc, p, row_max, row_sum = state

    # Epilogue: the last tile's P V (turn num_tiles).
    last = ring + num_tiles - 1
    take_turn(turns, turn_base + num_tiles, WARPGROUP, PINGPONG)
    pv_token, sums_token = _issue_pv(
        p, v_bufs, v_ready, last, acc, zero_pv, sums, STAGES, TWO_LEVEL, MMA_ROW_SUM
    )
    pass_turn(turns, WARPGROUP, PINGPONG)
    if MMA_ROW_SUM:
        pv, tile_sums = warpgroup_mma_wait(0, deps=(pv_token, sums_token))
        row_sum = row_sum + tile_sums
    else:
        pv = warpgroup_mma_wait(0, deps=(pv_token,))
    mbarrier.arrive(v_empty.index(last % STAGES), count=1)
    acc = acc + pv if TWO_LEVEL else pv
    return acc, row_max, row_sum


# --- INT8 P V (QuantizedQKV.v_format "int8") ---------------------------------------------------
#
# P V in INT8 (``m64nDk32.s32.s8.s8``, A from registers), V^T int8 per channel. P is rounded
# against each tile's own row max t, ``round(127 exp2(s - t))``, not the running max m: a tile
# whose max sits below the row's would otherwise use a fraction of the INT8 range (on Gaussian
# scores P against m costs 5.0e-2 of relative error, against t 1.6e-2; e4m3 P and V 3.6e-2).
# The int32 product of one tile (|x| <= 127 * 127 * 128 < 2^22) joins the fp32 accumulator with
# its weight exp2(t - m'): ``acc = acc exp2(m - m') + pv exp2(t - m')``, the int -> float by the
# integer add of MAGIC_I2F and its bias taken out in the same fused multiply-adds. So the
# accumulator is a second set of registers beside the wgmma's (as in two-level accumulation),
# and every tile pays an integer add and two FFMA per accumulator value, where the FP8 path's
# lazy rescale skips its multiplies in most tiles. The row sums come from the tensor cores
# (``P ones^T``, int32), exact sums of the rounded P.


@gluon.jit
def _int8_softmax_step(
    scores,
    row_max,
    row_scale,
    key_length,
    s_layout: gl.constexpr,
    MASKED: gl.constexpr,
    TREE_ROWS: gl.constexpr,
):
    """INT8 P V's online-softmax update for one ``[64, 128]`` int32 score tile.

    Returns P (``127 exp2(s - t)``, fp32 in ``[0, 127]``, t the tile's row max; rounded as it is
    packed), the new running max ``m' = max(m, t)``, the accumulator's factor ``exp2(m - m')``
    and the tile's weight ``exp2(t - m')``. The scores become fp32 and the bias folds into the
    offset as in ``_softmax_step`` (``MAGIC_I2F``). A row's largest P is 127 to within a few
    ulps of the folded offset, far from the 127.5 that would round it out of INT8.
    """
    scores = (scores + MAGIC_BITS).to(gl.float32, bitcast=True)  # [64, 128], B + S
    if MASKED:
        # A block with padded keys: only its first key_length keys are valid (a prefix).
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, s_layout))  # [128]
        scores = gl.where(gl.expand_dims(cols < key_length, 0), scores, float("-inf"))
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    tile_max = (_row_reduce(scores, rows_layout, TREE_ROWS, True) - ROUNDING_MAGIC_C) * row_scale
    new_max = gl.maximum(row_max, tile_max)  # [64]
    offset = tile_max - LOG2_INT8_P_SCALE_C + ROUNDING_MAGIC_C * row_scale  # [64]
    probs = gl.exp2(scores * gl.expand_dims(row_scale, 1) - gl.expand_dims(offset, 1))
    correction = gl.exp2(row_max - new_max)  # [64]
    weight = gl.exp2(tile_max - new_max)  # [64]
    return probs, new_max, correction, weight


@gluon.jit
def _to_s8_packed(x):
    """fp32 integers-to-be in ``[0, 127]`` -> int8 (nearest even), four into one register.

    Adding ``2^23 + 2^22`` rounds to an integer in the low bits (the MAGIC_I2F bias read the
    other way), and three byte permutes gather the four low bytes in key order: the operand
    bytes of the INT8 wgmma, with no conversion instruction (those share the exp2 unit's rate).
    """
    return gl.inline_asm_elementwise(
        """
        {
        .reg .b32 a, b, c, d, lo, hi;
        add.rn.f32 a, $1, 0f4B400000;
        add.rn.f32 b, $2, 0f4B400000;
        add.rn.f32 c, $3, 0f4B400000;
        add.rn.f32 d, $4, 0f4B400000;
        prmt.b32 lo, a, b, 0x0040;
        prmt.b32 hi, c, d, 0x0040;
        prmt.b32 $0, lo, hi, 0x5410;
        }
        """,
        "=r,r,r,r,r",
        [x],
        dtype=gl.int8,
        is_pure=True,
        pack=4,
    )


@gluon.jit
def _issue_int8_pv(p, v_bufs, v_ready, tile, zero_pv, sums, STAGES: gl.constexpr):
    """Issue P_tile V_tile in INT8 into a zero int32 accumulator, then ``P ones^T`` (its row
    sums, int32 ``[64, 8]``, column 0), from the same packed registers: two commit groups.
    Returns both tokens."""
    slot = tile % STAGES
    mbarrier.wait(v_ready.index(slot), (tile // STAGES) & 1)
    v_tile = v_bufs.index(slot).permute((1, 0))  # [128, D] int8, keys contiguous: K-major
    p8 = _to_s8_packed(p)  # [64, 128] int8
    token = warpgroup_mma(p8, v_tile, zero_pv, use_acc=False, is_async=True)
    ones, zero_sums = sums
    sums_token = warpgroup_mma(p8, ones.permute((1, 0)), zero_sums, use_acc=False, is_async=True)
    return token, sums_token


@gluon.jit
def _int8_merged(acc, row_sum, pv, tile_sums, weight):
    """A tile's int32 P V ``[64, D]`` and row sums ``[64, 8]`` into the fp32 running sums with
    its weight ``w`` ``[64]`` (relative to the running max they are kept at): ``acc + pv w`` and
    ``l + rowsum w``, as the emulation and the portable kernel write it: ``pv`` converts exactly
    (``|pv| < 2^22``) by one conversion instruction (sm_90's ``I2FP.F32.S32``), then one fused
    multiply-add, rounded once. The magic-number conversion the scores use leaves a bias to take
    out, ``(B + pv) w + (acc - B w)``: a third instruction a value (main loop 745 instructions a
    tile against 681; tests/test_fp8_gluon_compile.py)."""
    o_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    sums_rows: gl.constexpr = gl.SliceLayout(1, row_sum.type.layout)
    share = gl.expand_dims(gl.convert_layout(weight, o_rows), 1)  # [64, 1]
    acc = gl.fma(pv.to(gl.float32), share, acc)
    sums_share = gl.expand_dims(gl.convert_layout(weight, sums_rows), 1)  # [64, 1]
    row_sum = row_sum + tile_sums.to(gl.float32) * sums_share
    return acc, row_sum


@gluon.jit
def _int8_key_tile(
    state,
    tile,
    turn_offset,
    operands,
    row,
    q_scale,
    WARPGROUP: gl.constexpr,
    STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
    PERMUTED_KEYS: gl.constexpr,
    TREE_ROWS: gl.constexpr,
    MASKED: gl.constexpr,
):
    """``_key_tile`` for INT8 P V: issue P_{j-1} V_{j-1} (with its row sums) and S_j, merge the
    former with its weight while S_j runs, then softmax j and the rescale to its max. ``state``
    is (acc and row sums ``[64, 8]`` at the running max of tile j-1, P_{j-1} in fp32 in the A
    operand's layout, row max, tile j-1's weight)."""
    acc, p, row_max, row_sum, weight = state
    q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turns, zeros = operands
    zero_scores, zero_pv, sums = zeros
    s_layout: gl.constexpr = zero_scores.type.layout
    p_layout: gl.constexpr = p.type.layout
    slot = tile % STAGES
    previous_slot = (tile - 1) % STAGES
    take_turn(turns, turn_offset + tile, WARPGROUP, PINGPONG)
    # P_{j-1} V_{j-1} and its row sums first, then S_j: the merge of the former overlaps the
    # latter. (Issued the other way round, as the FP8 path does so that P V overlaps the
    # softmax, the int32 product, the fp32 accumulator and the score tile are live at once with
    # P's registers, more than a consumer thread has: ptxas spills.)
    pv_token, sums_token = _issue_int8_pv(p, v_bufs, v_ready, tile - 1, zero_pv, sums, STAGES)
    mbarrier.wait(k_ready.index(slot), (tile // STAGES) & 1)
    scores_token = warpgroup_mma(
        q_smem, k_bufs.index(slot).permute((1, 0)), zero_scores, use_acc=False, is_async=True
    )  # S_j
    pass_turn(turns, WARPGROUP, PINGPONG)
    row_scale, key_length = _tile_scale(row, tile, q_scale)
    pv, tile_sums = warpgroup_mma_wait(1, deps=(pv_token, sums_token))  # S_j may still run
    mbarrier.arrive(v_empty.index(previous_slot), count=1)
    acc, row_sum = _int8_merged(acc, row_sum, pv, tile_sums, weight)  # at the max of j - 1
    scores = warpgroup_mma_wait(0, deps=(scores_token,))
    mbarrier.arrive(k_empty.index(slot), count=1)
    probs, row_max, correction, next_weight = _int8_softmax_step(
        scores, row_max, row_scale, key_length, s_layout, MASKED, TREE_ROWS
    )
    # To tile j's max: the lazy rescale's branch, as the FP8 path (a factor of 1 in most tiles).
    o_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    acc = _rescaled(acc, gl.expand_dims(gl.convert_layout(correction, o_rows), 1))
    sums_rows: gl.constexpr = gl.SliceLayout(1, row_sum.type.layout)
    row_sum = row_sum * gl.expand_dims(gl.convert_layout(correction, sums_rows), 1)
    p = _pv_operand(probs, p_layout, PERMUTED_KEYS)
    return acc, p, row_max, row_sum, next_weight


@gluon.jit
def _int8_paired_tiles(
    acc,
    row_max,
    row_sum,
    operands,
    tile_row,
    q_scale,
    num_tiles,
    full_tiles,
    counters,
    WARPGROUP: gl.constexpr,
    STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
    PERMUTED_KEYS: gl.constexpr,
    TREE_ROWS: gl.constexpr,
):
    """``_paired_tiles`` for INT8 P V: every key tile of a row (``num_tiles >= 1``), then the
    last P V; returns the unnormalized output accumulator, the row max and the ``[64, 8]`` row
    sums (column 0)."""
    q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turns, zeros = operands
    zero_scores, zero_pv, sums = zeros
    s_layout: gl.constexpr = zero_scores.type.layout
    p_layout: gl.constexpr = gl.DotOperandLayout(
        operand_index=0, parent=zero_pv.type.layout, k_width=4
    )
    ring, turn_base = counters
    key_lengths_ptr, block_ids_ptr, k_scale_ptr, qk_scale = tile_row
    ring_row = (key_lengths_ptr, block_ids_ptr - ring, k_scale_ptr, qk_scale)  # by ring tile
    turn_offset = turn_base - ring
    # Prologue: S_0 (turn 0); the accumulator is zero, so tile 0's factor does not matter.
    scores, row_scale, key_length = _first_scores(
        operands, tile_row, q_scale, ring, turn_base, WARPGROUP, STAGES, PINGPONG
    )
    if full_tiles > 0:
        probs, row_max, _, weight = _int8_softmax_step(
            scores, row_max, row_scale, key_length, s_layout, False, TREE_ROWS
        )
    else:
        probs, row_max, _, weight = _int8_softmax_step(
            scores, row_max, row_scale, key_length, s_layout, True, TREE_ROWS
        )
    p = _pv_operand(probs, p_layout, PERMUTED_KEYS)  # [64, 128] fp32, A operand layout
    state = (acc, p, row_max, row_sum, weight)

    for tile in range(ring + 1, ring + full_tiles):
        state = _int8_key_tile(
            state,
            tile,
            turn_offset,
            operands,
            ring_row,
            q_scale,
            WARPGROUP,
            STAGES,
            PINGPONG,
            PERMUTED_KEYS,
            TREE_ROWS,
            False,
        )
    for tile in range(ring + gl.maximum(full_tiles, 1), ring + num_tiles):
        state = _int8_key_tile(
            state,
            tile,
            turn_offset,
            operands,
            ring_row,
            q_scale,
            WARPGROUP,
            STAGES,
            PINGPONG,
            PERMUTED_KEYS,
            TREE_ROWS,
            True,
        )
    acc, p, row_max, row_sum, weight = state

    # Epilogue: the last tile's P V (turn num_tiles), merged with a factor of 1.
    last = ring + num_tiles - 1
    take_turn(turns, turn_base + num_tiles, WARPGROUP, PINGPONG)
    pv_token, sums_token = _issue_int8_pv(p, v_bufs, v_ready, last, zero_pv, sums, STAGES)
    pass_turn(turns, WARPGROUP, PINGPONG)
    pv, tile_sums = warpgroup_mma_wait(0, deps=(pv_token, sums_token))
    mbarrier.arrive(v_empty.index(last % STAGES), count=1)
    acc, row_sum = _int8_merged(acc, row_sum, pv, tile_sums, weight)
    return acc, row_max, row_sum


@gluon.jit
def _ahead_tile(
    state,
    tile,
    operands,
    row,
    q_scale,
    STAGES: gl.constexpr,
    MAGIC_I2F: gl.constexpr,
    PERMUTED_KEYS: gl.constexpr,
    TREE_ROWS: gl.constexpr,
    THRESHOLD: gl.constexpr,
    FIRST: gl.constexpr,
    LAST: gl.constexpr,
    MASKED: gl.constexpr,
):
    """Key tile j of the ``LOOKAHEAD`` schedule: issue P_{j-1} V_{j-1} and S_{j+1}, softmax j
    while the tensor cores run both, rescale, wait for S_{j+1}.

    ``state`` is (acc, S_j, P_{j-1} in fp32 in the A operand's layout (unused when ``FIRST``),
    row max, row sum), all complete; the same is returned for j + 1 (without S when ``LAST``).
    Nothing is left in flight across the loop's back edge or a branch, and only the tiles of the
    loop over full blocks issue S_{j+1} before their softmax: elsewhere ptxas finds a non-wgmma
    read it cannot prove safe, or runs short of registers, and then serializes every wgmma of
    the kernel (tests/test_fp8_gluon_compile.py checks the main loop for it). The first tile has
    no P V before it; ``MASKED`` tiles (padded blocks, a few per row at most) wait for
    P_{j-1} V_{j-1} before their softmax, as the column mask's indices need the registers a
    matmul in flight would hold.
    """
    acc, scores, p, row_max, row_sum = state
    q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, _turns, zeros = operands
    zero_scores, zero_pv, _no_sums = zeros  # the lookahead sums rows on the CUDA cores
    s_layout: gl.constexpr = zero_scores.type.layout
    o_layout: gl.constexpr = zero_pv.type.layout
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    AHEAD: gl.constexpr = not (FIRST or LAST or MASKED)
    if not FIRST:
        pv, _ = _issue_pv(p, v_bufs, v_ready, tile - 1, acc, zero_pv, 0, STAGES, False, False)
    if AHEAD:
        next_scores = _issue_scores(q_smem, k_bufs, k_ready, tile + 1, zero_scores, STAGES)
    row_scale, key_length = _tile_scale(row, tile, q_scale)
    if MASKED and not FIRST:
        acc = warpgroup_mma_wait(0, deps=(pv,))
    probs, row_max, row_sum, correction = _softmax_step(
        scores,
        row_max,
        row_sum,
        row_scale,
        key_length,
        s_layout,
        MASKED,
        MAGIC_I2F,
        TREE_ROWS,
        THRESHOLD,
    )
    if not MASKED and not FIRST:
        # In flight, oldest first: P_{j-1} V_{j-1}, S_{j+1}: retire the first.
        acc = warpgroup_mma_wait(1 if AHEAD else 0, deps=(pv,))
    if not FIRST:
        mbarrier.arrive(v_empty.index((tile - 1) % STAGES), count=1)
    acc = acc * gl.expand_dims(gl.convert_layout(correction, o_rows), 1)
    p = _pv_operand(probs, p_layout, PERMUTED_KEYS)
    if LAST:
        return acc, p, row_max, row_sum
    else:
        if not AHEAD:
            next_scores = _issue_scores(q_smem, k_bufs, k_ready, tile + 1, zero_scores, STAGES)
        next_scores = warpgroup_mma_wait(0, deps=(next_scores,))
        mbarrier.arrive(k_empty.index((tile + 1) % STAGES), count=1)
        return acc, next_scores, p, row_max, row_sum


@gluon.jit
def _ahead_tiles(
    acc,
    row_max,
    row_sum,
    operands,
    row,
    q_scale,
    num_tiles,
    full_tiles,
    STAGES: gl.constexpr,
    MAGIC_I2F: gl.constexpr,
    PERMUTED_KEYS: gl.constexpr,
    TREE_ROWS: gl.constexpr,
    THRESHOLD: gl.constexpr,
):
    """Every key tile of a row (``num_tiles >= 1``) in the ``LOOKAHEAD`` schedule, then the last
    P V; returns the unnormalized output accumulator, the row max and the row sum.

    Full tiles come first, padded ones after them. The first tile (no P V before it) and the
    last (no S after it) are their own inlined copies, full or padded.
    """
    q_smem, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, _turns, zeros = operands
    zero_scores, zero_pv, _no_sums = zeros
    p_layout: gl.constexpr = gl.DotOperandLayout(
        operand_index=0, parent=zero_pv.type.layout, k_width=4
    )
    scores = _issue_scores(q_smem, k_bufs, k_ready, 0, zero_scores, STAGES)
    scores = warpgroup_mma_wait(0, deps=(scores,))
    mbarrier.arrive(k_empty.index(0), count=1)
    no_p = gl.zeros([64, 128], gl.float32, layout=p_layout)  # the first tile has no P before it
    state = (acc, scores, no_p, row_max, row_sum)
    last = num_tiles - 1
    if last > 0:
        if full_tiles > 0:
            state = _ahead_tile(
                state,
                0,
                operands,
                row,
                q_scale,
                STAGES,
                MAGIC_I2F,
                PERMUTED_KEYS,
                TREE_ROWS,
                THRESHOLD,
                True,
                False,
                False,
            )
        else:
            state = _ahead_tile(
                state,
                0,
                operands,
                row,
                q_scale,
                STAGES,
                MAGIC_I2F,
                PERMUTED_KEYS,
                TREE_ROWS,
                THRESHOLD,
                True,
                False,
                True,
            )
        for tile in range(1, gl.minimum(full_tiles, last)):
            state = _ahead_tile(
                state,
                tile,
                operands,
                row,
                q_scale,
                STAGES,
                MAGIC_I2F,
                PERMUTED_KEYS,
                TREE_ROWS,
                THRESHOLD,
                False,
                False,
                False,
            )
        for tile in range(gl.maximum(full_tiles, 1), last):
            state = _ahead_tile(
                state,
                tile,
                operands,
                row,
                q_scale,
                STAGES,
                MAGIC_I2F,
                PERMUTED_KEYS,
                TREE_ROWS,
                THRESHOLD,
                False,
                False,
                True,
            )
        if last < full_tiles:
            acc, p, row_max, row_sum = _ahead_tile(
                state,
                last,
                operands,
                row,
                q_scale,
                STAGES,
                MAGIC_I2F,
                PERMUTED_KEYS,
                TREE_ROWS,
                THRESHOLD,
                False,
                True,
                False,
            )
        else:
            acc, p, row_max, row_sum = _ahead_tile(
                state,
                last,
                operands,
                row,
                q_scale,
                STAGES,
                MAGIC_I2F,
                PERMUTED_KEYS,
                TREE_ROWS,
                THRESHOLD,
                False,
                True,
                True,
            )
    else:
        if full_tiles > 0:
            acc, p, row_max, row_sum = _ahead_tile(
                state,
                0,
                operands,
                row,
                q_scale,
                STAGES,
                MAGIC_I2F,
                PERMUTED_KEYS,
                TREE_ROWS,
                THRESHOLD,
                True,
                True,
                False,
            )
        else:
            acc, p, row_max, row_sum = _ahead_tile(
                state,
                0,
                operands,
                row,
                q_scale,
                STAGES,
                MAGIC_I2F,
                PERMUTED_KEYS,
                TREE_ROWS,
                THRESHOLD,
                True,
                True,
                True,
            )
    pv, _ = _issue_pv(p, v_bufs, v_ready, last, acc, zero_pv, 0, STAGES, False, False)
    acc = warpgroup_mma_wait(0, deps=(pv,))
    mbarrier.arrive(v_empty.index(last % STAGES), count=1)
    return acc, row_max, row_sum


@gluon.jit
def _normalized(
    acc,
    row_sum,
    v_scale_ptr,
    v_mean_ptr,
    o_rows: gl.constexpr,
    o_cols: gl.constexpr,
    HEAD_DIM: gl.constexpr,
):
    """``acc / l * v_scale + v_mean``: the output rows ``[64, D]`` in fp32."""
    # Every row saw at least one valid key (blocks without one are not in the table).
    acc = acc / gl.expand_dims(gl.convert_layout(row_sum, o_rows), 1)
    channels = gl.arange(0, HEAD_DIM, layout=o_cols)  # [D]
    acc = acc * gl.expand_dims(gl.load(v_scale_ptr + channels), 0)
    return acc + gl.expand_dims(gl.load(v_mean_ptr + channels), 0)


@gluon.jit
def _query_row(rows, index):
    """Row ``index`` of the CTA's rows: (query block, its tiles, its full tiles, its table row).

    ``rows`` is (the head's ``q_block_order``, ``total_counts`` and ``full_counts`` rows, its
    first ``kv_block_ids`` row, the table's width, the CTA's first index into the order, how
    many rows it takes)."""
    order_ptr, total_ptr, full_ptr, ids_ptr, lut_width, first, _count = rows
    q_block = gl.load(order_ptr + first + index)
    block_ids_ptr = ids_ptr + q_block.to(gl.int64) * lut_width
    return q_block, gl.load(total_ptr + q_block), gl.load(full_ptr + q_block), block_ids_ptr


@gluon.jit
def _load_query_half(q_desc, q_smem, q_bar, batch, head, q_start):
    """A warpgroup's own 64 rows of Q (``q_start`` its first) through TMA."""
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(
        q_desc,
        [batch, head, q_start, 0],
        q_bar,
        q_smem._reinterpret(q_desc.dtype, q_desc.block_type.shape, q_desc.layout),
    )


@gluon.jit
def _rows_loader_partition(
    desc,
    bufs,
    ready,
    empty,
    rows,
    batch,
    head,
    STAGES: gl.constexpr,
    ROWS_PER_CTA: gl.constexpr,
    KEYS_LAST: gl.constexpr = False,
):
    """One warp: the K (or V) tiles of the CTA's rows, one ring through all of them, so the next
    row's first tiles land while the consumers finish the current one. One row a CTA: the row
    the kernel looked up (``rows[7]``)."""
    BLOCK_SIZE: gl.constexpr = 128
    ring = 0
    for index in range(rows[6]):
        row_info = rows[7] if ROWS_PER_CTA == 1 else _query_row(rows, index)
        _q_block, num_tiles, _full_tiles, block_ids_ptr = row_info
        loader_partition(
            desc,
            bufs,
            ready,
            empty,
            block_ids_ptr,
            num_tiles,
            batch,
            head,
            ring,
            BLOCK_SIZE,
            BLOCK_SIZE,
            STAGES,
            KEYS_LAST,
        )
        ring += num_tiles


@gluon.jit
def _consumer_partition(
    shared,
    WARPGROUP: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
    TWO_LEVEL: gl.constexpr,
    MAGIC_I2F: gl.constexpr,
    PERMUTED_KEYS: gl.constexpr,
    TREE_ROWS: gl.constexpr,
    LOOKAHEAD: gl.constexpr,
    LAZY_RESCALE: gl.constexpr,
    THRESHOLD: gl.constexpr,
    MMA_ROW_SUM: gl.constexpr,
    ROWS_PER_CTA: gl.constexpr,
):
    """One warpgroup: 64 query rows of each of the CTA's query blocks, one after the other
    (``_consumer_row``). With one block a CTA the kernel loaded Q before the partitions split;
    with more, the warpgroup loads its own half of Q, the next block's as soon as this block's
    last Q K^T has retired, so it lands during the last P V and the epilogue, and the output's
    TMA store is waited for only before the next block's epilogue reuses its shared memory, and
    before the CTA exits.
    """
    q_halves, out_halves, o_desc, q_bars, turns, rings, row, row_sum_ones = shared
    q_desc, rows, batch, head = row[0], row[1], row[7], row[8]
    ROWS: gl.constexpr = 64
    q_smem = q_halves.index(WARPGROUP)  # [64, D] int8
    if ROWS_PER_CTA == 1:
        # The kernel loaded both halves of Q on one barrier and looked the row up.
        row_info = rows[7]
        q_bar = q_bars
    else:
        row_info = _query_row(rows, 0)
        q_bar = q_bars.index(WARPGROUP)
        first_q = row_info[0] * 128 + WARPGROUP * ROWS
        _load_query_half(q_desc, q_smem, q_bar, batch, head, first_q)
    counters = (0, 0)  # ring tiles and turns the CTA's earlier rows took
    # One row without a loop around it: a loop of one trip puts 3 instructions into the main
    # loop's SASS (485 against 482).
    if ROWS_PER_CTA == 1:
        _consumer_row(
            shared,
            q_bar,
            0,
            row_info,
            counters,
            WARPGROUP,
            HEAD_DIM,
            STAGES,
            PINGPONG,
            TWO_LEVEL,
            MAGIC_I2F,
            PERMUTED_KEYS,
            TREE_ROWS,
            LOOKAHEAD,
            LAZY_RESCALE,
            THRESHOLD,
            MMA_ROW_SUM,
            False,
        )
    else:
        for index in range(rows[6]):
            counters, row_info = _consumer_row(
                shared,
                q_bar,
                index,
                row_info,
                counters,
                WARPGROUP,
                HEAD_DIM,
                STAGES,
                PINGPONG,
                TWO_LEVEL,
                MAGIC_I2F,
                PERMUTED_KEYS,
                TREE_ROWS,
                LOOKAHEAD,
                LAZY_RESCALE,
                THRESHOLD,
                MMA_ROW_SUM,
                True,
            )
    tma.store_wait(0)


@gluon.jit
def _consumer_row(
    shared,
    q_bar,
    index,
    row_info,
    counters,
    WARPGROUP: gl.constexpr,
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
    TWO_LEVEL: gl.constexpr,
    MAGIC_I2F: gl.constexpr,
    PERMUTED_KEYS: gl.constexpr,
    TREE_ROWS: gl.constexpr,
    LOOKAHEAD: gl.constexpr,
    LAZY_RESCALE: gl.constexpr,
    THRESHOLD: gl.constexpr,
    MMA_ROW_SUM: gl.constexpr,
    MORE_ROWS: gl.constexpr,
):
    """The warpgroup's 64 rows of the CTA's query block ``index`` (``row_info``, from
    ``_query_row``): wait for its Q (on ``q_bar``, phase ``index & 1``), every key tile, the
    epilogue and the output's store. With ``MORE_ROWS``, also the next block's Q copy; returns
    the counters after this row and the next row's info.

    Tiles of fully valid key blocks come first in a row's table (``full_tiles`` of them) and run
    without the column mask; only the padded ones after them pay for it, in their own loop (the
    mask's column indices would otherwise stay in registers across the whole loop).
    """
    q_halves, out_halves, o_desc, _q_bars, turns, rings, row, row_sum_ones = shared
    k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty = rings
    # INT8 V^T (QuantizedQKV.v_format "int8"): P V in INT8.
    INT8_PV: gl.constexpr = v_bufs.dtype == gl.int8
    (
        q_desc,
        rows,
        key_lengths_ptr,
        k_scale_ptr,
        q_scale_ptr,
        v_scale_ptr,
        v_mean_ptr,
        batch,
        head,
        qk_scale,
    ) = row
    q_block, num_tiles, full_tiles, block_ids_ptr = row_info
    ring, turn_base = counters
    ROWS: gl.constexpr = 64
    BLOCK_N: gl.constexpr = 128
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 32]
    )
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)
    q_smem = q_halves.index(WARPGROUP)  # [64, D] int8
    out_smem = out_halves.index(WARPGROUP)  # [64, D] output dtype
    q_start = q_block * BLOCK_N
    tile_row = (key_lengths_ptr, block_ids_ptr, k_scale_ptr, qk_scale)

    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)  # [64, D]
    # Also for an empty row: Q must land before the next row's copy is issued (and before the
    # CTA exits).
    mbarrier.wait(q_bar, index & 1)
    if num_tiles > 0:
        zero_scores = gl.zeros([ROWS, BLOCK_N], gl.int32, layout=s_layout)  # [64, 128]
        # INT8 P V accumulates in int32, merged into acc tile by tile.
        pv_dtype: gl.constexpr = gl.int32 if INT8_PV else gl.float32
        zero_pv = gl.zeros([ROWS, HEAD_DIM], pv_dtype, layout=o_layout)
        q_scale = gl.load(
            q_scale_ptr + q_start + WARPGROUP * ROWS + gl.arange(0, ROWS, layout=s_rows)
        )
        row_max = gl.full([ROWS], float("-inf"), gl.float32, layout=s_rows)
        if MMA_ROW_SUM or INT8_PV:
            sums_layout: gl.constexpr = gl.NVMMADistributedLayout(
                version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 8, 32]
            )
            row_sum = gl.zeros([ROWS, 8], gl.float32, layout=sums_layout)  # [64, 8]
            if INT8_PV:
                sums = (row_sum_ones, gl.zeros([ROWS, 8], gl.int32, layout=sums_layout))
            else:
                sums = (row_sum_ones, row_sum)
        else:
            row_sum = gl.zeros([ROWS], gl.float32, layout=s_rows)
            sums = 0
        operands = (
            q_smem,
            k_bufs,
            v_bufs,
            k_ready,
            v_ready,
            k_empty,
            v_empty,
            turns,
            (zero_scores, zero_pv, sums),
        )
        if INT8_PV:
            acc, row_max, row_sum = _int8_paired_tiles(
                acc,
                row_max,
                row_sum,
                operands,
                tile_row,
                q_scale,
                num_tiles,
                full_tiles,
                (ring, turn_base),
                WARPGROUP,
                STAGES,
                PINGPONG,
                PERMUTED_KEYS,
                TREE_ROWS,
            )
            row_sum = gl.sum(row_sum, axis=1)  # [64]: column 0, and the zeros beside it
        elif LOOKAHEAD:  # one row a CTA (GluonFP8Config)
            acc, row_max, row_sum = _ahead_tiles(
                acc,
                row_max,
                row_sum,
                operands,
                tile_row,
                q_scale,
                num_tiles,
                full_tiles,
                STAGES,
                MAGIC_I2F,
                PERMUTED_KEYS,
                TREE_ROWS,
                THRESHOLD,
            )
        else:
            acc, row_max, row_sum = _paired_tiles(
                acc,
                row_max,
                row_sum,
                operands,
                tile_row,
                q_scale,
                num_tiles,
                full_tiles,
                (ring, turn_base),
                WARPGROUP,
                STAGES,
                PINGPONG,
                TWO_LEVEL,
                MAGIC_I2F,
                PERMUTED_KEYS,
                TREE_ROWS,
                LAZY_RESCALE,
                THRESHOLD,
                MMA_ROW_SUM,
            )
            if MMA_ROW_SUM:
                row_sum = gl.sum(row_sum, axis=1)  # [64]: column 0, and the zeros beside it
        acc = _normalized(acc, row_sum, v_scale_ptr, v_mean_ptr, o_rows, o_cols, HEAD_DIM)
        ring += num_tiles
        if PINGPONG:
            turn_base += num_tiles + 1
    if MORE_ROWS:
        if index + 1 < rows[6]:
            # Every Q K^T of this row has retired: the next row's Q may overwrite q_smem.
            row_info = _query_row(rows, index + 1)
            _load_query_half(
                q_desc, q_smem, q_bar, batch, head, row_info[0] * BLOCK_N + WARPGROUP * ROWS
            )
        # The previous row's output store has read out_smem.
        tma.store_wait(0)
    # Rows past N are clipped by the TMA store; an empty row stores zeros.
    out_smem.store(acc.to(o_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(
        o_desc,
        [batch, head, q_start + WARPGROUP * ROWS, 0],
        out_smem._reinterpret(o_desc.dtype, o_desc.block_type.shape, o_desc.layout),
    )
    return (ring, turn_base), row_info


@gluon.jit
def _row_sum_ones(INT8: gl.constexpr = False):
    """The B operand of ``MMA_ROW_SUM``'s wgmma: ``[8, 128]`` e4m3 in shared memory, row 0 ones
    and rows 1-7 zeros (K-major: row n is output column n over the tile's 128 keys), so
    ``P ones^T`` holds each row's sum in column 0. ``INT8``: the int8 tile (ones) for INT8 P V.
    Written by the default warps before the partitions split, and fenced for the async proxy
    the wgmma reads through.

    The bytes are stored as integers (``E4M3_ONE``, the bits of 1.0) into an int8 view: built
    as e4m3 by the conversion instruction, ptxas 12.8 fused the pair conversion and the move
    that doubles it into one ``F2FP...MERGE_C`` whose upper half came from an unrelated register
    (the stack pointer), so half the tile's bytes were garbage, NaN among them.
    """
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([8, 128], gl.int8)
    values_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])  # [8, 128]
    rows = gl.arange(0, 8, layout=gl.SliceLayout(1, values_layout))  # [8]
    row_of = gl.expand_dims(rows, 1) + gl.zeros([8, 128], gl.int32, layout=values_layout)
    values = gl.where(row_of == 0, 1 if INT8 else E4M3_ONE, 0).to(gl.int8)  # [8, 128]
    ones = gl.allocate_shared_memory(gl.int8, [8, 128], layout)
    ones.store(values)
    fence_async_shared()
    fp8_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([8, 128], gl.float8e4nv)
    # INT8 P V's row sums read the integer 1 as it is.
    return ones if INT8 else ones._reinterpret(gl.float8e4nv, [8, 128], fp8_layout)


@gluon.jit
def _gluon_fp8_attention_kernel(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    q_scale_ptr,
    k_scale_ptr,
    v_scale_ptr,
    v_mean_ptr,
    kv_block_ids_ptr,
    full_counts_ptr,
    total_counts_ptr,
    key_lengths_ptr,
    q_block_order_ptr,
    num_heads,
    mask_heads,
    num_blocks,
    lut_width,
    padded_len,
    qk_scale,
    seq_len,  # autotuning key only
    density_bucket,  # autotuning key only
    HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
    TWO_LEVEL: gl.constexpr,
    MAGIC_I2F: gl.constexpr,
    PERMUTED_KEYS: gl.constexpr,
    TREE_ROWS: gl.constexpr,
    LOOKAHEAD: gl.constexpr,
    LAZY_RESCALE: gl.constexpr,
    RESCALE_THRESHOLD: gl.constexpr,
    MMA_ROW_SUM: gl.constexpr,
    ROWS_PER_CTA: gl.constexpr,
    V_TERMS: gl.constexpr = 1,
    INT8_PV: gl.constexpr = False,
):
    """Grid ``(cdiv(nb, ROWS_PER_CTA), B * H)``; a CTA computes ``ROWS_PER_CTA`` consecutive
    128-row query blocks of ``q_block_order`` (of one (batch, head); fewer in a head's last CTA)
    one after the other, its rings and barriers running on from one to the next.

    q/k descriptors over int8 ``[B, H, Np, D]``, v over fp8 V^T ``[B, H, V_TERMS * D, Np]`` (one
    TMA box carries both terms of a tile), or over int8 V^T ``[B, H, D, Np]`` with ``INT8_PV``
    (P V in INT8), o over the output ``[B, H, N, D]``; scales and means as ``QuantizedQKV``
    holds them.
    """
    ROWS: gl.constexpr = 64
    BLOCK_SIZE: gl.constexpr = 128
    batch_head = gl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    mask_row = (head % mask_heads) * num_blocks  # the head's first row of the tables
    first = gl.program_id(0) * ROWS_PER_CTA
    rows = (
        q_block_order_ptr + mask_row,
        total_counts_ptr + mask_row,
        full_counts_ptr + mask_row,
        kv_block_ids_ptr + mask_row.to(gl.int64) * lut_width,
        lut_width,
        first,
        gl.minimum(num_blocks - first, ROWS_PER_CTA),
    )
    if ROWS_PER_CTA == 1:
        # One row: looked up once here, for every partition (as rows[7]).
        only_row = _query_row(rows, 0)
        rows = rows + (only_row,)

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], gl.int8)
    k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_SIZE, HEAD_DIM], gl.int8)
    v_dtype: gl.constexpr = gl.int8 if INT8_PV else gl.float8e4nv
    v_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(
        [V_TERMS * HEAD_DIM, BLOCK_SIZE], v_dtype
    )
    out_dtype: gl.constexpr = o_desc.dtype
    out_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], out_dtype)
    q_halves = gl.allocate_shared_memory(gl.int8, [2, ROWS, HEAD_DIM], q_layout)
    out_halves = gl.allocate_shared_memory(out_dtype, [2, ROWS, HEAD_DIM], out_layout)
    k_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_SIZE, HEAD_DIM], k_layout)
    v_bufs = gl.allocate_shared_memory(v_dtype, [STAGES, V_TERMS * HEAD_DIM, BLOCK_SIZE], v_layout)
    row_sum_ones = _row_sum_ones(INT8_PV) if MMA_ROW_SUM or INT8_PV else 0
    if ROWS_PER_CTA == 1:
        # Q's halves on one barrier, issued before the partitions start.
        q_bars, k_ready, v_ready, k_empty, v_empty, turns = cta_barriers(STAGES)
        load_query_halves(q_desc, q_halves, q_bars, batch, head, only_row[0] * BLOCK_SIZE)
    else:
        # One Q barrier a consumer warpgroup: each loads its own half, row after row.
        q_bars, k_ready, v_ready, k_empty, v_empty, turns = cta_barriers(STAGES, 2)

    rings = (k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty)
    head_offset = batch_head.to(gl.int64)
    row = (
        q_desc,
        rows,
        key_lengths_ptr,
        k_scale_ptr + head_offset * num_blocks,
        q_scale_ptr + head_offset * padded_len,
        v_scale_ptr + head_offset * HEAD_DIM,
        v_mean_ptr + head_offset * HEAD_DIM,
        batch,
        head,
        qk_scale,
    )
    shared = (q_halves, out_halves, o_desc, q_bars, turns, rings, row, row_sum_ones)
    gl.warp_specialize(
        [
            (
                _consumer_partition,
                (
                    shared,
                    0,
                    HEAD_DIM,
                    STAGES,
                    PINGPONG,
                    TWO_LEVEL,
                    MAGIC_I2F,
                    PERMUTED_KEYS,
                    TREE_ROWS,
                    LOOKAHEAD,
                    LAZY_RESCALE,
                    RESCALE_THRESHOLD,
                    MMA_ROW_SUM,
                    ROWS_PER_CTA,
                ),
            ),
            (
                _consumer_partition,
                (
                    shared,
                    1,
                    HEAD_DIM,
                    STAGES,
                    PINGPONG,
                    TWO_LEVEL,
                    MAGIC_I2F,
                    PERMUTED_KEYS,
                    TREE_ROWS,
                    LOOKAHEAD,
                    LAZY_RESCALE,
                    RESCALE_THRESHOLD,
                    MMA_ROW_SUM,
                    ROWS_PER_CTA,
                ),
            ),
            (
                _rows_loader_partition,
                (k_desc, k_bufs, k_ready, k_empty, rows, batch, head, STAGES, ROWS_PER_CTA),
            ),
            (
                _rows_loader_partition,
                # V^T: [B, H, D, Np], a tile starts at its keys' column
                (v_desc, v_bufs, v_ready, v_empty, rows, batch, head, STAGES, ROWS_PER_CTA, True),
            ),
        ],
        [CONSUMER_WARPS, LOADER_WARPS, LOADER_WARPS],
        [CONSUMER_REGISTERS, LOADER_REGISTERS, LOADER_REGISTERS],
    )


_GL_DTYPES = {
    torch.int8: gl.int8,
    torch.float8_e4m3fn: gl.float8e4nv,
    torch.float16: gl.float16,
    torch.bfloat16: gl.bfloat16,
}


def descriptor(t: torch.Tensor, box: list[int]) -> TensorDescriptor:
    """Descriptor over a 4-D tensor moving ``box``-shaped tiles (zeros read, writes clipped
    past its bounds)."""
    layout = gl.NVMMASharedLayout.get_default_for(box, _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), box, layout)


def descriptors(quantized: QuantizedQKV, out: torch.Tensor) -> tuple[TensorDescriptor, ...]:
    """q, k, v^T and output descriptors with the boxes the kernel moves."""
    head_dim = quantized.q.shape[-1]
    rows = GLUON_BLOCK_SIZE // 2
    return (
        descriptor(quantized.q, [1, 1, rows, head_dim]),
        descriptor(quantized.k, [1, 1, GLUON_BLOCK_SIZE, head_dim]),
        descriptor(quantized.v_t, [1, 1, quantized.v_terms * head_dim, GLUON_BLOCK_SIZE]),
        descriptor(out, [1, 1, rows, head_dim]),
    )


# What the autotuner times per (N, head dim, density bucket): ping-pong off and on, 2 stages,
# one-level accumulation (two-level spills registers: tests/test_fp8_gluon_compile.py), the
# integer-add conversion, V in wgmma key order. bench_fp8 --probe times the other switches.
# The grid depends on rows_per_cta, so the autotuned configs share one value.
AUTOTUNE_ROWS_PER_CTA = 1
AUTOTUNE_CONFIGS = [
    triton.Config(
        GluonFP8Config(pingpong=pingpong, rows_per_cta=AUTOTUNE_ROWS_PER_CTA).kwargs(),
        num_warps=CONSUMER_WARPS.value,
        maxnreg=MAX_REGISTERS,
    )
    for pingpong in (False, True)
]
_autotuned_kernel = triton.autotune(
    configs=AUTOTUNE_CONFIGS,
    key=["seq_len", "HEAD_DIM", "V_TERMS", "INT8_PV", "density_bucket"],
)(_gluon_fp8_attention_kernel)


def autotuned_config() -> str:
    """The config the latest launch used without a ``config`` argument (for benchmark logs)."""
    if not autotune_enabled():
        return repr(GluonFP8Config())
    config = getattr(_autotuned_kernel, "best_config", None)
    return "not tuned yet" if config is None else str(config)


# ptxas 12.8 (the one Triton 3.6 and 3.7 ship) miscompiles the lookahead schedule: on one path
# into the last tile's P V it reads a wgmma descriptor from a uniform register nothing wrote
# (an out-of-bounds shared-memory read on the H200; tests/test_fp8_gluon_compile.py finds it in
# the SASS). ptxas 12.9 compiles it soundly.
LOOKAHEAD_MIN_PTXAS = (12, 9)


def ptxas_version() -> tuple[int, int]:
    """(major, minor) of the ptxas Triton compiles sm_90 code with (TRITON_PTXAS_PATH picks one)."""
    from triton.backends.nvidia.compiler import get_ptxas

    major, minor = get_ptxas(90).version.split(".")[:2]
    return int(major), int(minor)


def gluon_fp8_attention(
    quantized: QuantizedQKV,
    lut: BlockLUT,
    out: torch.Tensor,
    *,
    scale: float,
    config: GluonFP8Config | None = None,
) -> torch.Tensor:
    """Run the kernel into ``out`` ``[B, H, N, D]`` (fp16/bf16); ``config`` skips autotuning.

    ``out`` must suit a TMA descriptor (16-byte aligned strides, unit stride along D); other
    layouts go through a contiguous buffer and a copy. ``quantized`` must hold V^T in the key
    order the config reads (``permuted_keys``: ``quantize_qkv(..., key_order="wgmma")``).
    """
    if config is not None and config.lookahead:
        version = ptxas_version()
        if version < LOOKAHEAD_MIN_PTXAS:
            raise ValueError(
                f"the lookahead schedule needs ptxas >= 12.9 (this is {version[0]}.{version[1]}, "
                "which miscompiles it); point TRITON_PTXAS_PATH at a newer one"
            )
    int8_pv = quantized.v_format == "int8"
    if int8_pv and config is not None:
        _check_int8_pv_config(config)
    permuted = (config or GluonFP8Config()).permuted_keys
    if quantized.wgmma_key_order != permuted:
        raise ValueError(
            f"this config reads V^T in {'wgmma' if permuted else 'natural'} key order; quantize "
            f"with key_order={'wgmma' if permuted else 'natural'!r}"
        )
    target = (
        out if tma_layout_ok(out) else torch.empty_like(out, memory_format=torch.contiguous_format)
    )
    batch, heads, padded_len, head_dim = quantized.q.shape
    rows_per_cta = (config or GluonFP8Config()).rows_per_cta
    if config is None and autotune_enabled():
        rows_per_cta = AUTOTUNE_ROWS_PER_CTA
    grid = (triton.cdiv(lut.num_blocks, rows_per_cta), batch * heads)
    args = (
        *descriptors(quantized, target),
        quantized.q_scale,
        quantized.k_scale,
        quantized.v_scale,
        quantized.v_mean,
        lut.kv_block_ids,
        lut.full_counts,
        lut.total_counts,
        lut.key_lengths,
        lut.q_block_order,
        heads,
        lut.mask_heads,
        lut.num_blocks,
        lut.kv_block_ids.shape[-1],
        padded_len,
        scale * LOG2_E * quantized.score_scale,
        quantized.seq_len,
        density_bucket(lut),
    )
    if config is None and autotune_enabled():
        _autotuned_kernel[grid](
            *args, HEAD_DIM=head_dim, V_TERMS=quantized.v_terms, INT8_PV=int8_pv
        )
    else:
        config = config or GluonFP8Config()
        _gluon_fp8_attention_kernel[grid](
            *args,
            HEAD_DIM=head_dim,
            V_TERMS=quantized.v_terms,
            INT8_PV=int8_pv,
            **config.kwargs(),
            num_warps=CONSUMER_WARPS.value,
            maxnreg=MAX_REGISTERS,
        )
    if target is not out:
        out.copy_(target)
    return out


def _check_int8_pv_config(config: GluonFP8Config) -> None:
    """INT8 P V runs the default schedule, its own merge and tensor-core row sums: the switches
    that change those do not apply to it."""
    unsupported = [
        name
        for name, on in (
            ("lookahead", config.lookahead),
            ("two_level", config.two_level),
            ("mma_row_sum=False", not config.mma_row_sum),
            ("rescale_threshold", config.rescale_threshold != 0.0),
        )
        if on
    ]
    if unsupported:
        raise ValueError(f"INT8 P V (v_format='int8') does not take {', '.join(unsupported)}")


def gluon_fp8_supports(q: torch.Tensor, block_size: int) -> bool:
    """A compiled (not interpreted) Hopper GPU and block size 128; the pre-pass lays the
    operands out for TMA, so q, k and v may have any layout with unit stride along D."""
    if interpreting() or not q.is_cuda or block_size != GLUON_BLOCK_SIZE:
        return False
    return torch.cuda.get_device_capability(q.device)[0] == 9


def gluon_fp8_lut_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: BlockLUT,
    *,
    block_size: int,
    scale,
    v_format: str = "e4m3",
) -> torch.Tensor:
    """The pre-pass, then the kernel: ``[B, H, N, D]`` in q's dtype and memory order, with V
    (and P) in ``v_format``: "e4m3" (precision "fp8") or "int8" (precision "int8")."""
    if not gluon_fp8_supports(q, block_size):
        raise ValueError(
            "the Gluon 8-bit kernel needs a compiled (not interpreted) Hopper GPU and "
            "block_size 128"
        )
    quantized = quantize_qkv(
        q,
        k,
        v,
        block_size=block_size,
        key_lengths=lut.key_lengths,
        key_order="wgmma",
        v_terms=runtime_v_terms(v_format),
        v_format=v_format,
    )
    return gluon_fp8_attention(quantized, lut, torch.empty_like(q), scale=scale)
