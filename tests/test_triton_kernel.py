"""The Triton block-sparse kernel and its lookup tables, on CPU through the Triton interpreter.

`make test` sets TRITON_INTERPRET=1 before triton is imported; without it (and without CUDA) the
kernel tests are skipped. Shapes stay tiny: the interpreter costs milliseconds per block pair.
Every kernel run writes into a NaN-filled output, so a block the kernel never stores fails.
"""

from __future__ import annotations

import gc
import os
import warnings
import zlib
from dataclasses import dataclass

import pytest
import torch

from compact_search.runtime import lut as lut_module
from compact_search.runtime.kernels.reference import masked_reference
from compact_search.runtime.lut import build_block_lut, cached_block_lut, clear_lut_cache

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernel = pytest.mark.skipif(
    not INTERPRETING, reason="kernel tests run under TRITON_INTERPRET=1 (make test)"
)

# Max |kernel - fp64 reference| per dtype: fp32 accumulation, output rounded to the input dtype.
# (atol, rtol) against the fp64 reference: the kernel rounds P to the input dtype for the P @ V
# product and the output to it at the end, so the error grows with the output's magnitude.
TOLERANCE = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: torch.dtype
    block_size: int = 64
    mask_heads: int | None = None  # None: one mask per head
    padded_keys: bool = False
    use_tma: bool = False

    @property
    def id(self) -> str:
        parts = [
            f"B{self.batch}-H{self.heads}-N{self.seq_len}-{DTYPE_NAMES[self.dtype]}",
            f"d{self.head_dim}-bs{self.block_size}",
        ]
        if self.mask_heads == 1:
            parts.append("shared-mask")
        if self.padded_keys:
            parts.append("padded-keys")
        if self.use_tma:
            parts.append("tma")
        return "-".join(parts)


CASES = [
    Case(1, 3, 1000, 64, torch.bfloat16),
    Case(1, 3, 1000, 64, torch.float16),
    Case(1, 2, 63, 128, torch.bfloat16),
    Case(1, 2, 63, 128, torch.float16),
    Case(2, 2, 200, 128, torch.bfloat16, padded_keys=True),
    Case(1, 2, 300, 64, torch.float16, block_size=128, padded_keys=True),
    Case(1, 3, 200, 64, torch.bfloat16, mask_heads=1),
    Case(1, 2, 200, 64, torch.bfloat16, padded_keys=True, use_tma=True),
    Case(1, 2, 300, 128, torch.float16, block_size=128, padded_keys=True, use_tma=True),
]


def random_block_mask(mask_heads: int, num_blocks: int, generator: torch.Generator) -> torch.Tensor:
    """Random [Hm, nb, nb] mask whose rows include an empty, a full and a single-block row."""
    mask = torch.rand(mask_heads, num_blocks, num_blocks, generator=generator) < 0.4
    rows = torch.randperm(num_blocks, generator=generator)
    mask[0, rows[0]] = False
    if num_blocks > 1:
        mask[0, rows[1]] = True
    if num_blocks > 2:
        mask[-1, rows[2]] = False
        mask[-1, rows[2], torch.randint(num_blocks, (1,), generator=generator)] = True
    return mask


def random_key_lengths(seq_len: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """int32 [nb]: valid-key prefixes incl. a block with no valid key and one under a key tile."""
    num_blocks = -(-seq_len // block_size)
    lengths = torch.randint(1, block_size + 1, (num_blocks,), generator=generator)
    lengths[0] = block_size
    if num_blocks > 2:
        lengths[1] = 0
        lengths[2] = 5
    return lengths.to(torch.int32)


def run_kernel(q, k, v, block_mask, **kwargs) -> torch.Tensor:
    from compact_search.runtime.kernels.triton_portable import portable_sparse_attention

    out = torch.full_like(q, float("nan"))
    result = portable_sparse_attention(q, k, v, block_mask, out=out, **kwargs)
    assert result is out
    return out


def assert_close_to_reference(out, q, k, v, block_mask, **kwargs) -> None:
    expected = masked_reference(q.double(), k.double(), v.double(), block_mask, **kwargs)
    assert not out.isnan().any(), "kernel left NaN (an unwritten block) in the output"
    atol, rtol = TOLERANCE[q.dtype]
    excess = (out.double() - expected).abs() - (atol + rtol * expected.abs())
    worst = excess.max().item()
    assert worst <= 0, f"error exceeds atol {atol:.0e} + rtol {rtol:.0e} * |ref| by {worst:.2e}"


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_matches_reference(case: Case) -> None:
    generator = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))  # not hash(): salted
    shape = (case.batch, case.heads, case.seq_len, case.head_dim)
    q, k, v = (torch.randn(shape, generator=generator).to(case.dtype) for _ in range(3))
    num_blocks = -(-case.seq_len // case.block_size)
    mask_heads = case.mask_heads or case.heads
    block_mask = random_block_mask(mask_heads, num_blocks, generator)
    lengths = (
        random_key_lengths(case.seq_len, case.block_size, generator) if case.padded_keys else None
    )
    kwargs = {"block_size": case.block_size, "scale": 0.3, "key_block_lengths": lengths}
    out = run_kernel(q, k, v, block_mask, use_tma=case.use_tma, **kwargs)
    assert_close_to_reference(out, q, k, v, block_mask, **kwargs)


@needs_kernel
def test_transposed_inputs_and_default_scale() -> None:
    """[B, N, H, D] storage viewed as [B, H, N, D] (how diffusers lays out heads)."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(1, 130, 2, 64, generator=generator).to(torch.bfloat16).transpose(1, 2)
        for _ in range(3)
    )
    block_mask = random_block_mask(2, 3, generator)
    out = run_kernel(q, k, v, block_mask, block_size=64)
    assert_close_to_reference(out, q, k, v, block_mask, block_size=64)


@needs_kernel
def test_empty_mask_outputs_zeros() -> None:
    q = k = v = torch.randn(1, 2, 100, 64).to(torch.float16)
    out = run_kernel(q, k, v, torch.zeros(2, 2, 2, dtype=torch.bool), block_size=64)
    assert torch.equal(out, torch.zeros_like(out))


@needs_kernel
def test_public_entry_point_uses_kernel() -> None:
    from compact_search import sparse_attention

    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 150, 64, generator=generator).to(torch.bfloat16) for _ in range(3))
    block_mask = random_block_mask(2, 3, generator)
    out = sparse_attention(q, k, v, block_mask, block_size=64, backend="triton")
    assert_close_to_reference(out, q, k, v, block_mask, block_size=64)


def test_unsupported_head_dim_warns_once_and_uses_reference() -> None:
    from compact_search.runtime import attention

    attention._warned_fallbacks.clear()
    q = k = v = torch.randn(1, 1, 70, 32).to(torch.bfloat16)
    block_mask = torch.ones(1, 2, 2, dtype=torch.bool)
    with pytest.warns(UserWarning, match="head dim 32"):
        first = attention.sparse_attention(q, k, v, block_mask, block_size=64, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention.sparse_attention(q, k, v, block_mask, block_size=64, backend="triton")
    expected = masked_reference(q, k, v, block_mask, block_size=64)
    assert torch.equal(first, expected)


def test_kernel_block_size_must_be_a_power_of_two() -> None:
    from compact_search import sparse_attention

    q = torch.randn(1, 1, 96, 64).to(torch.float16)
    with pytest.raises(ValueError, match="block_size must be a power of two >= 16, got 48"):
        sparse_attention(
            q, q, q, torch.ones(1, 2, 2, dtype=torch.bool), block_size=48, backend="triton"
        )


# --- lookup tables -----------------------------------------------------------------------------


def test_lut_counts_order_and_padding() -> None:
    block_mask = torch.tensor(
        [
            [[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]],
            [[0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0]],
        ],
        dtype=torch.bool,
    )
    # N = 250 with blocks of 64: the last block holds 58 keys; block 2 is tile padding (10 keys).
    lengths = torch.tensor([64, 64, 10, 64], dtype=torch.int32)
    lut = build_block_lut(block_mask, seq_len=250, block_size=64, key_block_lengths=lengths)
    assert lut.key_lengths.tolist() == [64, 64, 10, 58]
    assert lut.full_counts.tolist() == [[1, 0, 2, 0], [1, 2, 0, 1]]
    assert lut.total_counts.tolist() == [[3, 0, 4, 1], [1, 3, 0, 2]]
    assert lut.kv_block_ids.shape == (2, 4, 4)
    # Full blocks first, then padded ones; past the count the last kept id repeats (0 if empty).
    assert lut.kv_block_ids[0].tolist() == [[0, 2, 3, 3], [0, 0, 0, 0], [0, 1, 2, 3], [3, 3, 3, 3]]
    assert lut.kv_block_ids[1].tolist() == [[1, 1, 1, 1], [0, 1, 3, 3], [0, 0, 0, 0], [0, 2, 2, 2]]
    assert lut.q_block_order.tolist() == [[2, 0, 3, 1], [1, 3, 0, 2]]
    assert lut.density == pytest.approx(block_mask.float().mean().item())


def test_lut_drops_key_blocks_without_valid_keys() -> None:
    block_mask = torch.ones(1, 3, 3, dtype=torch.bool)
    lengths = torch.tensor([64, 0, 64], dtype=torch.int32)
    lut = build_block_lut(block_mask, seq_len=192, block_size=64, key_block_lengths=lengths)
    assert lut.total_counts.tolist() == [[2, 2, 2]]
    assert lut.kv_block_ids[0, 0, :2].tolist() == [0, 2]


def test_lut_rejects_wrong_mask_shape() -> None:
    with pytest.raises(ValueError, match="nb = ceil"):
        build_block_lut(torch.ones(1, 3, 3, dtype=torch.bool), seq_len=100, block_size=64)


def test_lut_cache_hits_and_invalidation() -> None:
    clear_lut_cache()
    block_mask = torch.rand(2, 5, 5) < 0.5
    first = cached_block_lut(block_mask, seq_len=300, block_size=64)
    assert cached_block_lut(block_mask, seq_len=300, block_size=64) is first
    lengths = torch.full((5,), 64, dtype=torch.int32)
    with_lengths = cached_block_lut(
        block_mask, seq_len=300, block_size=64, key_block_lengths=lengths
    )
    assert with_lengths is not first
    # The same lengths tensor hits; a fresh one rebuilds (comparing values would sync the GPU).
    again = cached_block_lut(block_mask, seq_len=300, block_size=64, key_block_lengths=lengths)
    assert again is with_lengths
    fresh = cached_block_lut(
        block_mask, seq_len=300, block_size=64, key_block_lengths=lengths.clone()
    )
    assert fresh is not with_lengths and torch.equal(fresh.kv_block_ids, with_lengths.kv_block_ids)
    block_mask[0, 0] = ~block_mask[0, 0]  # an in-place edit bumps the version: rebuild
    rebuilt = cached_block_lut(block_mask, seq_len=300, block_size=64)
    assert rebuilt is not first
    assert rebuilt.total_counts[0, 0] == block_mask[0, 0].sum()
    del block_mask, first, with_lengths, again, fresh, rebuilt
    gc.collect()
    assert not lut_module._LUT_CACHE, "a collected mask must leave the cache"


CONFIGS = {"BM64-BN64": (64, 64), "BM64-BN128": (64, 128), "BM128-BN128": (128, 128)}


@needs_kernel
@pytest.mark.parametrize("name", CONFIGS)
def test_kernel_configs_match_reference(name: str) -> None:
    """64-row query tiles on 128-token mask blocks (two programs per block) and 128-key tiles,
    with padded keys and a row whose kept blocks are all padded."""
    from compact_search.runtime.kernels.triton_portable import kernel_config

    block_m, block_n = CONFIGS[name]
    config = kernel_config(block_m, block_n, 4, 3)
    generator = torch.Generator().manual_seed(3)
    # Large-magnitude queries make the running max jump between tiles (exercises rescaling).
    q = (4 * torch.randn(1, 2, 400, 64, generator=generator)).to(torch.bfloat16)
    k, v = (torch.randn(1, 2, 400, 64, generator=generator).to(torch.bfloat16) for _ in range(2))
    block_mask = random_block_mask(2, 4, generator)
    block_mask[1, 0] = torch.tensor([False, False, True, True])  # only padded key blocks
    lengths = torch.tensor([128, 128, 44, 16], dtype=torch.int32)
    kwargs = {"block_size": 128, "key_block_lengths": lengths}
    out = run_kernel(q, k, v, block_mask, config=config, **kwargs)
    assert_close_to_reference(out, q, k, v, block_mask, **kwargs)


def test_tma_layout_check_wants_unit_stride_d_and_16_byte_strides():
    from compact_search.runtime.kernels.common import tma_layout_ok

    base = torch.empty(1, 2, 64, 72, dtype=torch.float16)
    assert tma_layout_ok(base[..., :64])  # row stride 144 bytes
    assert not tma_layout_ok(torch.empty(1, 2, 64, 65, dtype=torch.float16)[..., :64])
    assert not tma_layout_ok(base[..., ::2])  # stride 2 along D
    token_major = torch.empty(1, 64, 2, 64, dtype=torch.bfloat16).transpose(1, 2)
    assert tma_layout_ok(token_major)  # [B, N, H, D] storage seen as [B, H, N, D]
