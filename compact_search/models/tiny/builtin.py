"""The built-in tiny model as a plug-in of the Wan adapter (its transformer is a diffusers Wan one).

`builtin:tiny` is the shipped model (`weights/`); `builtin:tiny-random` is the same architecture
at the run profile's size with weights seeded in code (tests, benchmarks). Both sample videos in
pixel space, score fidelity with the detector (`detector.py`) and offer held-out prompts (scenes
whose colour, shape and direction never occur in training, `data.HELD_OUT_TRIPLES`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compact_search.errors import UserInputError
from compact_search.geometry import Grid
from compact_search.models.plugin import (
    TORCH_DTYPES,
    Adapter,
    BuiltinModel,
    FidelityReport,
    LoadedModel,
    ModelSettings,
)
from compact_search.models.tiny.data import prompt_attributes, sample_scene_specs
from compact_search.models.tiny.detector import detect_batch, score_detections

# Seed of the random weights of builtin:tiny-random (the tiny architecture, untrained).
TINY_RANDOM_SEED = 0


def score_fidelity(videos: torch.Tensor, prompts: list[str]) -> FidelityReport | None:
    """The detector's reading of each video [B, 3, F, H, W] against its prompt's colour, shape
    and direction; None when a prompt is not one of the grammar's."""
    wanted = [prompt_attributes(prompt) for prompt in prompts]
    if any(attributes is None for attributes in wanted):
        return None
    detections = detect_batch(videos)
    correct = [
        (d.colour, d.shape, d.direction) == (w.colour, w.shape, w.direction)
        for d, w in zip(detections, wanted, strict=True)
    ]
    return FidelityReport(score_detections(detections, wanted).as_dict(), correct)


def heldout_prompts(count: int, seed: int) -> list[str]:
    """`count` random prompts of held-out scenes, drawn from `seed`."""
    specs = sample_scene_specs(count, torch.Generator().manual_seed(seed), split="held_out")
    return [spec.prompt for spec in specs]


def tiny_loaded_model(adapter: Adapter, pipeline) -> LoadedModel:
    """A `TinyVideoPipeline` as a LoadedModel: `run` returns its videos [B, 3, F, H, W]."""

    def run(
        prompts: list[str],
        *,
        seed: int,
        num_steps: int,
        guidance_scale: float,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        callback = None if on_step is None else (lambda step, _num_steps: on_step(step))
        videos = pipeline(
            list(prompts),
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            callback=callback,
        ).videos
        if on_step is not None:
            on_step(num_steps)
        return videos

    return LoadedModel(
        adapter,
        pipeline,
        (pipeline.transformer,),
        Grid(*pipeline.grid),
        run,
        "video",
        score_fidelity=score_fidelity,
        heldout_prompts=heldout_prompts,
    )


def _load_shipped(adapter: Adapter, settings: ModelSettings, device: torch.device) -> LoadedModel:
    from compact_search.models.tiny.pipeline import load_tiny_pipeline

    try:
        pipeline = load_tiny_pipeline(device, dtype=TORCH_DTYPES[settings.dtype])
    except FileNotFoundError:
        raise UserInputError(
            "the built-in tiny model's weights are not installed; "
            "use model.source = 'builtin:tiny-random' for the untrained architecture"
        ) from None
    config = pipeline.config
    wanted = (settings.frames, settings.height, settings.width)
    if (config.num_frames, config.height, config.width) != wanted:
        raise UserInputError(
            f"the built-in tiny model samples {config.num_frames} frames of "
            f"{config.height}x{config.width}; the profile asks for {wanted[0]} frames of "
            f"{wanted[1]}x{wanted[2]}"
        )
    return tiny_loaded_model(adapter, pipeline)


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move, casting only when needed (diffusers warns on any dtype cast of a Wan model)."""
    module.to(device)
    return module if dtype == torch.float32 else module.to(dtype)


def _load_random(adapter: Adapter, settings: ModelSettings, device: torch.device) -> LoadedModel:
    from compact_search.models.tiny.pipeline import TinyModelConfig, TinyVideoPipeline, build_models

    dtype = TORCH_DTYPES[settings.dtype]
    config = TinyModelConfig(
        num_frames=settings.frames, height=settings.height, width=settings.width
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED)
        transformer, text_encoder = build_models(config)
    text_encoder.to(device, dtype)
    pipeline = TinyVideoPipeline(config, _to(transformer, device, dtype), text_encoder)
    return tiny_loaded_model(adapter, pipeline)


def _shipped_weights_identity() -> bytes:
    """The shipped model's JSON, which records the training run of its weights."""
    from compact_search.models.tiny.pipeline import CONFIG_FILE, WEIGHTS_DIR

    return (WEIGHTS_DIR / CONFIG_FILE).read_bytes()


TINY_MODELS = (
    BuiltinModel("builtin:tiny", _load_shipped, _shipped_weights_identity),
    BuiltinModel("builtin:tiny-random", _load_random, lambda: b""),
)
