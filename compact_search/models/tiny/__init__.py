"""The built-in tiny video DiT: a diffusers Wan transformer trained on procedural videos.

`load_tiny_pipeline(device="cpu")` returns the shipped model as a `TinyVideoPipeline` with
`.transformer` (a `WanTransformer3DModel`), `.text_encoder`, `.grid` (8, 16, 16) and a sampling
call `pipeline(prompts, num_steps=20, guidance_scale=4.0, seed=0, callback=None)`.
See docs/tiny-model.md.
"""

from compact_search.models.tiny.pipeline import (
    TinyModelConfig,
    TinySample,
    TinyVideoPipeline,
    load_tiny_pipeline,
)
from compact_search.previews import save_gif

__all__ = ["TinyModelConfig", "TinySample", "TinyVideoPipeline", "load_tiny_pipeline", "save_gif"]
