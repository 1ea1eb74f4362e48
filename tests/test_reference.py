"""Reference attention vs plain softmax attention in fp64, and the public entry point's checks."""

import math

import pytest
import torch

from compact_search import sparse_attention
from compact_search.runtime.kernels.reference import chunked_reference, masked_reference


def plain_attention(q, k, v, token_mask, scale):
    """Textbook softmax attention over allowed keys, one query row at a time, fp64."""
    out = torch.zeros_like(q, dtype=torch.float64)
    b, h, n, _ = q.shape
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                keys = torch.nonzero(token_mask[hi, i]).flatten()
                if keys.numel() == 0:
                    continue
                s = (k[bi, hi, keys].double() @ q[bi, hi, i].double()) * scale
                p = torch.exp(s - s.max())
                out[bi, hi, i] = (p / p.sum()) @ v[bi, hi, keys].double()
    return out


CASES = [
    pytest.param(1, 2, 63, 16, id="B1-H2-N63-bs16"),
    pytest.param(2, 3, 100, 32, id="B2-H3-N100-bs32"),
    pytest.param(1, 1, 1, 8, id="B1-H1-N1-bs8"),
]


@pytest.mark.parametrize(("b", "h", "n", "bs"), CASES)
@pytest.mark.parametrize("form", [masked_reference, chunked_reference], ids=["masked", "chunked"])
def test_reference_matches_plain_attention(b, h, n, bs, form):
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(b, h, n, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    nb = math.ceil(n / bs)
    mask = torch.rand(h, nb, nb, generator=gen) < 0.5
    mask[0, 0] = False  # an empty row
    if nb > 1:
        mask[-1, -1] = True  # a full row
    lengths = torch.full((nb,), bs, dtype=torch.int32)
    lengths[-1] = n - (nb - 1) * bs
    if nb > 1:
        lengths[0] = bs // 2  # padding at the end of block 0
    block_of = torch.arange(n) // bs
    key_ok = (torch.arange(n) % bs) < lengths[block_of]
    token_mask = mask[:, block_of][:, :, block_of] & key_ok[None, None, :]
    expected = plain_attention(q, k, v, token_mask, 8**-0.5)
    got = form(q, k, v, mask, block_size=bs, key_block_lengths=lengths)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.all(got[:, 0, :bs] == 0)  # empty row -> zeros


def test_chunked_reference_runs_32k_tokens_without_n_by_n():
    # 32,768 tokens: an [N, N] fp32 tensor would need 4 GiB; the chunked form needs ~16 MiB.
    n, bs = 32768, 128
    q = torch.randn(1, 1, n, 16)
    nb = n // bs
    mask = torch.zeros(1, nb, nb, dtype=torch.bool)
    mask[0, torch.arange(nb), torch.arange(nb)] = True
    mask[0, :, 0] = True
    out = sparse_attention(q, q, q, mask, block_size=bs, backend="reference")
    assert out.shape == q.shape and torch.isfinite(out).all()
    # spot-check one query block against the masked form on the tokens it can see
    rows = slice(5 * bs, 6 * bs)
    keys = torch.cat([torch.arange(bs), torch.arange(5 * bs, 6 * bs)])
    probs = torch.softmax(q[0, 0, rows] @ q[0, 0, keys].T * 16**-0.5, dim=-1)
    torch.testing.assert_close(out[0, 0, rows], probs @ q[0, 0, keys], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtype_follows_q(dtype):
    q = torch.randn(1, 2, 40, 8).to(dtype)
    mask = torch.ones(1, 3, 3, dtype=torch.bool)
    out = sparse_attention(q, q, q, mask, block_size=16)
    assert out.dtype == dtype
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), q.float(), q.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_nan_propagates_like_the_reference_and_zero_length_works():
    q = torch.randn(1, 1, 32, 8)
    k = q.clone()
    k[0, 0, 3] = float("nan")
    mask = torch.ones(1, 2, 2, dtype=torch.bool)
    mask[0, 1] = False  # rows of block 1 see nothing -> zeros, even with a NaN key
    out = sparse_attention(q, k, q, mask, block_size=16)
    assert torch.isnan(out[0, 0, :16]).all()
    assert torch.all(out[0, 0, 16:] == 0)
    empty = torch.zeros(1, 1, 0, 8)
    assert sparse_attention(empty, empty, empty, torch.zeros(1, 0, 0, dtype=torch.bool)).shape == (
        1,
        1,
        0,
        8,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"q": torch.zeros(2, 8, 4)}, ValueError, r"q must be \[B, H, N, D\]"),
        ({"k": torch.zeros(1, 2, 9, 4)}, ValueError, "one shape"),
        ({"q": torch.zeros(1, 2, 8, 4, dtype=torch.int32)}, TypeError, "fp16"),
        ({"block_mask": torch.ones(1, 3, 3, dtype=torch.bool)}, ValueError, r"\[2 or 1, 2, 2\]"),
        ({"block_mask": torch.ones(1, 2, 2)}, TypeError, "torch.bool"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"key_block_lengths": torch.ones(3, dtype=torch.int32)}, ValueError, r"\[nb\] = \[2\]"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, error, message):
    args = {
        "q": torch.zeros(1, 2, 8, 4),
        "k": torch.zeros(1, 2, 8, 4),
        "v": torch.zeros(1, 2, 8, 4),
        "block_mask": torch.ones(2, 2, 2, dtype=torch.bool),
    }
    args.update(kwargs)
    if "q" in kwargs and "k" not in kwargs:
        args["k"] = args["v"] = torch.zeros_like(args["q"])
    options = {k: args.pop(k) for k in ("backend", "key_block_lengths") if k in args}
    with pytest.raises(error, match=message):
        sparse_attention(
            args["q"], args["k"], args["v"], args["block_mask"], block_size=4, **options
        )
