"""The 8-bit pre-pass (compact_search/runtime/kernels/quantize.py) under the Triton interpreter.

The kernels' rounding (INT8 nearest-even, FP8 e4m3 nearest-even saturating) is written in float
arithmetic so the interpreter computes what a GPU does; these tests hold it to torch's rounding
bit for bit, and the whole pre-pass to its torch emulation.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from fp8_cases import attention_inputs, padded_key_lengths, relative_l2

from compact_search.geometry import valid_block_lengths
from compact_search.runtime.quantize import (
    E4M3_MAX,
    STATS_BLOCKS_PER_PROGRAM,
    STATS_ROWS,
    _kernel_hadamard,
    _launch_prepass,
    emulate_quantize_qkv,
    hadamard_matrix,
    key_value_stats,
    natural_key_order,
    quantize_qkv,
    round_half_even,
    round_to_e4m3,
    to_e4m3,
    wgmma_key_order,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs under TRITON_INTERPRET=1 (make test)"
)


@triton.jit
def _rounding_kernel(x_ptr, fp8_ptr, int_ptr, SIZE: tl.constexpr):
    offsets = tl.arange(0, SIZE)
    x = tl.load(x_ptr + offsets)
    tl.store(fp8_ptr + offsets, round_to_e4m3(x).to(tl.float8e4nv))
    tl.store(int_ptr + offsets, round_half_even(x))


def _hard_values() -> torch.Tensor:
    """Every finite e4m3 value, every midpoint between neighbours (ties), the fp32 values just
    beside each midpoint, saturation and the subnormal range, random magnitudes, both signs."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.unique(codes[torch.isfinite(codes)])  # ascending
    midpoints = (grid[1:] + grid[:-1]) / 2
    above, below = torch.nextafter(midpoints, grid[1:]), torch.nextafter(midpoints, grid[:-1])
    beside = torch.cat([above, below])
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.exp2(torch.empty(4000).uniform_(-14, 9.5, generator=generator))
    extremes = torch.tensor([0.0, 447.9, 448.0, 449.0, 463.9, 464.0, 479.0, 2.0**-10, 2.0**-9])
    values = torch.cat([grid, midpoints, beside, magnitudes, extremes])
    values = torch.cat([values, -values])
    size = triton.next_power_of_2(values.numel())
    return torch.nn.functional.pad(values, (0, size - values.numel()))


def test_fp8_rounding_matches_torch_bit_for_bit() -> None:
    x = _hard_values()
    fp8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    integers = torch.empty_like(x)
    _rounding_kernel[(1,)](x, fp8, integers, SIZE=x.numel())
    expected = to_e4m3(x)
    assert torch.equal(fp8.view(torch.uint8), expected.view(torch.uint8))
    assert fp8.float().abs().max() == E4M3_MAX  # saturated, never NaN


def test_integer_rounding_is_nearest_even() -> None:
    halves = torch.arange(-260, 260, dtype=torch.float32) / 2  # every tie from -130 to 129.5
    generator = torch.Generator().manual_seed(1)
    x = torch.cat([halves, torch.empty(1528).uniform_(-128, 128, generator=generator)])
    fp8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    integers = torch.empty_like(x)
    _rounding_kernel[(1,)](x, fp8, integers, SIZE=x.numel())
    assert torch.equal(integers, torch.round(x))  # torch.round is nearest-even


def test_hadamard_matrix_is_orthogonal_up_to_its_dimension() -> None:
    for dim in (64, 128):
        matrix = hadamard_matrix(dim)
        assert torch.equal(matrix @ matrix.T, dim * torch.eye(dim))
        assert set(matrix.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(96)


def test_the_kernels_hadamard_matrix_is_built_once_per_dim_device_and_dtype() -> None:
    x = torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16)
    first = _kernel_hadamard(x)
    assert _kernel_hadamard(x.clone()) is first  # no ~20 concatenations a call
    assert torch.equal(first, hadamard_matrix(64, dtype=first.dtype))
    assert _kernel_hadamard(torch.zeros(1, 1, 4, 128)).shape == (128, 128)


CASES = [
    # (batch, heads, seq_len, head_dim, block_size, padded keys, rotate)
    (2, 3, 300, 64, 128, False, True),
    (1, 2, 1000, 128, 64, True, True),
    (1, 1, 63, 64, 64, False, False),
]


def _case_id(case) -> str:
    batch, heads, seq_len, head_dim, block_size, padded, rotate = case
    name = f"B{batch}-H{heads}-N{seq_len}-d{head_dim}-bs{block_size}"
    return name + ("-padded-keys" if padded else "") + ("" if rotate else "-no-rotation")


def _inputs(case):
    batch, heads, seq_len, head_dim, block_size, padded, rotate = case
    q, k, v = attention_inputs("gaussian", (batch, heads, seq_len, head_dim), seed=seq_len)
    num_blocks = -(-seq_len // block_size)
    lengths = (
        padded_key_lengths(num_blocks, block_size, seed=seq_len)
        if padded
        else valid_block_lengths(seq_len, block_size)
    )
    lengths = torch.minimum(lengths, valid_block_lengths(seq_len, block_size))
    return q, k, v, lengths, block_size, rotate


# V's formats: (v_format, v_terms).
V_FORMATS = [("e4m3", 1), ("e4m3", 2), ("int8", 1)]
V_FORMAT_IDS = ["one-v-term", "two-v-terms", "int8-v"]


@pytest.mark.parametrize("v_format, v_terms", V_FORMATS, ids=V_FORMAT_IDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_prepass_matches_its_torch_emulation(case, v_format: str, v_terms: int) -> None:
    q, k, v, lengths, block_size, rotate = _inputs(case)
    arguments = dict(block_size=block_size, key_lengths=lengths, rotate=rotate)
    arguments |= dict(v_terms=v_terms, v_format=v_format)
    got = quantize_qkv(q, k, v, **arguments)
    stats = key_value_stats(k, v, lengths, block_size=block_size, rotate=rotate, v_format=v_format)
    want = emulate_quantize_qkv(q, k, v, **arguments, stats=stats)
    assert got.v_terms == want.v_terms == v_terms
    assert got.v_format == want.v_format == v_format
    if v_format == "int8":
        # Every value an integer within +-127, and each channel's largest |v - mean| at 127.
        assert got.v_t.dtype == torch.int8 and got.v_t.abs().max() <= 127
        assert (got.v_t.abs().amax(-1) == 127).float().mean() > 0.9
    assert torch.equal(got.v_t.view(torch.uint8), want.v_t.view(torch.uint8))
    # The same rounding errors summed in another order: the mean error (in units of the scale)
    # agrees to fp32 rounding, and the corrected mean to that times the scale plus an ulp.
    assert not torch.equal(want.v_mean, stats[1]), "no rounding-error correction"
    mean_gap = (got.v_mean - want.v_mean).abs()
    assert (mean_gap <= 1e-5 * got.v_scale + 2.0**-23 * want.v_mean.abs()).all()
    if rotate:
        # The emulation rotates exactly; the kernel sums D products in fp32, which can land one
        # ulp away when a row's entries span many binades: then an amax (so a scale) moves by an
        # ulp, or a value at a rounding boundary by one integer step. Rarely.
        for name in ("q", "k"):
            off = (getattr(got, name).int() - getattr(want, name).int()).abs()
            assert off.max() <= 1 and off.float().mean() < 1e-4, name
        for name in ("q_scale", "k_scale"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=0, rtol=3e-7)
    else:
        assert torch.equal(got.q, want.q) and torch.equal(got.k, want.k)
        assert torch.equal(got.q_scale, want.q_scale) and torch.equal(got.k_scale, want.k_scale)

    # The kernel's statistics (chunked sums) agree with plain torch sums to fp32 rounding.
    plain = emulate_quantize_qkv(q, k, v, **arguments)
    torch.testing.assert_close(got.k_mean, plain.k_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.v_mean, plain.v_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.v_scale, plain.v_scale, atol=0, rtol=1e-6)


LAUNCH_VARIANTS = [
    (CASES[0], {"permute_in_registers": True}),
    (CASES[1], {"permute_in_registers": True, "quantize_num_warps": 4}),
    (CASES[1], {"stats_blocks_per_program": 3, "stats_num_warps": 8}),  # 16 blocks: a short chunk
    (CASES[1], {"stats_blocks_per_program": 1}),
    (CASES[0], {"stats_rotate_in_kernel": True}),
    # The statistics kernel's rows a step: whole blocks reduced as they load (the former kernel),
    # 32 rows, and 16 rows of keys rotated in the kernel.
    (CASES[1], {"stats_rows": 0}),
    (CASES[0], {"stats_rows": 32, "stats_num_warps": 8}),
    (CASES[1], {"stats_rows": 16, "stats_rotate_in_kernel": True}),
    (CASES[0], {"split_quantize": False}),
    (CASES[1], {"split_quantize": False, "permute_in_registers": False}),
    # Q's and K's programs looping over blocks: 16 blocks in programs of 3 (a short last one).
    (CASES[1], {"qk_blocks_per_program": 3, "qk_load_stages": 2}),
    (CASES[0], {"qk_blocks_per_program": 4, "qk_load_stages": 3}),
    (CASES[2], {"qk_blocks_per_program": 2, "qk_load_stages": 2}),  # no rotation
]


@pytest.mark.parametrize(
    "case, variant",
    LAUNCH_VARIANTS,
    ids=[
        _case_id(c) + "-" + "-".join(f"{k}={v}" for k, v in o.items()) for c, o in LAUNCH_VARIANTS
    ],
)
def test_prepass_launch_variants_compute_the_same(case, variant) -> None:
    q, k, v, lengths, block_size, rotate = _inputs(case)
    arguments = dict(block_size=block_size, key_lengths=lengths, rotate=rotate, key_order="wgmma")
    default = quantize_qkv(q, k, v, **arguments)
    got = _launch_prepass(q, k, v, **arguments, **variant)
    bits = lambda t: t.view(torch.uint8)  # noqa: E731
    blocks_per_program = variant.get("stats_blocks_per_program", STATS_BLOCKS_PER_PROGRAM)
    rotate_in_kernel = variant.get("stats_rotate_in_kernel", False)
    rows = variant.get("stats_rows", STATS_ROWS)
    stats = key_value_stats(
        k,
        v,
        lengths,
        block_size=block_size,
        rotate=rotate,
        blocks_per_program=blocks_per_program,
        rotate_in_kernel=rotate_in_kernel,
        rows=rows,
    )
    want = emulate_quantize_qkv(
        q, k, v, block_size=block_size, key_lengths=lengths, rotate=rotate, stats=stats
    )
    assert got.wgmma_key_order
    assert torch.equal(bits(natural_key_order(got.v_t)), bits(want.v_t))
    defaults = blocks_per_program == STATS_BLOCKS_PER_PROGRAM and rows == STATS_ROWS
    if defaults and not rotate_in_kernel:
        for name in ("q", "q_scale", "k", "k_scale", "v_scale", "v_mean", "k_mean"):
            assert torch.equal(getattr(got, name), getattr(default, name)), name
        assert torch.equal(bits(got.v_t), bits(default.v_t))
    else:  # the statistics are summed in another order: the same to fp32 rounding
        torch.testing.assert_close(got.k_mean, default.k_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.v_mean, default.v_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.v_scale, default.v_scale, atol=0, rtol=1e-6)


@pytest.mark.parametrize("case", CASES[1:2], ids=_case_id)
def test_prepass_layout_and_dequantization(case) -> None:
    q, k, v, lengths, block_size, rotate = _inputs(case)
    seq_len, head_dim = q.shape[2], q.shape[3]
    got = quantize_qkv(q, k, v, block_size=block_size, key_lengths=lengths, rotate=rotate)
    padded_len = got.q.shape[2]
    assert padded_len == lengths.numel() * block_size
    assert got.v_t.shape == (*q.shape[:2], head_dim, padded_len)
    offsets = torch.arange(padded_len)
    valid = (offsets % block_size) < lengths.long()[offsets // block_size]
    assert not got.k[:, :, ~valid].any() and not got.v_t.float()[..., ~valid].any()
    assert not got.q[:, :, seq_len:].any()

    hadamard = hadamard_matrix(head_dim)
    q_back = (got.q.float() * got.q_scale[..., None]) @ hadamard.T / head_dim
    # Each rotated entry is off by at most half a step; H^T / D averages D of them with signs.
    half_step = got.q_scale[:, :, :seq_len, None] / 2
    assert ((q_back[:, :, :seq_len] - q.float()).abs() <= half_step * 1.0001).all()
    # Each value is rounded around the plain mean, the one it was centred on.
    v_mean = key_value_stats(k, v, lengths, block_size=block_size, rotate=rotate)[1]
    v_back = got.v_t.float().transpose(-1, -2) * got.v_scale[:, :, None] + v_mean[:, :, None]
    error = (v_back - torch.nn.functional.pad(v.float(), (0, 0, 0, padded_len - seq_len)))[
        :, :, valid
    ]
    # e4m3 keeps 3 mantissa bits: at most half a step, 1/16 of the centred value's magnitude,
    # or half the subnormal step 2^-9 (times the channel scale) near zero.
    centred = (v.float() - v_mean[:, :, None]).abs()
    bound = torch.maximum(centred / 16, 2.0**-10 * got.v_scale[:, :, None])
    bound = torch.nn.functional.pad(bound, (0, 0, 0, padded_len - seq_len))[:, :, valid]
    assert (error.abs() <= bound * 1.0001).all()


@pytest.mark.parametrize("case", CASES[:2], ids=_case_id)
def test_two_v_terms_carry_v_to_seven_mantissa_bits(case) -> None:
    q, k, v, lengths, block_size, rotate = _inputs(case)
    seq_len, head_dim = q.shape[2], q.shape[3]
    arguments = dict(block_size=block_size, key_lengths=lengths, rotate=rotate)
    one = quantize_qkv(q, k, v, **arguments)
    got = quantize_qkv(q, k, v, **arguments, v_terms=2)
    padded_len = got.q.shape[2]
    assert got.v_t.shape == (*q.shape[:2], 2 * head_dim, padded_len)
    # The first term is the one-term V^T, and everything else but V's mean is unchanged.
    assert torch.equal(got.v_t[:, :, :head_dim].view(torch.uint8), one.v_t.view(torch.uint8))
    for name in ("q", "q_scale", "k", "k_scale", "v_scale"):
        assert torch.equal(getattr(got, name), getattr(one, name)), name
    offsets = torch.arange(padded_len)
    valid = (offsets % block_size) < lengths.long()[offsets // block_size]
    assert not got.v_t.float()[..., ~valid].any(), "padded keys must stay zero in both terms"
    assert got.v_t.float()[:, :, head_dim:][..., valid].any(), "second term never written"

    v_mean = key_value_stats(k, v, lengths, block_size=block_size, rotate=rotate)[1]
    centred = torch.nn.functional.pad(
        v.float() - v_mean[:, :, None], (0, 0, 0, padded_len - seq_len)
    )
    back = got.v_values().transpose(-1, -2) * got.v_scale[:, :, None]  # [B, H, Np, D]
    error = (back - centred)[:, :, valid]
    # Half a step of the second term: 1/256 of the centred value, or half the subnormal step
    # 2^-9 (times the channel scale) where the first term's rounding error is that small.
    bound = torch.maximum(centred.abs() / 256, 2.0**-10 * got.v_scale[:, :, None])[:, :, valid]
    assert (error.abs() <= bound * 1.0001).all()
    one_error = (one.v_values().transpose(-1, -2) * one.v_scale[:, :, None] - centred)[:, :, valid]
    assert error.norm() < one_error.norm() / 8


def test_prepass_rejects_unknown_v_formats_and_two_int8_terms() -> None:
    q, k, v, lengths, block_size, _ = _inputs(CASES[0])
    for quantize in (quantize_qkv, emulate_quantize_qkv):
        with pytest.raises(ValueError, match="v_format"):
            quantize(q, k, v, block_size=block_size, key_lengths=lengths, v_format="e5m2")
        with pytest.raises(ValueError, match="one term"):
            quantize(
                q, k, v, block_size=block_size, key_lengths=lengths, v_format="int8", v_terms=2
            )


def test_prepass_rejects_a_third_v_term() -> None:
    q, k, v, lengths, block_size, rotate = _inputs(CASES[0])
    for quantize in (quantize_qkv, emulate_quantize_qkv):
        with pytest.raises(ValueError, match="v_terms"):
            quantize(q, k, v, block_size=block_size, key_lengths=lengths, v_terms=3)


def test_padded_keys_never_reach_the_statistics() -> None:
    q, k, v, lengths, block_size, rotate = _inputs(CASES[1])
    offsets = torch.arange(q.shape[2])
    padding = (offsets % block_size) >= lengths.long()[offsets // block_size]
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[:, :, padding] = float("nan")
    v_poisoned[:, :, padding] = 1e4
    clean = quantize_qkv(q, k, v, block_size=block_size, key_lengths=lengths)
    poisoned = quantize_qkv(q, k_poisoned, v_poisoned, block_size=block_size, key_lengths=lengths)
    assert torch.equal(clean.k, poisoned.k) and torch.equal(clean.k_scale, poisoned.k_scale)
    assert torch.equal(clean.v_t.view(torch.uint8), poisoned.v_t.view(torch.uint8))
    assert torch.equal(clean.v_scale, poisoned.v_scale)
    assert torch.equal(clean.v_mean, poisoned.v_mean)


@pytest.mark.parametrize("quantize", [quantize_qkv, emulate_quantize_qkv], ids=["kernel", "torch"])
def test_v_mean_cancels_the_mean_rounding_error_over_valid_keys(quantize) -> None:
    # Odd N (the last block is short) and padded blocks (block 1 has no valid key), whose
    # values would pull the mean if they took part.
    q, k, v = attention_inputs("gaussian", (1, 2, 777, 64), seed=11)
    lengths = torch.minimum(padded_key_lengths(7, 128, seed=11), valid_block_lengths(777, 128))
    got = quantize(q, k, v, block_size=128, key_lengths=lengths)
    offsets = torch.arange(777)
    valid = (offsets % 128) < lengths.long()[offsets // 128]
    assert not valid.all()
    v_back = got.v_t.float()[..., :777].transpose(-1, -2) * got.v_scale[:, :, None]
    v_back = v_back + got.v_mean[:, :, None]  # [B, H, N, D], what P V reads back
    mean_error = (v_back - v.float())[:, :, valid].mean(2)  # [B, H, D]
    # Without the correction it is a sizeable share of a scale step (up to ~1 on 700 keys).
    plain_mean = v.float()[:, :, valid].mean(2)
    assert ((got.v_mean - plain_mean).abs() > 0.05 * got.v_scale).any()
    assert (mean_error.abs() <= 1e-5 * got.v_scale + 1e-6 * plain_mean.abs()).all()


def test_the_corrected_v_mean_keeps_diffuse_attention_accurate_at_large_n() -> None:
    """Gaussian q/k/v over 16,383 keys: the mean rounding error would enter every output row."""
    from compact_search.runtime.kernels.reference_fp8 import emulate_fp8_attention
    from compact_search.runtime.lut import build_block_lut

    seq_len, head_dim, rows = 16383, 64, 384
    q, k, v = attention_inputs("gaussian", (1, 2, seq_len, head_dim), seed=3)
    num_blocks = -(-seq_len // 128)
    mask = torch.ones(1, num_blocks, num_blocks, dtype=torch.bool)
    lut = build_block_lut(mask, seq_len=seq_len, block_size=128)
    stats = key_value_stats(k, v, lut.key_lengths, block_size=128, rotate=True)
    quantized = emulate_quantize_qkv(
        q, k, v, block_size=128, key_lengths=lut.key_lengths, stats=stats
    )
    out = emulate_fp8_attention(quantized, lut, scale=head_dim**-0.5, query_blocks=rows // 128)
    # The same output with the plain mean: every row has keys, so it only moves by the gap.
    uncorrected = out + (stats[1] - quantized.v_mean)[:, :, None]
    scores = q[:, :, :rows].double() @ k.double().transpose(-1, -2) * head_dim**-0.5
    expected = torch.softmax(scores, -1) @ v.double()  # [B, H, rows, D]
    error, uncorrected_error = relative_l2(out, expected), relative_l2(uncorrected, expected)
    assert error < 0.93 * uncorrected_error, (error, uncorrected_error)


def test_prepass_reads_token_major_inputs() -> None:
    """[B, N, H, D] storage seen as [B, H, N, D] (what the model adapters hand over)."""
    q, k, v, lengths, block_size, rotate = _inputs(CASES[0])
    token_major = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    for quantize in (quantize_qkv, emulate_quantize_qkv):
        plain = quantize(q, k, v, block_size=block_size, key_lengths=lengths)
        strided = quantize(*token_major, block_size=block_size, key_lengths=lengths)
        assert strided.q.is_contiguous() and strided.k.is_contiguous()
        for name in ("q", "k", "q_scale", "k_scale", "v_scale", "v_mean"):
            assert torch.equal(getattr(plain, name), getattr(strided, name)), name
        assert torch.equal(plain.v_t.view(torch.uint8), strided.v_t.view(torch.uint8))


def test_the_emulation_computes_a_prefix_of_query_blocks_on_request() -> None:
    from compact_search.runtime.kernels.reference_fp8 import emulate_fp8_attention
    from compact_search.runtime.lut import build_block_lut

    q, k, v = attention_inputs("gaussian", (1, 2, 700, 64), seed=5)
    mask = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(5)) < 0.5
    mask[0, 0] = False  # an empty row inside the prefix
    lengths = torch.minimum(padded_key_lengths(6, 128, seed=5), valid_block_lengths(700, 128))
    lut = build_block_lut(mask, seq_len=700, block_size=128, key_block_lengths=lengths)
    quantized = emulate_quantize_qkv(q, k, v, block_size=128, key_lengths=lut.key_lengths)
    full = emulate_fp8_attention(quantized, lut, scale=0.125)
    assert torch.equal(
        emulate_fp8_attention(quantized, lut, scale=0.125, query_blocks=2), full[:, :, :256]
    )
    assert torch.equal(emulate_fp8_attention(quantized, lut, scale=0.125, query_blocks=9), full)


def test_prepass_rejects_block_sizes_it_does_not_serve() -> None:
    q = torch.zeros(1, 1, 64, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="block_size 64 or 128"):
        quantize_qkv(q, q, q, block_size=32, key_lengths=valid_block_lengths(64, 32))


def test_prepass_writes_v_in_wgmma_key_order_on_request() -> None:
    from compact_search.runtime.kernels.reference_fp8 import emulate_fp8_attention
    from compact_search.runtime.kernels.triton_portable_fp8 import portable_fp8_attention
    from compact_search.runtime.lut import build_block_lut

    q, k, v = attention_inputs("gaussian", (1, 2, 300, 64), dtype=torch.bfloat16)
    mask = torch.ones(1, 3, 3, dtype=torch.bool)
    padded = padded_key_lengths(3, 128, seed=4)
    lut = build_block_lut(mask, seq_len=300, block_size=128, key_block_lengths=padded)
    lengths = lut.key_lengths  # clipped to N, as the pre-pass expects
    natural = quantize_qkv(q, k, v, block_size=128, key_lengths=lengths)
    permuted = quantize_qkv(q, k, v, block_size=128, key_lengths=lengths, key_order="wgmma")
    assert permuted.wgmma_key_order and not natural.wgmma_key_order
    bits = lambda t: t.view(torch.uint8)  # noqa: E731
    assert not torch.equal(bits(permuted.v_t), bits(natural.v_t))
    assert torch.equal(bits(natural_key_order(permuted.v_t)), bits(natural.v_t))
    # Key 8 of every block of 32 sits at position 2, and the order stays inside each block.
    order = wgmma_key_order(128)
    assert (
        order[8] == 2
        and order[2] == 4
        and torch.equal(order.view(4, 32) // 32, torch.arange(4)[:, None].expand(4, 32))
    )
    assert torch.equal(permuted.v_t[..., 2], natural.v_t[..., 8])
    # The emulation reads either order and computes the same; the portable kernel refuses it.
    scale = 64**-0.5
    assert torch.equal(
        emulate_fp8_attention(permuted, lut, scale=scale),
        emulate_fp8_attention(natural, lut, scale=scale),
    )
    with pytest.raises(ValueError, match="token order"):
        portable_fp8_attention(permuted, lut, torch.empty(q.shape), scale=scale)
    with pytest.raises(ValueError, match="key_order must be"):
        quantize_qkv(q, k, v, block_size=128, key_lengths=lengths, key_order="sorted")


# What a pre-pass call may ask of torch besides its Triton launches: allocations and views (the
# interpreter adds its own copies). Arithmetic here would be a small launch each on a GPU, which
# at the 1.3B shape made the pre-pass launch-bound when its sums were ~20 torch operations.
ALLOCATION_AND_VIEW_OPS = {"empty", "empty_like", "new_empty", "unbind", "view", "set_", "copy_"}


@pytest.mark.parametrize("v_format, v_terms", V_FORMATS, ids=V_FORMAT_IDS)
def test_prepass_does_no_torch_arithmetic(v_format: str, v_terms: int) -> None:
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    q, k, v = (torch.randn(1, 2, 300, 64, dtype=torch.bfloat16) for _ in range(3))
    lengths = torch.tensor([128, 128, 44], dtype=torch.int32)
    arguments = dict(block_size=128, key_lengths=lengths, key_order="wgmma")
    arguments |= dict(v_terms=v_terms, v_format=v_format)
    quantize_qkv(q, k, v, **arguments)  # the Hadamard matrix is built once and cached
    with Recorder() as recorder:
        quantize_qkv(q, k, v, **arguments)
    assert set(recorder.ops) <= ALLOCATION_AND_VIEW_OPS, recorder.ops


@pytest.mark.parametrize("rows", [48, 256, 8])
def test_stats_rows_that_do_not_tile_a_block_are_refused(rows: int) -> None:
    q, k, v, lengths, block_size, rotate = _inputs(CASES[0])  # block 128
    rotate_in_kernel = rows == 8  # a rotated step is a tensor-core product: 16 rows at least
    with pytest.raises(ValueError, match="stats rows"):
        key_value_stats(
            k,
            v,
            lengths,
            block_size=block_size,
            rotate=True,
            rotate_in_kernel=rotate_in_kernel,
            rows=rows,
        )
