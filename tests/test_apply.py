"""apply(): the runtime inside a diffusers Wan transformer (small random weights, CPU)."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import WanTransformer3DModel

from compact_search.config import GeometrySpec, ModelSpec, StepSchedule, uniform_config
from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape
from compact_search.patterns import FrameGroup, HeadPattern, Rect
from compact_search.runtime.apply import apply, rescale_config
from compact_search.runtime.kernels.reference import masked_reference

GRID = Grid(3, 4, 5)  # latent 3 x 8 x 10 with patch (1, 2, 2)


def small_wan(seed=0, head_dim=32):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=64,
    ).eval()


def inputs(seed=1):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 3, 8, 10, generator=gen)
    text = torch.randn(1, 7, 16, generator=gen)
    return latents, text


def forward(model, timestep=500.0):
    latents, text = inputs()
    with torch.no_grad():
        return model(latents, torch.tensor([timestep]), text, return_dict=False)[0]


def config_for(patterns, grid=GRID, tile=(2, 2, 3), block_size=8, head_dim=32):
    model = ModelSpec("small-wan", "wan", num_layers=2, num_heads=2, head_dim=head_dim)
    geometry = GeometrySpec(grid, TileShape(*tile), block_size=block_size)
    schedule = StepSchedule(num_steps=4, dense_steps=1, bucket_starts=(1,))
    return uniform_config(model, geometry, schedule, patterns)


def test_dense_patterns_reproduce_the_model_and_revert_is_exact():
    model = small_wan()
    before = forward(model)
    originals = [block.attn1.processor for block in model.blocks]
    handle = apply(model, config_for([HeadPattern.dense()] * 2), grid=GRID)
    handle.set_step(3, 4)  # a sparse-bucket step: the kernel path with all blocks kept
    torch.testing.assert_close(forward(model), before, rtol=1e-5, atol=1e-5)
    assert handle.calls["sparse"] == 2 and handle.calls["dense"] == 0
    handle.revert()
    assert [block.attn1.processor for block in model.blocks] == originals
    assert torch.equal(forward(model), before)


def test_sparse_step_matches_reference_on_permuted_tokens():
    model = small_wan()
    config = config_for([HeadPattern.local(0, 0, 0), HeadPattern.local(1, 1, 1)])
    layout = config.layout()
    seen = []

    def recording(layer, q, k, v):
        seen.append((q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    from compact_search.models.wan import install_wan_attention

    with install_wan_attention(model, recording):
        forward(model)
    handle = apply(model, config)
    handle.set_step(2, 4)
    outputs = []
    original = handle.attention

    def capture(layer, q, k, v):
        out = original(layer, q, k, v)
        outputs.append(out)
        return out

    handle._attention_handle.revert()
    handle._attention_handle = install_wan_attention(model, capture)
    forward(model)
    handle.revert()
    # layer 0 sees identical inputs in both runs: compare its output with the reference
    q, k, v = seen[0]
    expected = layout.from_slots(
        masked_reference(
            layout.to_slots(q),
            layout.to_slots(k),
            layout.to_slots(v),
            config.block_masks(0, 0),
            block_size=8,
            key_block_lengths=layout.key_block_lengths(),
        )
    )
    torch.testing.assert_close(outputs[0], expected, rtol=1e-5, atol=1e-6)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (outputs[0] - dense).abs().max() > 1e-3  # sparsity changed something


def test_steps_follow_the_scheduler():
    model = small_wan()
    timesteps = torch.tensor([999.0, 750.0, 500.0, 250.0])
    pipeline = SimpleNamespace(transformer=model, scheduler=SimpleNamespace(timesteps=timesteps))
    handle = apply(pipeline, config_for([HeadPattern.local(0, 0, 0)] * 2))
    forward(model, timestep=999.0)  # step 0: dense warm-up
    assert handle.calls == {"dense": 2, "sparse": 0}
    forward(model, timestep=250.0)  # step 3: bucket 0
    assert handle.calls == {"dense": 2, "sparse": 2}
    assert handle.tracker.step == 3
    handle.revert()


def test_a_sparse_warm_up_bucket_runs_its_own_patterns_from_step_0():
    """A config whose warm-up is bucket 0 (dense_steps 0, its own threshold) runs the kernel
    with bucket 0's masks in the warm-up steps and bucket 1's after them."""
    from compact_search.config import CompactConfig, HeadEntry

    model = small_wan()
    base = config_for([HeadPattern.dense()] * 2)
    schedule = StepSchedule(
        num_steps=4, dense_steps=0, bucket_starts=(0, 2), bucket_recall=(0.97, 0.9)
    )
    warm = HeadPattern((FrameGroup(0, 2, (Rect(0, 1, wrap="w"),)),))
    late = HeadPattern.local(0, 0, 0)
    heads = tuple(
        tuple(tuple(HeadEntry(p) for p in (pattern, pattern)) for _ in range(2))
        for pattern in (warm, late)
    )
    config = CompactConfig(base.model, base.geometry, schedule, heads, base.provenance)

    def outputs_under(cfg, timesteps_run):
        pipeline = SimpleNamespace(
            transformer=model, scheduler=SimpleNamespace(timesteps=timesteps)
        )
        handle = apply(pipeline, cfg)
        outs, buckets = [], []
        for t in timesteps_run:
            outs.append(forward(model, timestep=t))
            buckets.append(handle.current_bucket())
        calls = dict(handle.calls)
        handle.revert()
        return outs, buckets, calls

    def only(pattern):
        same = tuple(
            tuple(tuple(HeadEntry(pattern) for _ in range(2)) for _ in range(2)) for _ in range(2)
        )
        return CompactConfig(base.model, base.geometry, schedule, same, base.provenance)

    timesteps = torch.tensor([999.0, 750.0, 500.0, 250.0])
    (warm_step, late_step), buckets, calls = outputs_under(config, [999.0, 250.0])
    assert buckets == [0, 1] and calls == {"dense": 0, "sparse": 4}
    (all_warm, _), _, _ = outputs_under(only(warm), [999.0, 250.0])
    (late_at_0, all_late), _, _ = outputs_under(only(late), [999.0, 250.0])
    # step 0 ran bucket 0's (warm-up) patterns, step 3 bucket 1's, each through the kernel path
    assert torch.equal(warm_step, all_warm) and torch.equal(late_step, all_late)
    assert not torch.equal(warm_step, late_at_0)  # the two buckets' patterns differ in effect


def test_unknown_step_warns_once_and_runs_dense():
    model = small_wan()
    before = forward(model)
    handle = apply(model, config_for([HeadPattern.local(0, 0, 0)] * 2))
    with pytest.warns(UserWarning, match="step is unknown"):
        out = forward(model)
    torch.testing.assert_close(out, before, rtol=1e-5, atol=1e-5)
    assert handle.calls == {"dense": 2, "sparse": 0}
    handle.revert()


def test_geometry_mismatches_fail_in_one_line():
    model = small_wan()
    wrong_heads = uniform_config(
        ModelSpec("x", "wan", 2, 3, 32),
        GeometrySpec(GRID, TileShape(2, 2, 3), 8),
        StepSchedule(4, 1, (1,)),
        HeadPattern.dense(),
    )
    with pytest.raises(UserInputError, match="3 heads x head dim 32 .*the model has 2 x 2 x 32"):
        apply(model, wrong_heads)
    other_grid = config_for([HeadPattern.dense()] * 2, grid=Grid(3, 4, 6))
    with pytest.raises(UserInputError, match="does not fit the model grid"):
        apply(model, other_grid, grid=GRID)
    handle = apply(model, other_grid)  # no grid known up front: fails at the first call
    handle.set_step(3, 4)
    with pytest.raises(UserInputError, match="config geometry does not fit"):
        forward(model)
    handle.revert()


def test_rescale_adapts_windows_and_says_recall_is_not_guaranteed():
    config = config_for([HeadPattern.local(1, 1, 1)] * 2, grid=Grid(3, 4, 5))
    rescaled, note = rescale_config(config, Grid(6, 8, 10))
    assert rescaled.geometry.grid == Grid(6, 8, 10)
    assert rescaled.pattern(0, 0, 0) == HeadPattern.local(2, 2, 2)
    assert "no longer guaranteed" in note
    # bands keep their start (scaled down) and wrapped axes stay wrapped, clipped to n // 2
    band = HeadPattern((FrameGroup(0, 2, (Rect(1, 1, 1, 0, ("w",)), Rect(1, 0))),))
    rescaled, _ = rescale_config(config_for([band] * 2, grid=Grid(3, 4, 5)), Grid(6, 8, 10))
    assert rescaled.pattern(0, 0, 0) == HeadPattern(
        (FrameGroup(0, 3, (Rect(2, 2, 2, 0, ("w",)), Rect(2, 0))),)
    )
    model = small_wan()
    handle = apply(
        model,
        config_for([HeadPattern.local(1, 1, 1)] * 2, grid=Grid(3, 4, 6)),
        grid=GRID,
        rescale=True,
    )
    assert handle.config.geometry.grid == GRID and handle.notes
    handle.set_step(3, 4)
    forward(model)
    handle.revert()


def test_one_line_apply_follows_the_builtin_sampler():
    from compact_search.models.tiny.pipeline import TinyModelConfig, TinyVideoPipeline, build_models

    torch.manual_seed(0)
    tiny = TinyModelConfig(num_layers=2, num_heads=2, head_dim=32, ffn_dim=64)
    pipeline = TinyVideoPipeline(tiny, *build_models(tiny))
    config = uniform_config(
        ModelSpec("tiny-random", "wan", 2, 2, 32),
        GeometrySpec(Grid(*pipeline.grid), TileShape(2, 4, 8), block_size=64),
        StepSchedule(num_steps=4, dense_steps=1, bucket_starts=(1, 3)),
        [HeadPattern.local(0, 0, 0)] * 2,
    )
    handle = apply(pipeline, config)
    seen = []
    pipeline(
        "a red circle moves left",
        num_steps=4,
        seed=0,
        callback=lambda step, total: seen.append(step),
    )
    # 4 steps x 2 layers; the first step dense, guidance batches both halves in one call
    assert handle.calls == {"dense": 2, "sparse": 6}
    assert handle.tracker.step == 3 and seen == [0, 1, 2, 3]
    handle.revert()


@pytest.mark.parametrize("real_text", [1, 3, 16, 17, 20])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fewer_text_tokens_than_profiled_are_padded_and_never_attended(real_text, backend):
    """HunyuanVideo hands attention only a prompt's real text tokens, after the video: with fewer
    than the config's 20 prefix tokens (2 blocks of 16; 3 leaves the second all padding) the
    missing ones are padded and must get no weight, so dense patterns equal plain attention over
    the real tokens, and the padded rows are dropped."""
    from compact_search.runtime.apply import CompactHandle, StepTracker

    model = ModelSpec("small-hunyuan", "hunyuanvideo", num_layers=1, num_heads=2, head_dim=64)
    geometry = GeometrySpec(GRID, TileShape(2, 2, 3), 16, prefix_tokens=20, prefix_at="end")
    schedule = StepSchedule(num_steps=4, dense_steps=1, bucket_starts=(1,))
    config = uniform_config(model, geometry, schedule, HeadPattern.dense())
    handle = CompactHandle(config, None, StepTracker(None), backend)
    handle.set_step(3, 4)  # a sparse-bucket step
    dtype = torch.float16 if backend == "triton" else torch.float32  # the kernel's dtypes
    gen = torch.Generator().manual_seed(real_text)
    n = GRID.num_tokens + real_text
    q, k, v = torch.randn(3, 1, 2, n, 64, generator=gen).to(dtype).unbind(0)  # [B, H, N, D]
    from compact_search.runtime.attention import recorded_kernels

    with recorded_kernels() as ran:
        got = handle.attention(0, q, k, v)
    assert ran == ["triton-portable" if backend == "triton" else "reference"]
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert got.shape == q.shape and handle.calls["sparse"] == 1
    tolerance = 2e-2 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)

    with pytest.raises(UserInputError, match="longer than every profiled one"):
        handle.attention(0, *(torch.zeros(1, 2, GRID.num_tokens + 21, 64, dtype=dtype),) * 3)


@pytest.mark.parametrize(
    ("backend", "dtype", "kernel"),
    [("reference", torch.float32, "reference"), ("triton", torch.bfloat16, "triton-portable")],
    ids=["reference", "triton"],
)
def test_token_major_inputs_take_the_row_gather_and_give_the_same_output(backend, dtype, kernel):
    # Processors pass [B, H, N, D] views of token-major [B, N, H, D] projections; the handle
    # gathers those along N in their own storage. Same values in either memory order must give
    # the same output, on the reference and on the kernel (interpreter, head dim 64, bf16: the
    # kernel's dtypes, so it does not fall back).
    from compact_search.runtime.attention import recorded_kernels

    model = small_wan(head_dim=64)
    patterns = [HeadPattern.local(0, 1, 1), HeadPattern.local(1, 0, 1)]
    config = config_for(patterns, block_size=16, head_dim=64)  # the kernel's smallest block
    handle = apply(model, config, backend=backend)
    handle.set_step(3, 4)
    gen = torch.Generator().manual_seed(3)
    token_major = [
        torch.randn(1, GRID.num_tokens, 2, 64, generator=gen).to(dtype) for _ in range(3)
    ]
    views = [t.transpose(1, 2) for t in token_major]  # [B, H, N, D], not contiguous
    copies = [t.contiguous() for t in views]
    with recorded_kernels() as ran:
        out_views = handle.attention(0, *views)
        out_copies = handle.attention(0, *copies)
    assert ran == [kernel, kernel]
    layout = config.layout()
    expected = layout.from_slots(
        masked_reference(
            *(layout.to_slots(t.double()) for t in copies),
            config.block_masks(0, 0),
            block_size=16,
            key_block_lengths=layout.key_block_lengths(),
        )
    )
    handle.revert()
    # fp32 casts: the interpreter computes in fp32, the comparison must not round to bf16 again
    torch.testing.assert_close(out_views.float(), out_copies.float(), rtol=0, atol=0)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out_views.double(), expected, rtol=tolerance, atol=tolerance)
    assert out_views.transpose(1, 2).is_contiguous()  # what the processor flattens next


def test_a_second_apply_on_the_same_model_is_refused_until_the_first_is_reverted():
    model = small_wan()
    before = forward(model)
    local = config_for([HeadPattern.local(0, 0, 0)] * 2)
    first = apply(model, config_for([HeadPattern.dense()] * 2))
    with pytest.raises(UserInputError, match="already runs a compact-search config") as info:
        apply(model, local)
    assert "\n" not in str(info.value)
    first.set_step(3, 4)
    torch.testing.assert_close(forward(model), before, rtol=1e-5, atol=1e-5)  # still the first
    first.revert()
    second = apply(model, local)
    second.set_step(3, 4)
    assert (forward(model) - before).abs().max() > 1e-3  # the second config runs now
    second.revert()
    assert torch.equal(forward(model), before)


def test_set_attn_processor_after_apply_warns_and_revert_keeps_the_new_processors():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = small_wan()
    stock = forward(model)
    handle = apply(model, config_for([HeadPattern.local(0, 0, 0)] * 2))
    handle.set_step(3, 4)
    sparse = forward(model)
    assert (sparse - stock).abs().max() > 1e-3
    mine = WanAttnProcessor()
    with pytest.warns(UserWarning, match="replaced the compact attention of 2 of 2"):
        model.set_attn_processor(mine)
    assert handle.bypassed_layers() == [0, 1]
    calls = dict(handle.calls)
    torch.testing.assert_close(forward(model), stock, rtol=1e-5, atol=1e-5)  # mine run
    assert handle.calls == calls
    handle.install_attention()  # compact again, over my processors
    assert handle.bypassed_layers() == []
    torch.testing.assert_close(forward(model), sparse, rtol=0, atol=0)
    handle.revert()
    assert all(block.attn1.processor is mine for block in model.blocks)  # not the originals
    assert "set_attn_processor" not in vars(model)  # the model's own method again
    torch.testing.assert_close(forward(model), stock, rtol=1e-5, atol=1e-5)


def test_revert_restores_only_the_layers_still_running_compact_attention():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    model = small_wan()
    original = model.blocks[0].attn1.processor
    handle = apply(model, config_for([HeadPattern.local(0, 0, 0)] * 2))
    processors = model.attn_processors  # diffusers' own view works with apply active
    mine = WanAttnProcessor()
    processors["blocks.1.attn1.processor"] = mine
    with pytest.warns(UserWarning, match="1 of 2 self-attention layers"):
        model.set_attn_processor(processors)
    assert handle.bypassed_layers() == [1]
    handle.revert()
    assert model.blocks[0].attn1.processor is original
    assert model.blocks[1].attn1.processor is mine


@pytest.mark.parametrize("backend", ["auto", "reference", "flex"])
def test_backends_that_run_from_a_mask_get_no_lookup_tables(backend, monkeypatch):
    """On CPU "auto" is the reference: apply builds block masks only (the tables cost ~10x
    more on a 14B-sized layer), and gives what the lookup-table path gives."""
    from compact_search.runtime import attention
    from compact_search.runtime import tables as tables_module
    from compact_search.runtime.attention import recorded_kernels
    from compact_search.runtime.tables import TABLES_ATTRIBUTE, BucketMasks, BucketTables

    config = config_for([HeadPattern.local(0, 0, 0), HeadPattern.local(1, 1, 1)])
    model = small_wan()
    attention._warned_fallbacks.clear()
    with pytest.warns(UserWarning, match="head dim 32"):  # the kernel falls back to the reference
        from_tables = apply(model, config, backend="triton-portable")
        from_tables.set_step(3, 4)
        expected = forward(model)
    buckets = getattr(model.blocks[0].attn1, TABLES_ATTRIBUTE).buckets
    assert all(isinstance(b, BucketTables) for b in buckets)
    from_tables.revert()

    def no_tables(*args, **kwargs):
        raise AssertionError("a lookup table was built for a backend that never reads it")

    monkeypatch.setattr(tables_module, "build_block_lut", no_tables)
    handle = apply(model, config, backend=backend)
    buckets = getattr(model.blocks[0].attn1, TABLES_ATTRIBUTE).buckets
    assert all(isinstance(b, BucketMasks) for b in buckets)
    handle.set_step(3, 4)
    with recorded_kernels() as ran:
        got = forward(model)
    assert ran == ["reference" if backend == "auto" else backend] * 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    handle.revert()
