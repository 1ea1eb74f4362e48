"""torch.compile with `apply` active (CPU): the operators, zero graph breaks, one graph per step
bucket plus dense whatever the number of layers, compiled output equal to eager output."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel
from torch._dynamo.testing import CompileCounterWithBackend

from compact_search.config import (
    CompactConfig,
    GeometrySpec,
    HeadEntry,
    ModelSpec,
    StepSchedule,
    uniform_config,
)
from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape
from compact_search.patterns import HeadPattern
from compact_search.runtime.apply import CompactHandle, StepTracker, apply
from compact_search.runtime.attention import recorded_kernels
from compact_search.runtime.kernels.common import lut_tensors
from compact_search.runtime.kernels.reference import masked_reference
from compact_search.runtime.lut import build_block_lut
from compact_search.runtime.tables import TABLES_ATTRIBUTE

GRID = Grid(3, 4, 5)  # latent 3 x 8 x 10 with patch (1, 2, 2)
LAYERS = 3  # more layers than step buckets
SCHEDULE = StepSchedule(num_steps=6, dense_steps=1, bucket_starts=(1, 3))
# (step, bucket) over a 6-step run: the dense warm-up, then buckets 0 and 1, each seen twice
STEPS = [(0, None), (1, 0), (3, 1), (4, 1), (2, 0), (0, None), (5, 1)]


def small_wan(layers=LAYERS, seed=0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=64,
        num_layers=layers,
        rope_max_seq_len=64,
    ).eval()


def two_bucket_config(layers=LAYERS) -> CompactConfig:
    """Patterns that differ by bucket, layer and head, so the layers' tables differ in width."""
    tile_grid = GeometrySpec(GRID, TileShape(2, 2, 3), 8).layout().tile_grid  # 2 x 2 x 2
    local, dense = HeadPattern.local(0, 0, 0), HeadPattern.dense()
    per_layer = [
        (local, local),
        (dense, local),
        (HeadPattern.local(1, 0, 0), HeadPattern.global_(tile_grid, frames=0)),
    ]
    heads = tuple(
        tuple(
            tuple(HeadEntry(p) for p in per_layer[(bucket + layer) % len(per_layer)])
            for layer in range(layers)
        )
        for bucket in range(2)
    )
    return CompactConfig(
        ModelSpec("small-wan", "wan", layers, 2, 32),
        GeometrySpec(GRID, TileShape(2, 2, 3), block_size=8),
        SCHEDULE,
        heads,
    )


def inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 3, 8, 10, generator=gen), torch.randn(1, 7, 16, generator=gen)


@torch.no_grad()
def forward(model, latents=None, timestep=500.0):
    default_latents, text = inputs()
    latents = default_latents if latents is None else latents
    return model(latents, torch.tensor([timestep]), text, return_dict=False)[0]


def eager_outputs(model, handle) -> dict:
    out = {}
    for step, bucket in STEPS:
        handle.set_step(step, SCHEDULE.num_steps)
        out.setdefault(bucket, forward(model))
    return out


@pytest.mark.parametrize(
    "backend, dtype, head_dim, precision, block_size",
    [
        ("reference", torch.float32, 24, "bf16", 16),
        ("triton-portable", torch.float16, 64, "bf16", 16),
        ("reference", torch.bfloat16, 64, "fp8", 64),
        ("triton-portable", torch.float16, 64, "fp8", 64),
        ("triton-portable", torch.bfloat16, 64, "int8", 64),
    ],
    ids=["reference-fp32", "portable-fp16", "reference-fp8", "portable-fp8", "portable-int8"],
)
def test_the_operators_pass_opcheck_with_token_major_inputs(
    backend, dtype, head_dim, precision, block_size
):
    """`torch.library.opcheck`: schema, fake implementation (sizes, strides, dtype of the real
    output), and the operator under AOT dispatch, for q, k, v that are [B, H, N, D] views of
    token-major [B, N, H, D] storage, as the runtime passes them; 2.5 blocks of tokens (the last
    one ragged) with key padding and an empty row."""
    gen = torch.Generator().manual_seed(0)
    seq_len = 5 * block_size // 2
    q, k, v = (
        torch.randn(1, seq_len, 2, head_dim, generator=gen).to(dtype).transpose(1, 2)
        for _ in range(3)
    )  # [B, H, N, D] views
    mask = torch.rand(2, 3, 3, generator=gen) < 0.6  # [H, nb, nb]
    mask[1, 0] = False  # an empty row: zeros
    mask[:, :, 0] = True
    # block 1 padded; the last one ragged (half a block)
    lengths = torch.tensor([block_size, block_size * 11 // 16, block_size // 2], dtype=torch.int32)
    lut = build_block_lut(mask, seq_len=seq_len, block_size=block_size, key_block_lengths=lengths)
    ops = torch.ops.compact_search
    scale = head_dim**-0.5
    table_args = (q, k, v, *lut_tensors(lut), block_size, scale, lut.density, backend, precision)
    torch.library.opcheck(ops.sparse_attention_lut.default, table_args)
    torch.library.opcheck(
        ops.sparse_attention.default,
        (q, k, v, mask, lengths, block_size, scale, backend, precision),
    )
    with recorded_kernels() as ran:
        out = ops.sparse_attention_lut.default(*table_args)
    assert ran == [backend if precision == "bf16" else f"{backend}-{precision}"]
    assert out.stride() == q.stride()  # token-major, as the fake promises
    expected = masked_reference(
        q.double(), k.double(), v.double(), mask, block_size=block_size, key_block_lengths=lengths
    )
    if precision != "bf16":  # INT8 Q K^T, e4m3 (int8) P and V: ~4e-2 (2e-2), docs/kernel.md
        error = (out.double() - expected).norm() / expected.norm()
        assert error < (5e-2 if precision == "fp8" else 3e-2)
        return
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_tables_of_one_bucket_share_a_shape_and_match_each_layer_mask():
    config = two_bucket_config()
    layout = config.layout()
    model = small_wan()
    handle = apply(model, config, grid=GRID, backend="triton")  # a kernel that reads tables
    widths = set()
    for layer, block in enumerate(model.blocks):
        tables = getattr(block.attn1, TABLES_ATTRIBUTE)
        for bucket, bucket_tables in enumerate(tables.buckets):
            natural = build_block_lut(
                config.block_masks(bucket, layer),
                seq_len=layout.padded_len,
                block_size=layout.block_size,
                key_block_lengths=layout.key_block_lengths(),
            )
            width = natural.kv_block_ids.shape[-1]
            widths.add((bucket, width))
            assert torch.equal(bucket_tables.kv_block_ids[..., :width], natural.kv_block_ids)
            assert torch.equal(bucket_tables.total_counts, natural.total_counts)
    assert len({w for b, w in widths if b == 0}) > 1, "the test needs layers of different widths"
    shapes = {
        (b, getattr(block.attn1, TABLES_ATTRIBUTE).buckets[b].kv_block_ids.shape)
        for block in model.blocks
        for b in range(2)
    }
    assert len(shapes) == 2  # one shape per bucket
    assert not any(TABLES_ATTRIBUTE in key for key in model.state_dict())  # not persistent
    handle.revert()
    assert not any(hasattr(block.attn1, TABLES_ATTRIBUTE) for block in model.blocks)


def test_compiled_repeated_blocks_run_one_graph_per_bucket_and_dense():
    model = small_wan()
    handle = apply(model, two_bucket_config(), grid=GRID)
    expected = eager_outputs(model, handle)
    assert (expected[0] - expected[None]).abs().max() > 1e-3  # sparsity changes the output
    eager_calls = dict(handle.calls)
    counter = CompileCounterWithBackend("aot_eager")
    model.compile_repeated_blocks(fullgraph=True, backend=counter)
    for step, bucket in STEPS:  # fullgraph=True: a graph break would raise here
        handle.set_step(step, SCHEDULE.num_steps)
        assert handle.bucket == bucket
        torch.testing.assert_close(forward(model), expected[bucket], rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 3  # dense + 2 buckets, for 3 layers
    assert handle.calls == eager_calls  # compiled graphs run no Python bookkeeping
    handle.revert()


def test_explain_finds_no_graph_break_in_the_whole_transformer():
    model = small_wan(layers=2)
    handle = apply(model, two_bucket_config(layers=2), grid=GRID)
    handle.set_step(4)
    latents, text = inputs()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(
            latents, torch.tensor([500.0]), text, return_dict=False
        )
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    handle.revert()


@pytest.mark.slow
def test_inductor_compiled_blocks_equal_eager_at_a_sparse_step():
    model = small_wan(layers=2)
    handle = apply(model, two_bucket_config(layers=2), grid=GRID)
    handle.set_step(1)
    expected = forward(model)
    counter = CompileCounterWithBackend("inductor")
    model.compile_repeated_blocks(fullgraph=True, backend=counter)
    for _ in range(2):
        torch.testing.assert_close(forward(model), expected, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    handle.revert()


def unipc():
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )


def denoise(pipeline, transformer, steps) -> tuple[torch.Tensor, list]:
    """A diffusers-style sampling loop: set_timesteps, then one transformer call and one
    scheduler step per timestep. Returns the latents and the handle's bucket at every call."""
    latents, text = inputs()
    pipeline.scheduler.set_timesteps(steps)
    buckets = []
    for t in pipeline.scheduler.timesteps:
        buckets.append(pipeline.handle.bucket)
        with torch.no_grad():
            velocity = transformer(latents, t[None], text, return_dict=False)[0]
        latents = pipeline.scheduler.step(velocity, t, latents).prev_sample
    return latents, buckets


def test_a_diffusers_scheduler_drives_the_steps_of_a_compiled_transformer():
    """torch.compile(transformer, fullgraph=True) inside a sampling loop: one graph per bucket
    plus dense for 3 layers, the same latents as the eager loop."""
    model = small_wan()
    config = two_bucket_config()
    eager_pipeline = SimpleNamespace(transformer=model, scheduler=unipc())
    eager_pipeline.handle = apply(eager_pipeline, config)
    expected, buckets = denoise(eager_pipeline, model, 6)
    assert buckets == [None, 0, 0, 1, 1, 1]
    eager_pipeline.handle.revert()
    assert "step" not in vars(eager_pipeline.scheduler)  # the scheduler's own methods again

    pipeline = SimpleNamespace(transformer=model, scheduler=unipc())
    pipeline.handle = apply(pipeline, config)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    got, buckets = denoise(pipeline, compiled, 6)
    assert buckets == [None, 0, 0, 1, 1, 1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # 12 steps map onto the config's 6 by position; no new graph
    _, buckets = denoise(pipeline, compiled, 12)
    assert buckets == [None, None] + [0] * 4 + [1] * 6
    assert counter.frame_count == 3
    pipeline.handle.revert()


def test_set_step_takes_one_argument_and_refuses_bad_steps():
    model = small_wan(layers=2)
    handle = apply(model, two_bucket_config(layers=2), grid=GRID)
    handle.set_step(3)  # of the config's own 6 steps
    assert (handle.tracker.num_steps, handle.bucket) == (6, 1)
    handle.set_step(1, 12)  # position 0.5 of 6: dense warm-up
    assert handle.bucket is None
    for bad in (-1, 1.5, True):
        with pytest.raises(UserInputError, match="step must be an integer"):
            handle.set_step(bad)
    with pytest.raises(UserInputError, match="num_steps must be an integer >= 1"):
        handle.set_step(1, 0)
    handle.revert()


def test_fewer_prefix_tokens_rebuild_the_tables_inside_the_graph():
    """HunyuanVideo calls with fewer real text tokens than profiled: the tables are rebuilt for
    the shorter prefix in tensor operations, so the compiled call equals the eager one."""
    geometry = GeometrySpec(GRID, TileShape(2, 2, 3), 16, prefix_tokens=20, prefix_at="end")
    config = uniform_config(
        ModelSpec("small-hunyuan", "hunyuanvideo", 1, 2, 32),
        geometry,
        StepSchedule(num_steps=4, dense_steps=1, bucket_starts=(1,)),
        [HeadPattern.local(0, 0, 0), HeadPattern.local(1, 1, 1)],
    )
    handle = CompactHandle(config, None, StepTracker(None), "reference")
    handle.set_step(3)
    tables = handle.layer_tables(torch.device("cpu"))[0]
    compiled = torch.compile(
        lambda q, k, v: handle.attention(tables, q, k, v), fullgraph=True, backend="aot_eager"
    )
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, GRID.num_tokens + 3, 32, generator=gen).unbind(0)
    torch.testing.assert_close(compiled(q, k, v), handle.attention(0, q, k, v), rtol=0, atol=0)
