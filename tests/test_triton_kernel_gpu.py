"""The Triton kernel compiled on a CUDA GPU, at sizes the interpreter cannot reach.

Marked `gpu`; skipped without CUDA. Run on a GPU machine with
`python -m pytest -m gpu tests/test_triton_kernel_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from compact_search import sparse_attention
from compact_search.runtime.kernels.reference import chunked_reference
from compact_search.runtime.kernels.triton_portable import portable_sparse_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Relative Frobenius error against the fp32 reference.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}

CASES = [
    # (batch, heads, seq_len, head_dim, dtype, block_size, padded_keys)
    (1, 6, 4000, 128, torch.bfloat16, 128, False),
    (2, 4, 4001, 64, torch.float16, 128, True),
    (1, 5, 2500, 128, torch.float16, 64, True),
    (1, 4, 3000, 64, torch.bfloat16, 64, False),
]


def case_id(case) -> str:
    batch, heads, seq_len, head_dim, dtype, block_size, padded = case
    name = f"B{batch}-H{heads}-N{seq_len}-{DTYPE_NAMES[dtype]}-d{head_dim}-bs{block_size}"
    return name + ("-padded-keys" if padded else "")


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


# (kernel, use_tma, gluon config): the portable kernel on both load paths, the Gluon kernel in
# its default and its other configs.
VARIANTS = {
    "portable-pointers": ("portable", False, None),
    "portable-tma": ("portable", True, None),
    "gluon": ("gluon", None, None),
    "gluon-pingpong": ("gluon", None, dict(pingpong=True)),
    "gluon-bn64": ("gluon", None, dict(block_n=64, stages=3)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_reference_on_gpu(case, variant: str) -> None:
    batch, heads, seq_len, head_dim, dtype, block_size, padded = case
    kernel, use_tma, gluon_config = VARIANTS[variant]
    hopper = torch.cuda.get_device_capability()[0] == 9
    if use_tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need Hopper or newer")
    if kernel == "gluon" and (not hopper or block_size != 128):
        pytest.skip("the Gluon kernel runs on Hopper with 128-token blocks")
    generator = torch.Generator(device="cuda").manual_seed(seq_len)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", generator=generator).to(dtype) for _ in range(3))
    num_blocks = -(-seq_len // block_size)
    block_mask = torch.rand(heads, num_blocks, num_blocks, device="cuda", generator=generator) < 0.3
    block_mask[0, 0] = False  # an empty row
    block_mask[-1, -1] = True  # a full row
    lengths = None
    if padded:
        lengths = torch.randint(
            1, block_size + 1, (num_blocks,), device="cuda", generator=generator
        ).to(torch.int32)
        lengths[1] = 0
    out = torch.full_like(q, float("nan"))
    if kernel == "portable":
        portable_sparse_attention(
            q,
            k,
            v,
            block_mask,
            block_size=block_size,
            key_block_lengths=lengths,
            out=out,
            use_tma=use_tma,
        )
    else:
        from compact_search.runtime.kernels.gluon_hopper import GluonConfig, gluon_sparse_attention

        gluon_sparse_attention(
            q,
            k,
            v,
            block_mask,
            block_size=block_size,
            key_block_lengths=lengths,
            out=out,
            config=None if gluon_config is None else GluonConfig(**gluon_config),
        )
    torch.cuda.synchronize()
    expected = chunked_reference(
        q.float(),
        k.float(),
        v.float(),
        block_mask,
        block_size=block_size,
        key_block_lengths=lengths,
    )
    assert not out.isnan().any(), "unwritten output"
    assert relative_error(out, expected) < TOLERANCE[dtype]
    assert torch.equal(out[:, 0, :block_size], torch.zeros_like(out[:, 0, :block_size]))


@pytest.mark.parametrize("backend", ["triton-portable", "triton"])
def test_dense_mask_matches_sdpa_on_gpu(backend: str) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(1, 8, 8191, 128, device="cuda", generator=generator)
        .to(torch.bfloat16)
        .transpose(1, 2)
        .contiguous()
        .transpose(1, 2)
        for _ in range(3)
    )
    block_mask = torch.ones(1, 64, 64, dtype=torch.bool, device="cuda")
    out = sparse_attention(q, k, v, block_mask, block_size=128, backend=backend)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert relative_error(out, expected) < TOLERANCE[torch.bfloat16]
