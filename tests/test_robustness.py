"""Edge cases of the kernel in the Triton interpreter: random shapes and masks (hypothesis),
NaN and Inf inputs, zero-length and one-token sequences."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compact_search import sparse_attention
from compact_search.runtime.kernels.reference import masked_reference


def random_case(seed: int, n: int, heads: int, block_size: int, density: float, dtype):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, 64, generator=gen).to(dtype) for _ in range(3))
    nb = math.ceil(n / block_size)
    mask = torch.rand(heads, nb, nb, generator=gen) < density
    lengths = torch.full((nb,), block_size, dtype=torch.int32)
    lengths[-1] = n - (nb - 1) * block_size
    lengths[0] = min(int(lengths[0]), 1 + seed % block_size)  # padding inside the first block
    return q, k, v, mask, lengths


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 150),
    heads=st.integers(1, 2),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_kernel_matches_reference_on_random_cases(seed, n, heads, density, dtype):
    q, k, v, mask, lengths = random_case(seed, n, heads, 64, density, dtype)
    got = sparse_attention(
        q, k, v, mask, block_size=64, backend="triton", key_block_lengths=lengths
    )
    ref = masked_reference(
        q.double(), k.double(), v.double(), mask, block_size=64, key_block_lengths=lengths
    )
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2)


def test_nan_and_inf_reach_exactly_the_rows_the_reference_says():
    q, k, v, mask, _ = random_case(1, 200, 2, 64, 0.5, torch.float16)
    mask[:, :, 1] = False
    mask[0, 0, 1] = True  # only query block 0 of head 0 sees key block 1
    k[0, 0, 70] = float("nan")  # a key in block 1
    v[0, 1, 75] = float("inf")  # a value in block 1 of head 1, which nobody keeps
    got = sparse_attention(q, k, v, mask, block_size=64, backend="triton")
    ref = masked_reference(q.double(), k.double(), v.double(), mask, block_size=64)
    assert torch.equal(got.isnan(), ref.isnan())
    assert got[0, 0, :64].isnan().all() and not got[0, 0, 64:].isnan().any()
    assert torch.isfinite(got[0, 1]).all()


def test_zero_length_and_one_token():
    empty = torch.zeros(1, 2, 0, 64, dtype=torch.float16)
    no_blocks = torch.zeros(2, 0, 0, dtype=torch.bool)
    assert sparse_attention(
        empty, empty, empty, no_blocks, block_size=64, backend="triton"
    ).shape == (1, 2, 0, 64)
    one = torch.randn(1, 2, 1, 64).half()
    keep = torch.ones(2, 1, 1, dtype=torch.bool)
    out = sparse_attention(one, one, one, keep, block_size=64, backend="triton")
    torch.testing.assert_close(out, one)  # a single token attends only to itself
    drop = torch.zeros(2, 1, 1, dtype=torch.bool)
    assert torch.all(sparse_attention(one, one, one, drop, block_size=64, backend="triton") == 0)
