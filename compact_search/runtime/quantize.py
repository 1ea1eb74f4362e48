"""The 8-bit pre-pass: q, k, v -> INT8 Q/K with scales and 8-bit V^T, and its torch emulation.

Once per attention call, before the 8-bit kernels (``kernels/triton_portable_fp8.py``,
``kernels/gluon_hopper_fp8.py``; ``runtime/attention.py`` picks one) run:

1. **statistics** (``_key_value_stats_kernel``): per (batch, head) and channel, over the valid
   keys (``key_lengths``), partial sums of K and of V and V's max and min, one row of partials
   per chunk of key blocks; ``_finalize_stats_kernel`` adds them up, one program a head, into
   K's mean (its sum rotated: the rotation is linear, so the statistics kernel need not rotate
   every key), V's mean and V's per-channel scale (``_finalize_stats`` is the same in torch).
2. **quantization** (``_quantize_kernel``; by default a launch each for Q, K and V, whose
   programs then hold one tile instead of three), one program per 128 (or 64) tokens of a head:
   - Q and K are rotated by the ``D x D`` Sylvester-Hadamard matrix (entries +-1, so
     ``(q H)(k H)^T = D q k^T``: the kernels fold ``1 / D`` into the softmax scale), which
     spreads a few outlier channels over all of them;
   - K loses its mean over the head's valid keys (``q . (k - mu)`` shifts a query row's scores by
     one constant, which the softmax ignores) and padded keys become zeros;
   - Q is quantized to INT8 per token, K per mask block: ``x8 = rne(x * 127 / amax)``,
     ``scale = amax / 127``;
   - V loses its per-channel mean (added back to the output: a softmax row sums to 1), is divided
     by its per-channel scale ``amax |v - mean| / 448`` and rounded to FP8 e4m3 (nearest even,
     saturating at +-448), and is stored transposed, ``[B, H, D, Np]``, the K-major B operand the
     FP8 wgmma of P V needs; padded keys and tokens past N are zeros. With ``v_terms=2`` the
     e4m3 rounding of what that missed follows as rows ``D..2D-1`` (``[B, H, 2 D, Np]``). With
     ``v_format="int8"`` V is instead divided by ``amax |v - mean| / 127`` and rounded to INT8
     (nearest even), the B operand of an INT8 P V (the kernels then round P to INT8 too);
   - each program also writes, per channel, its block's sum of V's rounding error
     ``v8 - (v - mean) / scale`` over the valid keys (``[B*H, nb, D]`` partials, no atomics, so
     the result is deterministic); ``_corrected_v_mean_kernel`` adds them up and subtracts
     ``scale`` times the mean error from V's mean. The kernels add that mean to every output
     row; the mean rounding error is systematic, and where attention is diffuse (the output
     shrinks like ``1 / sqrt(N)``) it would otherwise be an error that grows with N.

Everything is padded to ``Np = nb * block_size`` tokens, so the kernels read whole blocks. A
call is six launches (statistics, their sums, Q, K, V, V's corrected mean) and no torch
arithmetic: at the 1.3B shape the pre-pass was launch-bound when its sums were ~20 small torch
operations.

The rounding is written out in float arithmetic (``round_half_even``, ``round_to_e4m3``), so the
Triton interpreter (whose own fp32 -> fp8 and fp32 -> bf16 casts round inexact values wrongly)
computes exactly what a GPU does. ``emulate_quantize_qkv`` is the same computation in torch; given
the kernel's statistics it gives the same bits, except that it rotates exactly where a kernel sums
D products in fp32: a rotated entry can then differ by an ulp, which on rare rows moves a scale
by an ulp or a value at a rounding boundary by one integer step; and V's corrected mean, whose
rounding errors it sums in another order, agrees to fp32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from compact_search.runtime.kernels.common import LOG2_E, interpreting

__all__ = [
    "QuantizedQKV",
    "quantize_qkv",
    "emulate_quantize_qkv",
    "key_value_stats",
    "hadamard_matrix",
    "INT8_MAX",
    "E4M3_MAX",
    "LOG2_P_SCALE",
    "RESCALE_THRESHOLD",
    "FP8_V_TERMS",
    "runtime_v_terms",
    "V_FORMATS",
    "INT8_P_SCALE",
]

INT8_MAX = 127.0
E4M3_MAX = 448.0
# Floor under every amax, so an all-zero row or block quantizes to zeros instead of NaN.
TINY_AMAX = 1e-30
# 1.5 * 2^23: adding and subtracting it rounds an fp32 |x| < 2^22 to the nearest integer, ties
# to even (IEEE addition does the rounding).
ROUNDING_MAGIC = 12582912.0
# The same numbers as the kernels see them (a jit function reads only constexpr globals).
INT8_MAX_C = tl.constexpr(INT8_MAX)
E4M3_MAX_C = tl.constexpr(E4M3_MAX)
TINY_AMAX_C = tl.constexpr(TINY_AMAX)
ROUNDING_MAGIC_C = tl.constexpr(ROUNDING_MAGIC)
# P is quantized as 448 * exp2(t - m): the largest probability of a row maps to e4m3's largest
# value, so small probabilities stay clear of the subnormal range (e4m3 normals reach 2^-6).
LOG2_P_SCALE = math.log2(E4M3_MAX)
LOG2_P_SCALE_C = tl.constexpr(LOG2_P_SCALE)
# With INT8 P V (``v_format="int8"``) P is 127 * exp2(s - t), t the tile's own row max, rounded
# to an integer: relative to the tile's max rather than the running one, a tile's P uses the
# whole INT8 range wherever its max sits below the row's (docs/kernel.md, "INT8 P V").
INT8_P_SCALE = INT8_MAX
LOG2_INT8_P_SCALE = math.log2(INT8_P_SCALE)
LOG2_INT8_P_SCALE_C = tl.constexpr(LOG2_INT8_P_SCALE)
# A row's running max m moves only to a tile max above m + this (log2 units), and P is
# 448 * 2^-t * exp2(s - m) <= 448. Where a row's max stays, its accumulator's rescale factor is
# exactly 1 and the Gluon kernel branches over the multiplies (FlashAttention-4's conditional
# rescaling). 0 keeps the plain online softmax, and its accuracy: on Gaussian inputs a warp's
# 16 rows move their max in ~21% of tiles at 32k keys already (7% at t = 1, 0.8% at t = 3), while
# t > 0 leaves a row's largest P off e4m3's largest value (error 3.46e-2 at t = 0, 3.52e-2 at
# 1, 3.57e-2 at 3; docs/kernel.md).
RESCALE_THRESHOLD = 0.0
RESCALE_THRESHOLD_C = tl.constexpr(RESCALE_THRESHOLD)
LOG2_E_C = tl.constexpr(LOG2_E)
# Key blocks per program of the statistics kernel (one row of partials each).
STATS_BLOCKS_PER_PROGRAM = 8
STATS_NUM_WARPS = 4
# Key rows the statistics kernel loads a step and folds elementwise into its running
# statistics (0: whole blocks, each reduced over its rows as it loads; the former kernel). sm_90,
# head dim 128, 4 warps: 94 registers a thread at 16 rows, 167 at 32, 255 with whole blocks.
STATS_ROWS = 16
# Rows of partials (resp. key blocks' error sums) the program of a head that sums them (resp.
# corrects V's mean) adds per step.
FINALIZE_CHUNK_ROWS = 16
CORRECTION_BLOCK_ROWS = 16
# 8 warps: at 4, the quantization kernel's three [128, 128] fp32 tiles and the Hadamard dots
# spill at head dim 128 (sm_90: 255 registers and ~115 local loads/stores; 172 and none at 8).
QUANTIZE_NUM_WARPS = 8
# V's rows permuted in registers before a store of whole vectors (wgmma key order), and Q, K, V
# quantized by three launches of one tensor each (fewer live registers a program): on the H200
# at the 14B 720p shape the quantization takes 2.31 ms, against 2.73 ms in one launch and 3.11
# ms with V stored byte by byte (benchmarks/bench_prepass.py times every way).
PERMUTE_IN_REGISTERS = True
SPLIT_QUANTIZE = True
# Q's and K's launches (with SPLIT_QUANTIZE): key blocks a program quantizes in a loop, and the
# pipeline depth of its loads (1: none, each program a block, its tile staged through registers).
QK_BLOCKS_PER_PROGRAM = 4
QK_LOAD_STAGES = 2
# V's e4m3 terms on the runtime's 8-bit path (sparse_attention(precision="fp8")): 1, or 2 (its
# rounding error in a second term and a second P V product; docs/kernel.md, "Accuracy").
FP8_V_TERMS = 1
# How V^T is stored: "e4m3" (FP8 P V, one or two terms) or "int8" (INT8 P V, one term).
V_FORMATS = ("e4m3", "int8")
# The largest 8-bit value of each format: V's per-channel scale maps amax |v - mean| to it.
V_FORMAT_MAX = {"e4m3": E4M3_MAX, "int8": INT8_MAX}


def runtime_v_terms(v_format: str) -> int:
    """V's terms on the runtime's 8-bit path in ``v_format``: FP8_V_TERMS for e4m3 (precision
    "fp8"), one for INT8 (precision "int8"), which has no second term."""
    return FP8_V_TERMS if v_format == "e4m3" else 1


_HADAMARD_CACHE: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}


def _kernel_hadamard(x: torch.Tensor) -> torch.Tensor:
    """H as the kernels read it: x's dtype on a GPU, fp32 under the interpreter.

    Cached per head dim, device and dtype: building it takes ~20 small kernels (concatenations),
    twice a call, which at small shapes cost more than the pre-pass's memory traffic. Not
    cached while a CUDA graph is captured (its memory would be the graph's).
    """
    dtype = torch.float32 if interpreting() or x.dtype == torch.float32 else x.dtype
    return _cached_hadamard(x.shape[-1], x.device, dtype)


def _cached_hadamard(dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (dim, device, dtype)
    matrix = _HADAMARD_CACHE.get(key)
    if matrix is None:
        matrix = hadamard_matrix(dim, device, dtype)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _HADAMARD_CACHE[key] = matrix
    return matrix


@dataclass(frozen=True)
class QuantizedQKV:
    """What the 8-bit kernels read. ``Np = nb * block_size``; rows >= N and padded keys are zero.

    Attributes:
        q: int8 ``[B, H, Np, D]``, rotated Q (``q_scale`` per token).
        q_scale: fp32 ``[B, H, Np]``: ``q ~ q8 * q_scale`` (rotated).
        k: int8 ``[B, H, Np, D]``, rotated K minus its mean (``k_scale`` per block).
        k_scale: fp32 ``[B, H, nb]``.
        v_t: float8_e4m3fn ``[B, H, T * D, Np]`` with ``T = v_terms``: ``(v - v_mean) / v_scale``,
            transposed, in e4m3 (rows ``0..D-1``); with two terms rows ``D..2D-1`` hold the
            e4m3 rounding of what the first missed, and V^T is their sum (exact in fp32). Or
            int8 ``[B, H, D, Np]`` (``v_format`` "int8": one term, ``v_scale`` is amax / 127).
        v_scale: fp32 ``[B, H, D]``.
        v_mean: fp32 ``[B, H, D]``, what the kernels add to the output: V's mean over the valid
            keys (the one ``v_t`` is centred on, ``key_value_stats``' ``v_mean``) minus
            ``v_scale`` times the mean rounding error of ``v_t`` over the valid keys, so
            ``v_t * v_scale + v_mean`` averages over the valid keys to V's mean (to fp32
            rounding).
        k_mean: fp32 ``[B, H, D]``, in the rotated basis (the kernels do not need it).
        block_size: tokens per mask block (the K scale group); seq_len: N.
        rotated: whether Q and K carry the Hadamard rotation (scores are then ``D`` times larger).
        wgmma_key_order: V^T's keys stored in ``wgmma_key_order`` within each block of 32 (what
            the Gluon kernel reads); otherwise in token order.
    """

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v_t: torch.Tensor
    v_scale: torch.Tensor
    v_mean: torch.Tensor
    k_mean: torch.Tensor
    block_size: int
    seq_len: int
    rotated: bool
    wgmma_key_order: bool = False

    @property
    def v_format(self) -> str:
        """ "int8" (INT8 P V) or "e4m3" (FP8 P V), from V^T's dtype."""
        return "int8" if self.v_t.dtype == torch.int8 else "e4m3"

    @property
    def v_terms(self) -> int:
        """How many e4m3 terms carry V (1, or 2 with its rounding error)."""
        return self.v_t.shape[2] // self.q.shape[-1]

    def v_values(self) -> torch.Tensor:
        """V^T as the kernels' P V products see it: fp32 ``[B, H, D, Np]``, the terms summed."""
        head_dim = self.q.shape[-1]
        terms = self.v_t.float().unflatten(2, (self.v_terms, head_dim))  # [B, H, T, D, Np]
        return terms.sum(2) if self.v_terms == 2 else terms[:, :, 0]

    @property
    def score_scale(self) -> float:
        """What ``q8 k8^T * q_scale * k_scale`` must be multiplied by to give ``q k^T``."""
        return 1.0 / self.q.shape[-1] if self.rotated else 1.0


def wgmma_key_order(length: int, device=None) -> torch.Tensor:
    """int64 ``[length]``: where each key goes in V^T for the Gluon kernel (``length % 32 == 0``).

    Key ``32 h + 16 j4 + 8 j3 + 4 j2 + 2 j1 + j0`` goes to ``32 h + 16 j4 + 8 j2 + 4 j1 + 2 j3 +
    j0``: the key a thread's score register holds is then the key its P V operand byte multiplies
    (``gluon_hopper_fp8._pv_operand``); the order of the sum over keys is all that changes.
    """
    keys = torch.arange(length, device=device)
    return (keys & ~31) | (keys & 17) | (((keys >> 3) & 1) << 1) | (((keys >> 1) & 3) << 2)


@triton.jit
def _wgmma_position(keys):
    """``wgmma_key_order`` in a kernel (the same bit shuffle)."""
    return (keys & -32) | (keys & 17) | (((keys >> 3) & 1) << 1) | (((keys >> 1) & 3) << 2)


def natural_key_order(v_t: torch.Tensor) -> torch.Tensor:
    """V^T ``[B, H, D, Np]`` stored in ``wgmma_key_order`` back in token order."""
    return v_t[..., wgmma_key_order(v_t.shape[-1], v_t.device)]


def hadamard_matrix(dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``[dim, dim]`` Sylvester-Hadamard matrix with entries +-1 (``H H^T = dim * I``)."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two head dim, got {dim}")
    matrix = torch.ones(1, 1, dtype=dtype, device=device)
    while matrix.shape[0] < dim:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


@triton.jit
def _rows_in_wgmma_order(x, ROWS: tl.constexpr, COLS: tl.constexpr):
    """``[ROWS, COLS]`` with row ``r`` moved to ``_wgmma_position(r)`` (``ROWS % 32 == 0``)."""
    # Row 32 h + 16 j4 + 8 j3 + 4 j2 + 2 j1 + j0, split into its bits, goes to
    # 32 h + 16 j4 + 8 j2 + 4 j1 + 2 j3 + j0: a permutation of the bit axes.
    bits = tl.reshape(x, [ROWS // 32, 2, 2, 2, 2, 2, COLS])  # (h, j4, j3, j2, j1, j0, col)
    return tl.reshape(tl.permute(bits, (0, 1, 3, 4, 2, 5, 6)), [ROWS, COLS])


@triton.jit
def round_half_even(x):
    """fp32 ``x`` (``|x| < 2^22``) to the nearest integer, ties to even, as an fp32 value."""
    return (x + ROUNDING_MAGIC_C) - ROUNDING_MAGIC_C


@triton.jit
def round_to_e4m3(x):
    """fp32 ``x`` to the nearest FP8 e4m3 value (ties to even, saturating at +-448), in fp32.

    e4m3 has 3 mantissa bits and no exponent below -6 (below it, subnormals share the spacing
    2^-9), so the spacing at ``x`` is ``2^(max(e, -6) - 3)`` with ``e`` x's binary exponent; both
    scalings by that power of two are exact, only the rounding to an integer rounds.
    """
    bits = x.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    to_grid = ((130 - exponent) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e)
    from_grid = ((124 + exponent) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    # On |x|, then the sign back by a multiply (0 - rounded would turn -0 into +0), so a value
    # that rounds to zero keeps its sign, as the hardware conversion does.
    rounded = tl.minimum(round_half_even(tl.abs(x) * to_grid) * from_grid, E4M3_MAX_C)
    return tl.where(bits < 0, rounded * -1.0, rounded)  # the sign bit: -0 stays -0


@triton.jit
def _to_e4m3(x, HARDWARE: tl.constexpr):
    """fp32 -> e4m3 (nearest even, saturating): the conversion instruction, or ``round_to_e4m3``
    (exact, then a cast of an e4m3 value) where it cannot run (the interpreter)."""
    if HARDWARE:
        return x.to(tl.float8e4nv)
    return round_to_e4m3(x).to(tl.float8e4nv)


@triton.jit
def _load_rows(base_ptr, rows, stride_n, valid, HEAD_DIM: tl.constexpr):
    """``[R, D]`` rows of one head in their dtype; rows where ``valid`` is false read as zeros."""
    cols = tl.arange(0, HEAD_DIM)
    pointers = base_ptr + rows[:, None] * stride_n + cols[None, :]
    return tl.load(pointers, mask=valid[:, None], other=0)


@triton.jit
def _load_hadamard(hadamard_ptr, HEAD_DIM: tl.constexpr):
    """H ``[D, D]`` for ``_rotated``.

    H is stored in the inputs' dtype on a GPU (tensor cores, fp32 accumulation) and in fp32 under
    the interpreter (whose bf16 products are wrong); its entries are +-1, so every product is
    exact and only the fp32 sums round.
    """
    cols = tl.arange(0, HEAD_DIM)
    return tl.load(hadamard_ptr + cols[:, None] * HEAD_DIM + cols[None, :])


@triton.jit
def _rotated(x, hadamard, ROTATE: tl.constexpr):
    """An ``[R, D]`` tile in fp32, times ``hadamard`` (``_load_hadamard``'s) when ``ROTATE``
    (without it, ``hadamard`` is not read: None will do)."""
    if ROTATE:
        return tl.dot(x.to(hadamard.dtype), hadamard)
    return x.to(tl.float32)


@triton.jit
def _key_value_stats_kernel(
    k_ptr,
    v_ptr,
    hadamard_ptr,
    key_lengths_ptr,
    k_sum_ptr,
    v_sum_ptr,
    v_max_ptr,
    v_min_ptr,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    num_heads,
    num_blocks,
    num_chunks,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    ROTATE: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Grid ``(chunks, B * H)``: partial per-channel statistics of one chunk of key blocks.

    Writes ``[B*H, chunks, D]`` partials: sum of valid keys (rotated when ``ROTATE``: the
    ``stats_rotate_in_kernel`` variant; by default the sum is rotated afterwards, the rotation
    being linear), sum, max and min of valid values; padded keys (past ``key_lengths``) take no
    part.

    ``ROWS`` (dividing ``BLOCK_SIZE``): the program loads ``[ROWS, D]`` of K and V a step and
    folds them elementwise into ``[ROWS, D]`` running sums, maxima and minima, reduced over rows
    once, at the end: a few registers a value, no cross-thread reduction in the loop. ``ROWS``
    0: each block's ``[BLOCK_SIZE, D]`` tiles are loaded whole and reduced over rows as they
    come (the former kernel: 255 registers at 4 warps and a shared-memory reduction a block).
    """
    chunk = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    hadamard = None
    if ROTATE:
        hadamard = _load_hadamard(hadamard_ptr, HEAD_DIM)  # [D, D]
    if ROWS == 0:
        offsets = tl.arange(0, BLOCK_SIZE)  # [BS]
        k_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
        v_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
        v_max = tl.full([HEAD_DIM], float("-inf"), dtype=tl.float32)
        v_min = tl.full([HEAD_DIM], float("inf"), dtype=tl.float32)
        for i in range(BLOCKS_PER_PROGRAM):
            block = chunk * BLOCKS_PER_PROGRAM + i
            key_length = tl.load(key_lengths_ptr + block, mask=block < num_blocks, other=0)
            valid = offsets < key_length  # [BS]
            rows = block * BLOCK_SIZE + offsets
            keys = _load_rows(k_base, rows, stride_kn, valid, HEAD_DIM)
            keys = _rotated(keys, hadamard, ROTATE)  # [BS, D]
            values = _load_rows(v_base, rows, stride_vn, valid, HEAD_DIM).to(tl.float32)
            k_sum += tl.sum(keys, 0)
            v_sum += tl.sum(values, 0)
            v_max = tl.maximum(v_max, tl.max(tl.where(valid[:, None], values, float("-inf")), 0))
            v_min = tl.minimum(v_min, tl.min(tl.where(valid[:, None], values, float("inf")), 0))
    else:
        offsets = tl.arange(0, ROWS)  # [R]
        k_sums = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
        v_sums = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
        v_maxima = tl.full([ROWS, HEAD_DIM], float("-inf"), dtype=tl.float32)
        v_minima = tl.full([ROWS, HEAD_DIM], float("inf"), dtype=tl.float32)
        PARTS: tl.constexpr = BLOCK_SIZE // ROWS
        for step in range(BLOCKS_PER_PROGRAM * PARTS):
            block = chunk * BLOCKS_PER_PROGRAM + step // PARTS
            key_length = tl.load(key_lengths_ptr + block, mask=block < num_blocks, other=0)
            in_block = (step % PARTS) * ROWS + offsets  # [R]
            valid = in_block < key_length
            rows = block * BLOCK_SIZE + in_block
            keys = _load_rows(k_base, rows, stride_kn, valid, HEAD_DIM)
            k_sums += _rotated(keys, hadamard, ROTATE)  # [R, D]
            values = _load_rows(v_base, rows, stride_vn, valid, HEAD_DIM).to(tl.float32)
            v_sums += values
            v_maxima = tl.maximum(v_maxima, tl.where(valid[:, None], values, float("-inf")))
            v_minima = tl.minimum(v_minima, tl.where(valid[:, None], values, float("inf")))
        k_sum = tl.sum(k_sums, 0)  # [D]
        v_sum = tl.sum(v_sums, 0)
        v_max = tl.max(v_maxima, 0)
        v_min = tl.min(v_minima, 0)
    out = (batch_head.to(tl.int64) * num_chunks + chunk) * HEAD_DIM + tl.arange(0, HEAD_DIM)
    tl.store(k_sum_ptr + out, k_sum)
    tl.store(v_sum_ptr + out, v_sum)
    tl.store(v_max_ptr + out, v_max)
    tl.store(v_min_ptr + out, v_min)


@triton.jit
def _valid_key_count(key_lengths_ptr, num_blocks, BLOCKS: tl.constexpr):
    """The valid keys of a head (``key_lengths.sum()``), at least 1, as fp32 (exact: < 2^24)."""
    total = tl.zeros([BLOCKS], dtype=tl.int32)
    for start in range(0, num_blocks, BLOCKS):
        blocks = start + tl.arange(0, BLOCKS)
        total += tl.load(key_lengths_ptr + blocks, mask=blocks < num_blocks, other=0)
    return tl.maximum(tl.sum(total, 0), 1).to(tl.float32)


@triton.jit
def _finalize_stats_kernel(
    k_sum_ptr,
    v_sum_ptr,
    v_max_ptr,
    v_min_ptr,
    key_lengths_ptr,
    hadamard_ptr,
    stats_ptr,
    num_chunks,
    num_blocks,
    batch_heads,
    HEAD_DIM: tl.constexpr,
    CHUNK_ROWS: tl.constexpr,
    ROTATE_SUM: tl.constexpr,
    V_MAX: tl.constexpr = E4M3_MAX_C,
):
    """Grid ``(B * H,)``: the statistics kernel's ``[B*H, chunks, D]`` partials -> fp32
    ``stats[4, B*H, D]``: K's mean (its sum rotated here when ``ROTATE_SUM``), V's mean, V's
    scale and its inverse, as ``_finalize_stats`` computes them in torch (IEEE divisions; the
    sums over chunks in another order, so the same to fp32 rounding). One launch instead of the
    ~15 small torch ones that launch-bound the pre-pass at small shapes."""
    batch_head = tl.program_id(0)
    channels = tl.arange(0, HEAD_DIM)  # [D]
    count = _valid_key_count(key_lengths_ptr, num_blocks, 1024)
    k_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    v_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    v_max = tl.full([HEAD_DIM], float("-inf"), dtype=tl.float32)
    v_min = tl.full([HEAD_DIM], float("inf"), dtype=tl.float32)
    base = batch_head.to(tl.int64) * num_chunks * HEAD_DIM
    for start in range(0, num_chunks, CHUNK_ROWS):
        rows = start + tl.arange(0, CHUNK_ROWS)  # [R]
        inside = rows[:, None] < num_chunks  # [R, 1]
        offsets = base + rows[:, None] * HEAD_DIM + channels[None, :]  # [R, D]
        k_sum += tl.sum(tl.load(k_sum_ptr + offsets, mask=inside, other=0.0), 0)
        v_sum += tl.sum(tl.load(v_sum_ptr + offsets, mask=inside, other=0.0), 0)
        highs = tl.load(v_max_ptr + offsets, mask=inside, other=float("-inf"))
        lows = tl.load(v_min_ptr + offsets, mask=inside, other=float("inf"))
        v_max = tl.maximum(v_max, tl.max(highs, 0), propagate_nan=tl.PropagateNan.ALL)
        v_min = tl.minimum(v_min, tl.min(lows, 0), propagate_nan=tl.PropagateNan.ALL)
    if ROTATE_SUM:
        # k_sum @ H: [D] x [D, D] in fp32 (H is +-1, so each product is exact).
        hadamard = tl.load(hadamard_ptr + channels[:, None] * HEAD_DIM + channels[None, :])
        k_sum = tl.sum(k_sum[:, None] * hadamard.to(tl.float32), 0)
    k_mean = tl.math.div_rn(k_sum, count)
    v_mean = tl.math.div_rn(v_sum, count)
    v_amax = tl.maximum(
        tl.maximum(v_max - v_mean, v_mean - v_min, propagate_nan=tl.PropagateNan.ALL),
        TINY_AMAX_C,
        propagate_nan=tl.PropagateNan.ALL,
    )
    # No valid key at all: every extreme is infinite; any finite scale will do (NaN too).
    v_amax = tl.where(v_amax < float("inf"), v_amax, 1.0)
    out = batch_head.to(tl.int64) * HEAD_DIM + channels
    plane = batch_heads.to(tl.int64) * HEAD_DIM
    tl.store(stats_ptr + out, k_mean)
    tl.store(stats_ptr + plane + out, v_mean)
    # V_MAX: the largest value of V's 8-bit format (448 e4m3, 127 int8).
    tl.store(stats_ptr + 2 * plane + out, tl.math.div_rn(v_amax, V_MAX))
    tl.store(
        stats_ptr + 3 * plane + out,
        tl.math.div_rn(tl.full([HEAD_DIM], V_MAX, tl.float32), v_amax),
    )


@triton.jit
def _corrected_v_mean_kernel(
    v_mean_ptr,
    v_scale_ptr,
    error_sums_ptr,
    key_lengths_ptr,
    out_ptr,
    num_blocks,
    HEAD_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Grid ``(B * H,)``: ``v_mean - v_scale * (sum of error_sums over blocks) / valid keys``
    (``_debiased_v_mean`` in one launch; the block sum in another order than torch's)."""
    batch_head = tl.program_id(0)
    channels = tl.arange(0, HEAD_DIM)  # [D]
    count = _valid_key_count(key_lengths_ptr, num_blocks, 1024)
    error_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    base = batch_head.to(tl.int64) * num_blocks * HEAD_DIM
    for start in range(0, num_blocks, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)  # [R]
        offsets = base + rows[:, None] * HEAD_DIM + channels[None, :]  # [R, D]
        error_sum += tl.sum(
            tl.load(error_sums_ptr + offsets, mask=rows[:, None] < num_blocks, other=0.0), 0
        )
    out = batch_head.to(tl.int64) * HEAD_DIM + channels
    v_mean = tl.load(v_mean_ptr + out)
    v_scale = tl.load(v_scale_ptr + out)
    tl.store(out_ptr + out, v_mean - v_scale * tl.math.div_rn(error_sum, count))


@triton.jit
def _quantize_query_block(
    q_base,
    stride_qn,
    hadamard,
    block,
    in_range,
    seq_len,
    padded_len,
    batch_head,
    q8_ptr,
    q_scale_ptr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """Block ``block`` of one head's queries (rows past N read as zeros) -> INT8 per token.

    ``hadamard``: H ``[D, D]`` as loaded (read only when ``ROTATE``). ``in_range``: the
    block exists (a program's last blocks may not); nothing is stored for one that does not.
    """
    offsets = tl.arange(0, BLOCK_SIZE)  # [BS]
    cols = tl.arange(0, HEAD_DIM)  # [D]
    rows = block * BLOCK_SIZE + offsets  # [BS]
    padded_rows = batch_head.to(tl.int64) * padded_len + rows  # [BS], into [B*H, Np]
    queries = _load_rows(q_base, rows, stride_qn, (rows < seq_len) & in_range, HEAD_DIM)
    queries = _rotated(queries, hadamard, ROTATE)  # [BS, D] fp32
    q_amax = tl.maximum(tl.max(tl.abs(queries), 1), TINY_AMAX_C)  # [BS]
    # A tensor numerator: under the interpreter constexpr / tensor would stay a constexpr.
    q8 = round_half_even(queries * ((tl.zeros_like(q_amax) + INT8_MAX_C) / q_amax)[:, None])
    q8 = tl.minimum(tl.maximum(q8, -INT8_MAX_C), INT8_MAX_C)
    row_major = padded_rows[:, None] * HEAD_DIM + cols[None, :]  # [BS, D], into [B*H, Np, D]
    tl.store(q8_ptr + row_major, q8.to(tl.int8), mask=in_range)
    tl.store(q_scale_ptr + padded_rows, q_amax / INT8_MAX_C, mask=in_range)


@triton.jit
def _quantize_key_block(
    k_base,
    stride_kn,
    hadamard,
    block,
    in_range,
    key_lengths_ptr,
    k_mean_ptr,
    padded_len,
    num_blocks,
    batch_head,
    k8_ptr,
    k_scale_ptr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROTATE: tl.constexpr,
):
    """Block ``block`` of one head's keys, rotated and less their mean (padded keys 0) ->
    INT8 with one scale for the block. ``hadamard`` and ``in_range`` as for the queries."""
    offsets = tl.arange(0, BLOCK_SIZE)  # [BS]
    cols = tl.arange(0, HEAD_DIM)  # [D]
    rows = block * BLOCK_SIZE + offsets  # [BS]
    padded_rows = batch_head.to(tl.int64) * padded_len + rows  # [BS]
    # Lengths are clipped to N; a block past the last has none.
    key_length = tl.load(key_lengths_ptr + block, mask=in_range, other=0)
    valid = offsets < key_length  # [BS]
    keys = _rotated(_load_rows(k_base, rows, stride_kn, valid, HEAD_DIM), hadamard, ROTATE)
    stats = batch_head.to(tl.int64) * HEAD_DIM + cols  # [D]
    keys = tl.where(valid[:, None], keys - tl.load(k_mean_ptr + stats)[None, :], 0.0)
    k_amax = tl.maximum(tl.max(tl.max(tl.abs(keys), 1), 0), TINY_AMAX_C)
    k8 = round_half_even(keys * ((tl.zeros_like(k_amax) + INT8_MAX_C) / k_amax))
    k8 = tl.minimum(tl.maximum(k8, -INT8_MAX_C), INT8_MAX_C)
    row_major = padded_rows[:, None] * HEAD_DIM + cols[None, :]  # [BS, D]
    tl.store(k8_ptr + row_major, k8.to(tl.int8), mask=in_range)
    tl.store(k_scale_ptr + batch_head * num_blocks + block, k_amax / INT8_MAX_C, mask=in_range)


@triton.jit
def _quantize_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    hadamard_ptr,
    key_lengths_ptr,
    k_mean_ptr,
    v_mean_ptr,
    v_inverse_scale_ptr,
    q8_ptr,
    q_scale_ptr,
    k8_ptr,
    k_scale_ptr,
    v8_ptr,
    v_error_sum_ptr,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    num_heads,
    seq_len,
    padded_len,
    num_blocks,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROTATE: tl.constexpr,
    WGMMA_KEY_ORDER: tl.constexpr,
    PERMUTE_IN_REGISTERS: tl.constexpr = False,
    PARTS: tl.constexpr = 7,
    V_TERMS: tl.constexpr = 1,
    HARDWARE_E4M3: tl.constexpr = False,
    BLOCKS_PER_PROGRAM: tl.constexpr = 1,
    LOAD_STAGES: tl.constexpr = 1,
    V_INT8: tl.constexpr = False,
):
    """Grid ``(ceil(nb / BLOCKS_PER_PROGRAM), B * H)``: blocks of Q, K and V of one head into
    the 8-bit layouts.

    ``PERMUTE_IN_REGISTERS`` (set only with ``WGMMA_KEY_ORDER``): permute V's rows in registers
    and store them at token-order addresses, instead of storing each row at its permuted one.
    ``PARTS``: which tensors this launch quantizes (bits 1 Q, 2 K, 4 V): all three in one program,
    or one a launch, whose programs then hold one ``[BS, D]`` fp32 tile instead of three.
    ``V_TERMS`` 2: V^T is ``[B*H, 2 D, Np]``, rows ``D..2D-1`` holding the e4m3 rounding of what
    the first term missed (``centred - v8``), so the kernels' two P V products carry V to about
    7 mantissa bits. ``HARDWARE_E4M3`` (a GPU's launch): V is rounded to e4m3 by the conversion
    instruction (``cvt.rn.satfinite``: nearest even, saturating, the same values as
    ``round_to_e4m3``, which the interpreter runs) and permuted as bytes, not fp32.
    ``BLOCKS_PER_PROGRAM`` (Q's and K's parts; V's launch takes 1): a program quantizes that many
    consecutive blocks in a loop whose loads Triton's pipeliner issues ``LOAD_STAGES - 1``
    blocks ahead, straight into the shared memory the Hadamard product reads (one block a
    program stages each tile from registers, stalled on those stores: docs/kernel.md).
    ``V_INT8``: V is rounded to INT8 (nearest even; ``|centred| <= 127`` by its scale, the clamp
    only catches an ulp), one term.
    """
    batch_head = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    offsets = tl.arange(0, BLOCK_SIZE)  # [BS]
    cols = tl.arange(0, HEAD_DIM)  # [D]
    q_base = q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    k_base = k_ptr + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    hadamard = None
    if ROTATE and (PARTS & 3):
        hadamard = _load_hadamard(hadamard_ptr, HEAD_DIM)  # [D, D]
    first = tl.program_id(0) * BLOCKS_PER_PROGRAM
    for i in tl.range(0, BLOCKS_PER_PROGRAM, num_stages=LOAD_STAGES):
        block = first + i
        if PARTS & 1:
            _quantize_query_block(
                q_base,
                stride_qn,
                hadamard,
                block,
                block < num_blocks,
                seq_len,
                padded_len,
                batch_head,
                q8_ptr,
                q_scale_ptr,
                HEAD_DIM,
                BLOCK_SIZE,
                ROTATE,
            )
        if PARTS & 2:
            _quantize_key_block(
                k_base,
                stride_kn,
                hadamard,
                block,
                block < num_blocks,
                key_lengths_ptr,
                k_mean_ptr,
                padded_len,
                num_blocks,
                batch_head,
                k8_ptr,
                k_scale_ptr,
                HEAD_DIM,
                BLOCK_SIZE,
                ROTATE,
            )

    if PARTS & 4:
        tl.static_assert(BLOCKS_PER_PROGRAM == 1, "V's launch quantizes one block a program")
        block = tl.program_id(0)
        rows = block * BLOCK_SIZE + offsets  # [BS]
        stats = batch_head.to(tl.int64) * HEAD_DIM + cols  # [D]
        valid = offsets < tl.load(key_lengths_ptr + block)  # [BS]; lengths are clipped to N
        values = _load_rows(
            v_ptr + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh,
            rows,
            stride_vn,
            valid,
            HEAD_DIM,
        ).to(tl.float32)  # [BS, D]
        centred = (values - tl.load(v_mean_ptr + stats)[None, :]) * tl.load(
            v_inverse_scale_ptr + stats
        )[None, :]
        centred = tl.where(valid[:, None], centred, 0.0)  # padded keys: 0 in every term
        if V_INT8:
            v8 = tl.minimum(tl.maximum(round_half_even(centred), -INT8_MAX_C), INT8_MAX_C)
            v8_bytes = v8.to(tl.int8)  # [BS, D] int8, an exact conversion of an integer
        else:
            v8_bytes = _to_e4m3(centred, HARDWARE_E4M3)  # [BS, D] e4m3
            v8 = v8_bytes.to(tl.float32)
        if V_TERMS == 2:
            # What v8 missed, itself in e4m3 (exact in fp32: both are short-mantissa values).
            v8_low_bytes = _to_e4m3(centred - v8, HARDWARE_E4M3)
            error = v8 + v8_low_bytes.to(tl.float32) - centred
        else:
            error = v8 - centred
        # This block's sum of V's rounding error over its valid keys (a padded key's error is 0,
        # its centred value having been zeroed): quantize_qkv folds the mean error into v_mean.
        error_sum = tl.sum(error, 0)  # [D]
        error_row = (batch_head.to(tl.int64) * num_blocks + block) * HEAD_DIM + cols
        tl.store(v_error_sum_ptr + error_row, error_sum)  # [B*H, nb, D]
        # Transposed: [B*H, V_TERMS * D, Np], each program writing BLOCK_SIZE consecutive bytes
        # per channel. PERMUTE_IN_REGISTERS (wgmma order only): rows moved to their wgmma
        # positions before the store, whose addresses are then contiguous along keys (whole
        # vectors per channel).
        scattered = block * BLOCK_SIZE + _wgmma_position(offsets)
        positions = rows if PERMUTE_IN_REGISTERS else (scattered if WGMMA_KEY_ORDER else rows)
        channels = batch_head.to(tl.int64) * (V_TERMS * HEAD_DIM) + cols[None, :]  # [1, D]
        column_major = channels * padded_len + positions[:, None]  # [BS, D]
        if PERMUTE_IN_REGISTERS:
            v8_bytes = _rows_in_wgmma_order(v8_bytes, BLOCK_SIZE, HEAD_DIM)
        tl.store(v8_ptr + column_major, v8_bytes)
        if V_TERMS == 2:
            if PERMUTE_IN_REGISTERS:
                v8_low_bytes = _rows_in_wgmma_order(v8_low_bytes, BLOCK_SIZE, HEAD_DIM)
            low_rows = column_major + HEAD_DIM * padded_len
            tl.store(v8_ptr + low_rows, v8_low_bytes)


def _finalize_stats(
    k_sum: torch.Tensor,
    v_sum: torch.Tensor,
    v_max: torch.Tensor,
    v_min: torch.Tensor,
    valid_keys: torch.Tensor,
    v_max_value: float = E4M3_MAX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums/extremes ``[..., D]`` -> K mean, V mean, V scale and its inverse (all fp32);
    ``v_max_value``: the largest value of V's 8-bit format (``V_FORMAT_MAX``)."""
    count = valid_keys.clamp(min=1).to(torch.float32).expand_as(k_sum)
    k_mean = torch.div(k_sum, count)
    v_mean = torch.div(v_sum, count)
    v_amax = torch.maximum(v_max - v_mean, v_mean - v_min).clamp(min=TINY_AMAX)
    # No valid key at all: every extreme is infinite; any finite scale will do.
    v_amax = torch.where(torch.isfinite(v_amax), v_amax, torch.ones_like(v_amax))
    return k_mean, v_mean, _divided(v_amax, v_max_value), _reciprocal_times(v_max_value, v_amax)


def _debiased_v_mean(
    v_mean: torch.Tensor, v_scale: torch.Tensor, error_sum: torch.Tensor, valid_keys: torch.Tensor
) -> torch.Tensor:
    """V's mean minus its mean rounding error, all ``[..., D]`` fp32.

    ``error_sum`` is ``sum_j (v8_j - (v_j - v_mean) / v_scale)`` over the valid keys. The
    kernels' epilogue adds ``v_mean`` to ``sum_j p_j v8_j v_scale``; over many keys that sum
    carries the mean rounding error, which is systematic (its share of the output does not
    shrink with N while diffuse attention's output does), so it is taken out of the mean.
    """
    count = valid_keys.clamp(min=1).to(torch.float32)
    return v_mean - v_scale * torch.div(error_sum, count)


def _stats_partials(
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor,
    *,
    block_size: int,
    rotate_in_kernel: bool = False,
    blocks_per_program: int = STATS_BLOCKS_PER_PROGRAM,
    num_warps: int = STATS_NUM_WARPS,
    rows: int = STATS_ROWS,
) -> list[torch.Tensor]:
    """The statistics kernel alone: 4 fp32 ``[B*H, chunks, D]`` partials (see its docstring),
    views of one buffer. ``rows``: its ``ROWS`` (0, or a divisor of ``block_size``, at least
    16 with ``rotate_in_kernel``)."""
    if rows and (block_size % rows or rows < (16 if rotate_in_kernel else 1)):
        raise ValueError(f"stats rows must be 0 or divide block size {block_size}, got {rows}")
    batch, heads, _, head_dim = k.shape
    num_blocks = key_lengths.numel()
    chunks = -(-num_blocks // blocks_per_program)
    buffer = torch.empty(4, batch * heads, chunks, head_dim, device=k.device, dtype=torch.float32)
    partials = list(buffer.unbind(0))
    _key_value_stats_kernel[(chunks, batch * heads)](
        k,
        v,
        _kernel_hadamard(k),
        key_lengths,
        *partials,
        *k.stride()[:3],
        *v.stride()[:3],
        heads,
        num_blocks,
        chunks,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        ROTATE=rotate_in_kernel,
        ROWS=rows,
        num_warps=num_warps,
    )
    return partials


def _stats_from_partials(
    partials: list[torch.Tensor],
    key_lengths: torch.Tensor,
    shape: torch.Size,
    *,
    rotate_sum: bool,
    v_format: str = "e4m3",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The statistics kernel's partials -> ``key_value_stats``' result, in one launch
    (``_finalize_stats_kernel``). ``rotate_sum``: the kernel summed unrotated keys; K's sum is
    rotated here (``[D] x [D, D]`` in fp32, whatever TF32 setting the caller has)."""
    batch, heads, _, head_dim = shape
    batch_heads, chunks = partials[0].shape[:2]
    stats = torch.empty(4, batch, heads, head_dim, device=partials[0].device, dtype=torch.float32)
    _finalize_stats_kernel[(batch_heads,)](
        *partials,
        key_lengths,
        _cached_hadamard(head_dim, partials[0].device, torch.float32),
        stats,
        chunks,
        key_lengths.numel(),
        batch_heads,
        HEAD_DIM=head_dim,
        CHUNK_ROWS=FINALIZE_CHUNK_ROWS,
        ROTATE_SUM=rotate_sum,
        V_MAX=V_FORMAT_MAX[v_format],
        num_warps=4,
    )
    return tuple(stats.unbind(0))


def key_value_stats(
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor,
    *,
    block_size: int,
    rotate: bool,
    blocks_per_program: int = STATS_BLOCKS_PER_PROGRAM,
    num_warps: int = STATS_NUM_WARPS,
    rotate_in_kernel: bool = False,
    v_format: str = "e4m3",
    rows: int = STATS_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1 on the device: ``(k_mean, v_mean, v_scale, v_inverse_scale)``, each fp32 [B, H, D].

    ``k_mean`` is in the rotated basis when ``rotate``: the kernel sums the keys and the sum is
    rotated afterwards, or (``rotate_in_kernel``) the kernel rotates every key on the tensor
    cores first; the two agree to fp32 rounding. ``v_mean`` is V's plain mean over the valid
    keys (what V is centred on), before the rounding-error correction ``QuantizedQKV.v_mean``
    carries. ``blocks_per_program`` and ``rows`` change the order of the sums (so the last bits
    of the means), ``num_warps`` nothing but speed. ``v_format``: V's scale is amax over 448
    ("e4m3") or over 127 ("int8").
    """
    partials = _stats_partials(
        k,
        v,
        key_lengths,
        block_size=block_size,
        rotate_in_kernel=rotate and rotate_in_kernel,
        blocks_per_program=blocks_per_program,
        num_warps=num_warps,
        rows=rows,
    )
    return _stats_from_partials(
        partials,
        key_lengths,
        k.shape,
        rotate_sum=rotate and not rotate_in_kernel,
        v_format=v_format,
    )


def _check_v_terms(v_terms: int, v_format: str = "e4m3") -> None:
    if v_format not in V_FORMATS:
        raise ValueError(f"v_format must be one of {V_FORMATS}, got {v_format!r}")
    if v_terms not in (1, 2):
        raise ValueError(f"v_terms must be 1 or 2, got {v_terms!r}")
    if v_format == "int8" and v_terms != 1:
        raise ValueError("INT8 V (v_format='int8') is one term: v_terms must be 1")


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one shape [B, H, N, D], got {tuple(q.shape)}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v need unit stride along D")
    if block_size not in (64, 128):
        raise ValueError(f"8-bit attention needs block_size 64 or 128, got {block_size}")


def quantize_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    key_lengths: torch.Tensor,
    rotate: bool = True,
    key_order: str = "natural",
    v_terms: int = 1,
    v_format: str = "e4m3",
) -> QuantizedQKV:
    """The pre-pass (six Triton launches, no torch arithmetic).

    Args:
        q, k, v: ``[B, H, N, D]`` fp16/bf16 (fp32 works too), unit stride along D.
        block_size: tokens per mask block (64 or 128): K's scale group.
        key_lengths: int32 ``[nb]`` valid keys per block, clipped to N (``BlockLUT.key_lengths``).
        rotate: apply the Hadamard rotation to Q and K.
        key_order: "natural" (token order) or "wgmma" (V^T's keys in ``wgmma_key_order``, what
            the Gluon kernel reads).
        v_terms: 1 (V in one e4m3 term) or 2 (and its rounding error in a second: the kernels
            then run P V twice, for V at about 7 mantissa bits; see ``QuantizedQKV.v_t``).
        v_format: "e4m3" (FP8 P V) or "int8" (V in INT8, one term: the kernels run P V in INT8
            with P rounded against each tile's own max; docs/kernel.md, "INT8 P V").
    """
    return _launch_prepass(
        q,
        k,
        v,
        block_size=block_size,
        key_lengths=key_lengths,
        rotate=rotate,
        key_order=key_order,
        v_terms=v_terms,
        v_format=v_format,
    )


def _launch_prepass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    key_lengths: torch.Tensor,
    rotate: bool = True,
    key_order: str = "natural",
    stats_blocks_per_program: int = STATS_BLOCKS_PER_PROGRAM,
    stats_num_warps: int = STATS_NUM_WARPS,
    stats_rotate_in_kernel: bool = False,
    stats_rows: int = STATS_ROWS,
    quantize_num_warps: int = QUANTIZE_NUM_WARPS,
    permute_in_registers: bool = PERMUTE_IN_REGISTERS,
    split_quantize: bool = SPLIT_QUANTIZE,
    v_terms: int = 1,
    hardware_e4m3: bool | None = None,
    qk_blocks_per_program: int = QK_BLOCKS_PER_PROGRAM,
    qk_load_stages: int = QK_LOAD_STAGES,
    v_format: str = "e4m3",
) -> QuantizedQKV:
    """:func:`quantize_qkv` with its launch parameters (``benchmarks/bench_prepass.py`` times
    them): the statistics kernel's key blocks per program, warps and rows a step and whether it
    rotates every key (``key_value_stats``' ``rotate_in_kernel``), the quantization kernel's
    warps, and with ``key_order="wgmma"`` whether V's rows are permuted in registers before a
    token-order store (``_quantize_kernel``'s ``PERMUTE_IN_REGISTERS``), and whether Q, K and V are
    quantized by one launch or one each (``split_quantize``), and whether V is rounded by the
    conversion instruction (``hardware_e4m3``; default: wherever it runs, not the interpreter),
    and with split launches how many key blocks a program of Q's and K's quantizes in a loop
    and how deep that loop's loads are pipelined (``qk_blocks_per_program``,
    ``qk_load_stages``)."""
    if key_order not in ("natural", "wgmma"):
        raise ValueError(f"key_order must be 'natural' or 'wgmma', got {key_order!r}")
    _check_v_terms(v_terms, v_format)
    _check_inputs(q, k, v, block_size)
    stats = key_value_stats(
        k,
        v,
        key_lengths,
        block_size=block_size,
        rotate=rotate,
        blocks_per_program=stats_blocks_per_program,
        num_warps=stats_num_warps,
        rotate_in_kernel=stats_rotate_in_kernel,
        v_format=v_format,
        rows=stats_rows,
    )
    outputs = _quantize_blocks(
        q,
        k,
        v,
        key_lengths,
        stats,
        block_size=block_size,
        rotate=rotate,
        key_order=key_order,
        num_warps=quantize_num_warps,
        permute_in_registers=permute_in_registers,
        split_parts=split_quantize,
        v_terms=v_terms,
        hardware_e4m3=hardware_e4m3,
        qk_blocks_per_program=qk_blocks_per_program,
        qk_load_stages=qk_load_stages,
        v_format=v_format,
    )
    return _assemble(outputs, stats, key_lengths, block_size, q.shape[2], rotate, key_order)


def _quantize_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_lengths: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    block_size: int,
    rotate: bool,
    key_order: str,
    num_warps: int = QUANTIZE_NUM_WARPS,
    permute_in_registers: bool = PERMUTE_IN_REGISTERS,
    split_parts: bool = SPLIT_QUANTIZE,
    v_terms: int = 1,
    hardware_e4m3: bool | None = None,
    qk_blocks_per_program: int = QK_BLOCKS_PER_PROGRAM,
    qk_load_stages: int = QK_LOAD_STAGES,
    v_format: str = "e4m3",
) -> tuple[torch.Tensor, ...]:
    """The quantization kernel alone: ``(q8, q_scale, k8, k_scale, v8, v_error_sums)``.

    ``split_parts``: three launches (Q, K, V apart) instead of one that quantizes all three;
    then Q's and K's programs take ``qk_blocks_per_program`` blocks each, their loads
    ``qk_load_stages`` deep (in one launch, a block each).
    """
    if qk_blocks_per_program < 1 or qk_load_stages < 1:
        raise ValueError("qk_blocks_per_program and qk_load_stages must be >= 1")
    batch, heads, seq_len, head_dim = q.shape
    num_blocks = key_lengths.numel()
    padded_len = num_blocks * block_size
    k_mean, v_mean, _, v_inverse_scale = stats
    device = q.device
    q8 = torch.empty(batch, heads, padded_len, head_dim, device=device, dtype=torch.int8)
    k8 = torch.empty_like(q8)
    v_dtype = torch.int8 if v_format == "int8" else torch.float8_e4m3fn
    v8 = torch.empty(batch, heads, v_terms * head_dim, padded_len, device=device, dtype=v_dtype)
    q_scale = torch.empty(batch, heads, padded_len, device=device, dtype=torch.float32)
    k_scale = torch.empty(batch, heads, num_blocks, device=device, dtype=torch.float32)
    v_error_sums = torch.empty(
        batch * heads, num_blocks, head_dim, device=device, dtype=torch.float32
    )
    hadamard = _kernel_hadamard(q)
    for parts in (1, 2, 4) if split_parts else (7,):
        # One launch for all three tensors quantizes V too: one block a program.
        blocks_per_program = qk_blocks_per_program if parts in (1, 2) else 1
        grid = (triton.cdiv(num_blocks, blocks_per_program), batch * heads)
        _quantize_kernel[grid](
            q,
            k,
            v,
            hadamard,
            key_lengths,
            k_mean,
            v_mean,
            v_inverse_scale,
            q8,
            q_scale,
            k8,
            k_scale,
            v8,
            v_error_sums,
            *q.stride()[:3],
            *k.stride()[:3],
            *v.stride()[:3],
            heads,
            seq_len,
            padded_len,
            num_blocks,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            ROTATE=rotate,
            WGMMA_KEY_ORDER=key_order == "wgmma",
            PERMUTE_IN_REGISTERS=permute_in_registers and key_order == "wgmma",
            PARTS=parts,
            V_TERMS=v_terms,
            HARDWARE_E4M3=not interpreting() if hardware_e4m3 is None else hardware_e4m3,
            BLOCKS_PER_PROGRAM=blocks_per_program,
            LOAD_STAGES=qk_load_stages if blocks_per_program > 1 else 1,
            V_INT8=v_format == "int8",
            num_warps=num_warps,
        )
    return q8, q_scale, k8, k_scale, v8, v_error_sums


def _assemble(
    outputs: tuple[torch.Tensor, ...],
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key_lengths: torch.Tensor,
    block_size: int,
    seq_len: int,
    rotate: bool,
    key_order: str,
) -> QuantizedQKV:
    """The kernels' outputs -> :class:`QuantizedQKV`, V's mean corrected in one launch
    (``_corrected_v_mean_kernel``; ``_debiased_v_mean`` is the same in torch)."""
    q8, q_scale, k8, k_scale, v8, v_error_sums = outputs
    k_mean, v_mean, v_scale, _ = stats
    corrected_mean = torch.empty_like(v_mean)
    _corrected_v_mean_kernel[(v_error_sums.shape[0],)](
        v_mean,
        v_scale,
        v_error_sums,
        key_lengths,
        corrected_mean,
        key_lengths.numel(),
        HEAD_DIM=v_mean.shape[-1],
        BLOCK_ROWS=CORRECTION_BLOCK_ROWS,
        num_warps=4,
    )
    return QuantizedQKV(
        q8,
        q_scale,
        k8,
        k_scale,
        v8,
        v_scale,
        corrected_mean,
        k_mean,
        block_size,
        seq_len,
        rotate,
        wgmma_key_order=key_order == "wgmma",
    )


def _round_half_even(x: torch.Tensor) -> torch.Tensor:
    return (x + ROUNDING_MAGIC) - ROUNDING_MAGIC


def _reciprocal_times(numerator: float, x: torch.Tensor) -> torch.Tensor:
    """``numerator / x`` as one IEEE division (``numerator / x`` in torch multiplies by 1/x)."""
    return torch.div(torch.full_like(x, numerator), x)


def _divided(x: torch.Tensor, denominator: float) -> torch.Tensor:
    """``x / denominator`` as one IEEE division (torch divides by a Python number through its
    reciprocal), as the kernels divide."""
    return torch.div(x, torch.full_like(x, denominator))


def _int8(x: torch.Tensor) -> torch.Tensor:
    return _round_half_even(x).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> float8_e4m3fn, nearest even, saturating: what the kernels' rounding gives."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def emulate_quantize_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    key_lengths: torch.Tensor,
    rotate: bool = True,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    v_terms: int = 1,
    v_format: str = "e4m3",
) -> QuantizedQKV:
    """:func:`quantize_qkv` in torch, op for op in fp32 (the rotation exact, then rounded).

    ``stats`` (``key_value_stats``' result) replaces the torch statistics, whose sums run in
    another order than the kernel's; with it the output bits match the kernel's (see the module
    docstring for the rotation's rare ulp), except ``v_mean``: its rounding-error correction is
    summed in another order, so it agrees to fp32 rounding, not bit for bit.
    """
    _check_inputs(q, k, v, block_size)
    _check_v_terms(v_terms, v_format)
    batch, heads, seq_len, head_dim = q.shape
    num_blocks = key_lengths.numel()
    padded_len = num_blocks * block_size
    pad = (0, 0, 0, padded_len - seq_len)
    offsets = torch.arange(padded_len, device=q.device)
    lengths = key_lengths.to(q.device).long()
    valid = (offsets % block_size) < lengths[offsets // block_size]  # [Np]
    hadamard = hadamard_matrix(head_dim, q.device, torch.float64)

    def rotated(x: torch.Tensor) -> torch.Tensor:  # [B, H, Np, D] fp32
        x = torch.nn.functional.pad(x.float(), pad)
        return (x.double() @ hadamard).float() if rotate else x

    queries = rotated(q)
    keys = torch.where(valid[:, None], rotated(k), 0.0)
    values = torch.where(valid[:, None], torch.nn.functional.pad(v.float(), pad), 0.0)
    if stats is None:
        count = valid.sum()
        stats = _finalize_stats(
            keys.sum(2),
            values.sum(2),
            torch.where(valid[:, None], values, -math.inf).amax(2),
            torch.where(valid[:, None], values, math.inf).amin(2),
            count,
            V_FORMAT_MAX[v_format],
        )
    k_mean, v_mean, v_scale, v_inverse_scale = stats

    q_amax = queries.abs().amax(-1).clamp(min=TINY_AMAX)  # [B, H, Np]
    q8 = _int8(queries * _reciprocal_times(INT8_MAX, q_amax)[..., None])
    keys = torch.where(valid[:, None], keys - k_mean[:, :, None], 0.0)
    blocks = keys.reshape(batch, heads, num_blocks, block_size * head_dim)
    k_amax = blocks.abs().amax(-1).clamp(min=TINY_AMAX)  # [B, H, nb]
    k8 = _int8(blocks * _reciprocal_times(INT8_MAX, k_amax)[..., None]).reshape(keys.shape)
    centred = (values - v_mean[:, :, None]) * v_inverse_scale[:, :, None]
    centred = torch.where(valid[:, None], centred, 0.0)
    v8 = _int8(centred) if v_format == "int8" else to_e4m3(centred)  # [B, H, Np, D]
    represented = v8.float()
    if v_terms == 2:
        v8_low = to_e4m3(torch.where(valid[:, None], centred - v8.float(), 0.0))
        represented = represented + v8_low.float()
        v8 = torch.cat([v8, v8_low], -1)  # [B, H, Np, 2 D]: transposed below to [B, H, 2 D, Np]
    error = torch.where(valid[:, None], represented - centred, 0.0)
    # Per block, then over blocks, as the kernel adds them up (within a block the order differs).
    error_sum = error.view(batch, heads, num_blocks, block_size, head_dim).sum(3).sum(2)
    v_mean = _debiased_v_mean(v_mean, v_scale, error_sum, valid.sum())
    v8 = v8.transpose(-1, -2).contiguous()
    return QuantizedQKV(
        q8.contiguous(),
        _divided(q_amax, INT8_MAX),
        k8.contiguous(),
        _divided(k_amax, INT8_MAX),
        v8,
        v_scale,
        v_mean,
        k_mean,
        block_size,
        seq_len,
        rotate,
    )
