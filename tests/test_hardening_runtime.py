"""Keys and values a query block does not attend never reach its output, on every backend.

Inf and NaN are planted in a key block that one query block skips (and another attends), in a
padding slot of a partial key block (no query attends it) and next to an empty mask row; each
backend's output must equal its output on the same inputs with finite numbers there. Every call
records the kernel it ran, so a case that names a backend cannot silently fall back.
"""

import math
import warnings

import pytest
import torch

from compact_search import sparse_attention
from compact_search.runtime import attention
from compact_search.runtime.attention import lut_sparse_attention, recorded_kernels
from compact_search.runtime.kernels import reference
from compact_search.runtime.kernels.reference import chunked_reference, masked_reference
from compact_search.runtime.kernels.triton_portable import portable_sparse_attention
from compact_search.runtime.lut import build_block_lut

N, BS, D = 64, 16, 64
SKIPPED_KEY, PADDED_KEY = 35, 60  # block 2 (query block 0 skips it), block 3's padding
LENGTHS = torch.tensor([16, 16, 16, 10], dtype=torch.int32)


def case(dtype):
    """q, k, v [1, 2, 64, 64] and a [2, 4, 4] mask: query block 0 skips key block 2, which the
    other query blocks attend; head 1's query block 1 keeps nothing (an empty row)."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, N, D, generator=gen).to(dtype) for _ in range(3))
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[:, 0, 2] = False
    mask[1, 1] = False
    return q, k, v, mask


def poisoned(t, value):
    """t with `value` at the skipped key (head 0) and at the padded key (both heads)."""
    t = t.clone()
    t[0, 0, SKIPPED_KEY] = value
    t[0, :, PADDED_KEY] = value
    return t


POISONS = [
    pytest.param(tensor, value, id=f"{tensor}-{name}")
    for tensor in ("k", "v")
    for value, name in ((math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"))
]


def run_mask(backend, q, k, v, mask):
    if backend == "chunked":
        return chunked_reference(q, k, v, mask, block_size=BS, key_block_lengths=LENGTHS)
    return sparse_attention(
        q, k, v, mask, block_size=BS, backend=backend, key_block_lengths=LENGTHS
    )


def run_tables(backend, q, k, v, mask):
    lut = build_block_lut(mask, seq_len=N, block_size=BS, key_block_lengths=LENGTHS)
    return lut_sparse_attention(q, k, v, lut, block_size=BS, backend=backend)


# (backend, how it is called, input dtype, the kernel that must run, tolerance between the clean
# and the poisoned run: the PyTorch backends take another summation path for non-finite values)
BACKENDS = [
    pytest.param("reference", run_mask, torch.float32, "reference", 1e-6, id="reference"),
    pytest.param("chunked", run_mask, torch.float32, None, 0.0, id="reference-chunked"),
    pytest.param("flex", run_mask, torch.float32, "flex", 1e-6, id="flex"),
    pytest.param("triton", run_mask, torch.float16, "triton-portable", 0.0, id="triton-fp16"),
    pytest.param("triton-portable", run_mask, torch.bfloat16, "triton-portable", 0.0, id="bf16"),
    pytest.param("reference", run_tables, torch.float32, "reference", 1e-6, id="tables-reference"),
    pytest.param("flex", run_tables, torch.float32, "flex", 1e-6, id="tables-flex"),
    pytest.param("auto", run_tables, torch.float32, "reference", 1e-6, id="tables-auto-cpu"),
    pytest.param("triton", run_tables, torch.float16, "triton-portable", 0.0, id="tables-triton"),
]


@pytest.mark.parametrize(("tensor", "value"), POISONS)
@pytest.mark.parametrize(("backend", "run", "dtype", "kernel", "tolerance"), BACKENDS)
def test_non_finite_keys_and_values_outside_the_mask_never_reach_the_output(
    backend, run, dtype, kernel, tolerance, tensor, value
):
    q, k, v, mask = case(dtype)
    k_bad = poisoned(k, value) if tensor == "k" else k
    v_bad = poisoned(v, value) if tensor == "v" else v
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sparse_attention")  # a fallback warns
        clean = run(backend, q, k, v, mask)
        with recorded_kernels() as ran:
            got = run(backend, q, k_bad, v_bad, mask)
    assert ran == ([] if kernel is None else [kernel])
    # Rows that attend neither poisoned key: query block 0 of head 0, all of head 1.
    for unaffected in (got[0, 0, :BS], got[0, 1]):
        assert torch.isfinite(unaffected).all()
    torch.testing.assert_close(
        got[0, 1].float(), clean[0, 1].float(), rtol=tolerance, atol=tolerance
    )
    torch.testing.assert_close(
        got[0, 0, :BS].float(), clean[0, 0, :BS].float(), rtol=tolerance, atol=tolerance
    )
    assert torch.all(got[0, 1, BS : 2 * BS] == 0)  # the empty row
    # The rows that keep key block 2 see the poison as plain softmax attention says.
    expected = masked_reference(
        q.double(), k_bad.double(), v_bad.double(), mask, block_size=BS, key_block_lengths=LENGTHS
    )
    torch.testing.assert_close(got.double(), expected, rtol=2e-2, atol=2e-2, equal_nan=True)


@pytest.mark.parametrize(("tensor", "value"), POISONS)
def test_the_masked_reference_walks_the_same_rule_as_the_chunked_one(monkeypatch, tensor, value):
    """Both reference forms (small N: the [N, N] mask; large N: query blocks) agree on poisoned
    inputs, and a poison in a kept block still reaches exactly the rows that attend it."""
    q, k, v, mask = case(torch.float64)
    k, v = (poisoned(t, value) if name == tensor else t for name, t in (("k", k), ("v", v)))
    k[0, 0, 5] = math.nan  # block 0: every query block of head 0 keeps it
    masked = masked_reference(q, k, v, mask, block_size=BS, key_block_lengths=LENGTHS)
    monkeypatch.setattr(reference, "MASKED_REFERENCE_MAX_PAIRS", 0)
    chunked = reference.reference_sparse_attention(
        q, k, v, mask, block_size=BS, key_block_lengths=LENGTHS
    )
    assert torch.equal(masked.isnan(), chunked.isnan())
    assert masked[0, 0].isnan().all() and torch.isfinite(masked[0, 1]).all()
    torch.testing.assert_close(masked[0, 1], chunked[0, 1], rtol=1e-12, atol=1e-12)


def test_the_portable_kernel_writes_every_row_of_a_nan_filled_output_with_poisoned_padding():
    q, k, v, mask = case(torch.float16)
    out = torch.full_like(q, math.nan)
    expected = portable_sparse_attention(q, k, v, mask, block_size=BS, key_block_lengths=LENGTHS)
    assert torch.isfinite(expected).all()
    k, v = k.clone(), v.clone()
    k[0, :, PADDED_KEY], v[0, :, PADDED_KEY] = math.inf, math.nan
    got = portable_sparse_attention(
        q,
        k,
        v,
        mask,
        block_size=BS,
        key_block_lengths=LENGTHS,
        out=out,
    )
    assert got is out and torch.equal(got, expected)


def test_poisoned_inputs_trace_without_a_graph_break():
    q, k, v, mask = case(torch.float32)
    lut = build_block_lut(mask, seq_len=N, block_size=BS, key_block_lengths=LENGTHS)

    def attend(q, k, v):
        return lut_sparse_attention(q, k, v, lut, block_size=BS, backend="reference")

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    k_bad, v_bad = poisoned(k, math.nan), poisoned(v, math.inf)
    got = compiled(q, k_bad, v_bad)
    torch.testing.assert_close(got, attend(q, k_bad, v_bad), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got[0, 1], attend(q, k, v)[0, 1], rtol=1e-6, atol=1e-6)


def test_a_fallback_is_recorded_as_the_reference():
    attention._warned_fallbacks.clear()
    q, k, v, mask = case(torch.float32)  # fp32: the kernels do not take it
    with pytest.warns(UserWarning, match="dtype torch.float32"), recorded_kernels() as ran:
        sparse_attention(q, k, v, mask, block_size=BS, backend="triton")
    assert ran == ["reference"]
