"""8-bit block-sparse attention (``sparse_attention(..., precision="fp8" | "int8")``) on CPU.

Three parts. The chooser: which 8-bit kernel runs where, what is refused, what runs as bf16. The
portable kernel under the Triton interpreter, held to the torch emulation of the method (same
quantized inputs, same tile order; they differ only in fp32 sum order) with NaN-filled outputs,
and through the public entry point to the fp64 reference on odd shapes with empty rows and padded
keys; the reference backend is the emulation, bit for bit. The method's accuracy, measured with
the emulation on inputs too large for the interpreter: Gaussian q/k/v, q/k with outlier channels
and q/k/v captured from the built-in model.
"""

from __future__ import annotations

import os

import pytest
import torch
from fp8_cases import (
    attention_inputs,
    block_mask_with_edge_rows,
    cosine_similarity,
    padded_key_lengths,
    relative_l2,
)

from compact_search.runtime import attention
from compact_search.runtime.attention import (
    choose_kernel,
    kernel_precision,
    recorded_kernels,
    sparse_attention,
)
from compact_search.runtime.kernels import triton_portable_fp8
from compact_search.runtime.kernels.reference import chunked_reference, masked_reference
from compact_search.runtime.kernels.reference_fp8 import emulate_fp8_attention
from compact_search.runtime.kernels.triton_portable_fp8 import portable_fp8_attention
from compact_search.runtime.lut import build_block_lut
from compact_search.runtime.quantize import emulate_quantize_qkv, quantize_qkv

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="kernel tests run under TRITON_INTERPRET=1 (make test)"
)

# What 8-bit arithmetic gives against the fp64 reference on Gaussian inputs (docs/kernel.md,
# "8-bit attention"): P and V in e4m3 keep 3 mantissa bits, ~2.5% RMS each, and on diffuse
# attention that error does not average out against the output.
GAUSSIAN_MIN_COSINE = 0.999
GAUSSIAN_MAX_RELATIVE_L2 = 4.2e-2
# With V in two e4m3 terms (V to ~7 mantissa bits) what is left is P's rounding and the INT8
# scores: the issue's bound holds on Gaussian inputs too.
TWO_TERM_MAX_RELATIVE_L2 = 3e-2
# INT8 P V: P against each tile's own max and V per channel in INT8, ~1.1% and ~0.9% RMS on
# Gaussian inputs, with the INT8 scores 1.9e-2 (the issue's bound, with a margin).
INT8_PV_MAX_RELATIVE_L2 = 3e-2
# V's formats: (v_format, v_terms).
V_FORMATS = [("e4m3", 1), ("e4m3", 2), ("int8", 1)]
V_FORMAT_IDS = ["one-v-term", "two-v-terms", "int8-pv"]

CASES = [
    # (batch, heads, seq_len, head_dim, dtype, block_size, shared mask, padded keys)
    (1, 2, 63, 64, torch.bfloat16, 64, False, False),
    (2, 2, 300, 64, torch.float16, 128, True, True),
    (1, 2, 1000, 64, torch.bfloat16, 64, False, True),
    (1, 1, 260, 128, torch.float16, 128, False, False),
]


def _case_id(case) -> str:
    batch, heads, seq_len, head_dim, dtype, block_size, shared, padded = case
    name = f"B{batch}-H{heads}-N{seq_len}-{str(dtype)[6:]}-d{head_dim}-bs{block_size}"
    return name + ("-shared-mask" if shared else "") + ("-padded-keys" if padded else "")


def _problem(case):
    batch, heads, seq_len, head_dim, dtype, block_size, shared, padded = case
    q, k, v = attention_inputs("gaussian", (batch, heads, seq_len, head_dim), dtype=dtype)
    num_blocks = -(-seq_len // block_size)
    mask = block_mask_with_edge_rows(1 if shared else heads, num_blocks, 0.5, seed=seq_len)
    lengths = padded_key_lengths(num_blocks, block_size, seed=seq_len) if padded else None
    return q, k, v, mask, lengths, block_size


def _reference(q, k, v, mask, lengths, block_size) -> torch.Tensor:
    return masked_reference(
        q.double(), k.double(), v.double(), mask, block_size=block_size, key_block_lengths=lengths
    )


def _assert_accurate(out: torch.Tensor, expected: torch.Tensor, max_relative_l2: float) -> None:
    assert cosine_similarity(out, expected) >= 0.999
    assert relative_l2(out, expected) <= max_relative_l2


@needs_interpreter
@pytest.mark.parametrize("v_format, v_terms", V_FORMATS, ids=V_FORMAT_IDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_portable_kernel_computes_what_the_emulation_computes(
    case, v_format: str, v_terms: int
) -> None:
    q, k, v, mask, lengths, block_size = _problem(case)
    seq_len = q.shape[2]
    lut = build_block_lut(mask, seq_len=seq_len, block_size=block_size, key_block_lengths=lengths)
    quantized = quantize_qkv(
        q,
        k,
        v,
        block_size=block_size,
        key_lengths=lut.key_lengths,
        v_terms=v_terms,
        v_format=v_format,
    )
    scale = q.shape[-1] ** -0.5
    # An fp32 output buffer: the interpreter's own fp32 -> bf16/fp16 cast rounds wrongly.
    out = torch.full(q.shape, float("nan"))
    portable_fp8_attention(quantized, lut, out, scale=scale)
    assert not out.isnan().any(), "unwritten output"
    torch.testing.assert_close(
        out, emulate_fp8_attention(quantized, lut, scale=scale), atol=2e-6, rtol=2e-5
    )
    expected = _reference(q, k, v, mask, lengths, block_size)
    _assert_accurate(out, expected, GAUSSIAN_MAX_RELATIVE_L2)
    if mask.shape[0] > 1 or q.shape[1] == 1:  # head 0's first query block keeps no key block
        assert torch.equal(out[:, 0, :block_size], torch.zeros_like(out[:, 0, :block_size]))


@needs_interpreter
@pytest.mark.parametrize("case", CASES[:2], ids=_case_id)
def test_sparse_attention_fp8_runs_the_portable_kernel_under_the_interpreter(case) -> None:
    q, k, v, mask, lengths, block_size = _problem(case)
    with recorded_kernels() as ran:
        out = sparse_attention(
            q,
            k,
            v,
            mask,
            block_size=block_size,
            key_block_lengths=lengths,
            backend="triton",
            precision="fp8",
        )
    assert ran == ["triton-portable-fp8"]
    assert out.dtype == q.dtype and out.isfinite().all()
    _assert_accurate(out, _reference(q, k, v, mask, lengths, block_size), GAUSSIAN_MAX_RELATIVE_L2)


@needs_interpreter
def test_precision_int8_runs_the_portable_kernel_with_int8_pv() -> None:
    q, k, v, mask, lengths, block_size = _problem(CASES[1])
    arguments = dict(block_size=block_size, key_block_lengths=lengths, backend="triton")
    e4m3 = sparse_attention(q, k, v, mask, precision="fp8", **arguments)
    with recorded_kernels() as ran:
        int8_pv = sparse_attention(q, k, v, mask, precision="int8", **arguments)
    assert ran == ["triton-portable-int8"]
    lut = build_block_lut(
        mask, seq_len=q.shape[2], block_size=block_size, key_block_lengths=lengths
    )
    quantized = quantize_qkv(
        q, k, v, block_size=block_size, key_lengths=lut.key_lengths, v_format="int8"
    )
    kernel_alone = portable_fp8_attention(quantized, lut, torch.empty_like(q), scale=64**-0.5)
    assert torch.equal(int8_pv, kernel_alone)
    expected = _reference(q, k, v, mask, lengths, block_size)
    _assert_accurate(int8_pv, expected, INT8_PV_MAX_RELATIVE_L2)
    assert relative_l2(int8_pv, expected) < 0.85 * relative_l2(e4m3, expected)


@needs_interpreter
def test_the_method_without_the_rotation_still_matches() -> None:
    q, k, v, mask, lengths, block_size = _problem(CASES[1])
    lut = build_block_lut(
        mask, seq_len=q.shape[2], block_size=block_size, key_block_lengths=lengths
    )
    quantized = quantize_qkv(
        q, k, v, block_size=block_size, key_lengths=lut.key_lengths, rotate=False
    )
    out = portable_fp8_attention(quantized, lut, torch.full(q.shape, float("nan")), scale=64**-0.5)
    _assert_accurate(out, _reference(q, k, v, mask, lengths, block_size), GAUSSIAN_MAX_RELATIVE_L2)


@pytest.mark.parametrize(
    "precision, v_format, max_relative_l2",
    [("fp8", "e4m3", GAUSSIAN_MAX_RELATIVE_L2), ("int8", "int8", INT8_PV_MAX_RELATIVE_L2)],
)
def test_the_reference_backend_runs_the_emulation_bit_for_bit(
    precision: str, v_format: str, max_relative_l2: float
) -> None:
    q, k, v, mask, lengths, block_size = _problem(CASES[2])
    with recorded_kernels() as ran:
        out = sparse_attention(
            q, k, v, mask, block_size=block_size, key_block_lengths=lengths, precision=precision
        )  # "auto" on CPU: the reference
    assert ran == [f"reference-{precision}"]
    lut = build_block_lut(
        mask, seq_len=q.shape[2], block_size=block_size, key_block_lengths=lengths
    )
    quantized = emulate_quantize_qkv(
        q, k, v, block_size=block_size, key_lengths=lut.key_lengths, v_format=v_format
    )
    assert quantized.v_format == v_format
    expected = emulate_fp8_attention(quantized, lut, scale=q.shape[-1] ** -0.5, out_dtype=q.dtype)
    assert torch.equal(out, expected)
    bf16 = sparse_attention(q, k, v, mask, block_size=block_size, key_block_lengths=lengths)
    assert not torch.equal(out, bf16), f"precision {precision!r} ran the 16-bit reference"
    _assert_accurate(out, _reference(q, k, v, mask, lengths, block_size), max_relative_l2)


def test_precision_is_checked_and_flex_has_no_8_bit_path() -> None:
    q = torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16)
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="precision must be one of bf16, fp8, int8"):
        sparse_attention(q, q, q, mask, precision="int4")
    for precision in ("fp8", "int8"):
        with pytest.raises(ValueError, match="'flex' has no 8-bit path"):
            sparse_attention(q, q, q, mask, backend="flex", precision=precision)
        with pytest.raises(ValueError, match="Gluon 8-bit kernel needs"):
            choose_kernel(q, q, q, 128, "triton-gluon", precision)  # CPU


@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize(
    "shape, dtype, block_size, expected",
    [
        ((1, 1, 128, 64), torch.float32, 128, "precision {!r} takes no dtype torch.float32"),
        ((1, 1, 128, 96), torch.bfloat16, 128, "precision {!r} takes no head dim 96"),
        ((1, 1, 128, 64), torch.bfloat16, 32, "block size 32 (8-bit kernels take 64 or 128)"),
    ],
)
def test_inputs_the_8_bit_kernels_do_not_take_run_in_16_bit(
    shape, dtype, block_size, expected, precision
):
    q = torch.zeros(shape, dtype=dtype)
    kernel, fallback = choose_kernel(q, q, q, block_size, "reference", precision)
    assert kernel == "reference" and fallback.startswith(expected.format(precision))
    assert fallback.endswith("runs as 'bf16'")


def test_every_kernel_names_its_arithmetic() -> None:
    assert [kernel_precision(k) for k in ("reference", "triton-gluon", "flex")] == ["bf16"] * 3
    assert kernel_precision("triton-portable-fp8") == "fp8"
    assert kernel_precision("triton-gluon-int8") == "int8"
    # The two 8-bit twins of a kernel are one function told V's format.
    fp8, int8 = (attention.KERNELS[f"triton-gluon-{p}"] for p in ("fp8", "int8"))
    assert fp8.from_luts == int8.from_luts
    assert (dict(fp8.options), dict(int8.options)) == ({"v_format": "e4m3"}, {"v_format": "int8"})
    with pytest.raises(ValueError, match="unknown kernel 'triton-gluon-fp4'"):
        kernel_precision("triton-gluon-fp4")


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_a_gpu_without_fp8_tensor_cores_runs_8_bits_as_bf16(monkeypatch, precision) -> None:
    q = torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(triton_portable_fp8, "interpreting", lambda: False)
    monkeypatch.setattr(attention, "unsupported_reason", lambda q: None)
    kernel, fallback = choose_kernel(q, q, q, 128, "triton-portable", precision)  # CPU tensor
    assert kernel == "triton-portable" and "no FP8 tensor cores" in fallback
    assert f"precision {precision!r} runs as 'bf16'" in fallback


# --- the method's accuracy, through the emulation ---------------------------------------------


def _emulated(
    q, k, v, block_size: int = 128, rotate: bool = True, v_terms: int = 1, v_format: str = "e4m3"
):
    seq_len = q.shape[2]
    num_blocks = -(-seq_len // block_size)
    mask = torch.ones(1, num_blocks, num_blocks, dtype=torch.bool)
    lut = build_block_lut(mask, seq_len=seq_len, block_size=block_size)
    quantized = emulate_quantize_qkv(
        q,
        k,
        v,
        block_size=block_size,
        key_lengths=lut.key_lengths,
        rotate=rotate,
        v_terms=v_terms,
        v_format=v_format,
    )
    return emulate_fp8_attention(quantized, lut, scale=q.shape[-1] ** -0.5)


def _dense_reference(q, k, v) -> torch.Tensor:
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    return chunked_reference(
        q.float(), k.float(), v.float(), mask, block_size=q.shape[2]
    )  # fp32, as the issue measures


@pytest.mark.parametrize(
    "kind, head_dim, max_relative_l2",
    [
        ("gaussian", 128, GAUSSIAN_MAX_RELATIVE_L2),
        ("gaussian", 64, GAUSSIAN_MAX_RELATIVE_L2),
        ("outliers", 128, GAUSSIAN_MAX_RELATIVE_L2),
        ("outliers", 64, GAUSSIAN_MAX_RELATIVE_L2),
    ],
)
def test_method_accuracy_on_synthetic_inputs(kind: str, head_dim: int, max_relative_l2) -> None:
    q, k, v = attention_inputs(kind, (1, 2, 1024, head_dim), seed=head_dim)
    _assert_accurate(_emulated(q, k, v), _dense_reference(q, k, v), max_relative_l2)


@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
@pytest.mark.parametrize("head_dim", [128, 64])
def test_two_v_terms_meet_the_issue_bound_on_synthetic_inputs(kind: str, head_dim: int) -> None:
    q, k, v = attention_inputs(kind, (1, 2, 1024, head_dim), seed=head_dim)
    expected = _dense_reference(q, k, v)
    two_terms = _emulated(q, k, v, v_terms=2)
    _assert_accurate(two_terms, expected, TWO_TERM_MAX_RELATIVE_L2)
    # V's second term takes out the share of the error V's e4m3 rounding left.
    assert relative_l2(two_terms, expected) < 0.85 * relative_l2(_emulated(q, k, v), expected)


@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
@pytest.mark.parametrize("head_dim", [128, 64])
def test_int8_pv_meets_the_issue_bound_on_synthetic_inputs(kind: str, head_dim: int) -> None:
    q, k, v = attention_inputs(kind, (1, 2, 1024, head_dim), seed=head_dim)
    expected = _dense_reference(q, k, v)
    int8_pv = _emulated(q, k, v, v_format="int8")
    _assert_accurate(int8_pv, expected, INT8_PV_MAX_RELATIVE_L2)
    # INT8 P and V take out most of what e4m3 P and V left.
    assert relative_l2(int8_pv, expected) < 0.85 * relative_l2(_emulated(q, k, v), expected)


def test_int8_p_against_the_tile_max_keeps_small_tiles_accurate() -> None:
    # Rows whose maxima keep rising along the keys: most tiles' maxima sit below the row's, where
    # P rounded against the running max would use a fraction of the INT8 range.
    q, k, v = attention_inputs("rising", (1, 2, 1024, 64), seed=3)
    expected = _dense_reference(q, k, v)
    _assert_accurate(_emulated(q, k, v, v_format="int8"), expected, INT8_PV_MAX_RELATIVE_L2)


def test_a_rescale_threshold_keeps_p_within_e4m3() -> None:
    # Keys growing along the sequence move each row's max in many tiles. Threshold 0 is the
    # plain online softmax; with threshold t the max lags by up to t and P must be scaled by
    # 2^-t, or it would pass 448 and saturate (a threshold of 8 makes that a large error).
    q, k, v = attention_inputs("rising", (1, 2, 1024, 64), seed=3)
    lut = build_block_lut(torch.ones(1, 8, 8, dtype=torch.bool), seq_len=1024, block_size=128)
    quantized = emulate_quantize_qkv(q, k, v, block_size=128, key_lengths=lut.key_lengths)
    expected = _dense_reference(q, k, v)
    errors = {}
    for threshold in (0.0, 2.0, 8.0):
        out = emulate_fp8_attention(quantized, lut, scale=0.125, rescale_threshold=threshold)
        errors[threshold] = relative_l2(out, expected)
        assert cosine_similarity(out, expected) >= 0.999, threshold
    assert errors[8.0] < 5e-2
    # A lagging max leaves a row's largest P off e4m3's largest value: a little less accurate.
    assert errors[0.0] <= errors[2.0] <= errors[8.0]


def test_rotation_is_what_keeps_outlier_channels_accurate() -> None:
    q, k, v = attention_inputs("outliers", (1, 1, 1024, 128), seed=1)
    expected = _dense_reference(q, k, v)
    rotated = relative_l2(_emulated(q, k, v), expected)
    plain = relative_l2(_emulated(q, k, v, rotate=False), expected)
    assert rotated < 0.6 * plain


@pytest.fixture(scope="module")
def tiny_model_qkv() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """q, k, v ``[1, 2, 2048, 64]`` (two of four heads) of layers 1 and 4 of the built-in model."""
    from compact_search.models.tiny import load_tiny_pipeline
    from compact_search.models.wan import install_wan_attention

    pipeline = load_tiny_pipeline("cpu")
    captured = {}

    def record(layer, q, k, v):
        captured[layer] = (q.clone(), k.clone(), v.clone())
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with install_wan_attention(pipeline.transformer, record):
        pipeline(["a red ball bouncing"], num_steps=1, guidance_scale=1.0, seed=0)
    return [tuple(t[:, :2].to(torch.bfloat16) for t in captured[layer]) for layer in (1, 4)]


@pytest.mark.parametrize("v_format", ["e4m3", "int8"])
def test_method_accuracy_on_the_built_in_model(tiny_model_qkv, v_format: str) -> None:
    for q, k, v in tiny_model_qkv:
        expected = _dense_reference(q, k, v)
        _assert_accurate(_emulated(q, k, v, v_format=v_format), expected, 3e-2)


@needs_interpreter
def test_portable_kernel_on_built_in_model_queries(tiny_model_qkv) -> None:
    q, k, v = (t[:, :2, :512] for t in tiny_model_qkv[0])
    mask = block_mask_with_edge_rows(2, 4, 0.6, seed=3)
    out = sparse_attention(q, k, v, mask, backend="triton-portable", precision="fp8")
    _assert_accurate(out, _reference(q, k, v, mask, None, 128), 3e-2)


def test_recorded_kernels_nest_when_inner_and_outer_records_are_equal() -> None:
    q = torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16)
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    with recorded_kernels() as outer:
        sparse_attention(q, q, q, mask, precision="fp8")
        with recorded_kernels() as inner:
            sparse_attention(q, q, q, mask, precision="fp8")
        assert inner == ["reference-fp8"]
        sparse_attention(q, q, q, mask)
    assert outer == ["reference-fp8", "reference-fp8", "reference"]
