"""The shipped tiny model: files, loading, offline CPU sampling, determinism, step callback."""

import torch

from compact_search.models.tiny import load_tiny_pipeline, save_gif
from compact_search.models.tiny.pipeline import CONFIG_FILE, WEIGHTS_DIR, WEIGHTS_FILE

PROMPT = "a green square moves right quickly over a striped grey background"


def test_shipped_weights_are_small_and_load_as_the_documented_model():
    assert (WEIGHTS_DIR / WEIGHTS_FILE).stat().st_size <= 16 * 1024 * 1024
    assert (WEIGHTS_DIR / CONFIG_FILE).is_file()
    pipeline = load_tiny_pipeline("cpu")
    assert type(pipeline.transformer).__name__ == "WanTransformer3DModel"
    assert pipeline.grid == (8, 16, 16)
    assert len(pipeline.transformer.blocks) == 6
    assert pipeline.transformer.config.in_channels == 3
    assert pipeline.metadata["training"]["steps"] > 0


def test_sampling_is_deterministic_for_a_seed_and_calls_back_before_each_transformer_call():
    torch.set_num_threads(2)
    pipeline = load_tiny_pipeline("cpu")
    events = []
    hook = pipeline.transformer.register_forward_pre_hook(lambda module, args: events.append("T"))
    try:
        first = pipeline(
            PROMPT, num_steps=2, seed=7, callback=lambda step, total: events.append((step, total))
        )
    finally:
        hook.remove()
    assert events == [(0, 2), "T", (1, 2), "T"]
    again = pipeline(PROMPT, num_steps=2, seed=7)
    other_seed = pipeline(PROMPT, num_steps=2, seed=8)
    assert first.videos.shape == (1, 3, 8, 32, 32)
    assert torch.isfinite(first.videos).all()
    assert torch.equal(first.videos, again.videos)
    assert not torch.equal(first.videos, other_seed.videos)


def test_gif_has_one_frame_per_video_frame(tmp_path):
    from PIL import Image

    video = torch.rand(3, 8, 32, 32)
    path = save_gif(video, tmp_path / "clip.gif", scale=2)
    with Image.open(path) as image:
        assert image.n_frames == 8
        assert image.size == (64, 64)
