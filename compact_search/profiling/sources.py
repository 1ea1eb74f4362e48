"""Model sources for profiling: the built-in tiny model, or a local diffusers checkpoint.

`load_source(settings, device)` returns a `ProfiledModel`: the transformer, its adapter, the
token grid the settings produce, and `sample(prompt, seed, on_step)`, which runs the denoising
loop and calls `on_step(i)` before the transformer calls of step i (and `on_step(num_steps)` at
the end). Checkpoints load from local directories only; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from compact_search.errors import ConfigError, UserInputError
from compact_search.geometry import Grid
from compact_search.models.adapters import Adapter, adapter_for, get_adapter
from compact_search.profiling.settings import ProfileSettings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Seed of the random weights of builtin:tiny-random (the tiny architecture, untrained).
TINY_RANDOM_SEED = 0


@dataclass
class ProfiledModel:
    """A model ready to sample, with what the profiler needs to know about its attention."""

    transformer: torch.nn.Module
    adapter: Adapter
    grid: Grid
    num_heads: int
    head_dim: int
    sample: Callable[[str, int, Callable[[int], None]], None]

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers(self.transformer)


def _attention_shape(adapter: Adapter, transformer) -> tuple[int, int]:
    module = adapter.attention_modules(transformer)[0]
    heads = module.heads
    inner = module.to_q.out_features
    return heads, inner // heads


def _to(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move, casting only when needed (diffusers warns on any dtype cast of a Wan model)."""
    module.to(device)
    return module if dtype == torch.float32 else module.to(dtype)


def _tiny(settings: ProfileSettings, device: torch.device) -> ProfiledModel:
    from compact_search.models.tiny.pipeline import (
        TinyModelConfig,
        TinyVideoPipeline,
        build_models,
        load_tiny_pipeline,
    )

    dtype = DTYPES[settings.dtype]
    if settings.source == "builtin:tiny":
        try:
            pipeline = load_tiny_pipeline(device, dtype=dtype)
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
    else:
        config = TinyModelConfig(
            num_frames=settings.frames, height=settings.height, width=settings.width
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_RANDOM_SEED)
            transformer, text_encoder = build_models(config)
        text_encoder.to(device, dtype)
        pipeline = TinyVideoPipeline(config, _to(transformer, device, dtype), text_encoder)

    def sample(prompt: str, seed: int, on_step: Callable[[int], None]) -> None:
        pipeline(
            prompt,
            num_steps=settings.num_steps,
            guidance_scale=settings.guidance,
            seed=seed,
            callback=lambda step, _num_steps: on_step(step),
        )
        on_step(settings.num_steps)

    adapter = get_adapter(settings.adapter)
    heads, head_dim = _attention_shape(adapter, pipeline.transformer)
    return ProfiledModel(pipeline.transformer, adapter, Grid(*config.grid), heads, head_dim, sample)


def _patch_sizes(config) -> tuple[int, int, int]:
    patch = config.patch_size
    if isinstance(patch, (tuple, list)):
        return tuple(patch)
    return (getattr(config, "patch_size_t", None) or 1, patch, patch)


def _pipeline_grid(pipe, settings: ProfileSettings) -> Grid:
    """The token grid (F, H, W) `pipe` samples at the settings' size.

    Sizes the pipeline would change are refused: Wan rounds the frame count down to 1 + a
    multiple of the VAE's temporal factor (a grid from the asked count would then take a whole
    latent frame for prefix tokens), and sizes that are not whole patches fail inside Wan and
    CogVideoX.
    """
    temporal = getattr(pipe, "vae_scale_factor_temporal", 4)
    spatial = getattr(pipe, "vae_scale_factor_spatial", 8)
    pt, ph, pw = _patch_sizes(pipe.transformer.config)
    where, name = f"profile {settings.name!r}", type(pipe).__name__
    if (settings.frames - 1) % temporal:
        nearest = (settings.frames - 1) // temporal * temporal + 1
        raise ConfigError(
            where,
            "sampling.frames",
            f"{name} samples 1 + a multiple of {temporal} frames, got {settings.frames} "
            f"(e.g. {nearest} or {nearest + temporal})",
        )
    for field, size, unit in (
        ("sampling.height", settings.height, spatial * ph),
        ("sampling.width", settings.width, spatial * pw),
    ):
        if size % unit:
            raise ConfigError(
                where, field, f"{name} needs a multiple of {unit} (VAE x patch), got {size}"
            )
    latent_frames = (settings.frames - 1) // temporal + 1
    # CogVideoX 1.5 (patch_size_t 2) pads the latent frames up to whole temporal patches:
    # 49 frames -> 13 latent -> 14 -> F = 7.
    return Grid(
        -(-latent_frames // pt), settings.height // (spatial * ph), settings.width // (spatial * pw)
    )


def _diffusers(settings: ProfileSettings, device: torch.device) -> ProfiledModel:
    from diffusers import DiffusionPipeline

    path = Path(settings.source)
    if not (path / "model_index.json").is_file():
        raise UserInputError(f"{path} is not a local diffusers pipeline (no model_index.json)")
    # transformers holds the text encoders and tokenizers; without accelerate diffusers refuses
    # to load a Wan transformer (its fp32 modules) and randomly initialises any other model in
    # full before reading its weights.
    missing = [name for name in ("transformers", "accelerate") if find_spec(name) is None]
    if missing:
        raise UserInputError(
            f"loading the diffusers pipeline {path} needs {' and '.join(missing)}: "
            f"pip install {' '.join(missing)}"
        )
    pipe = DiffusionPipeline.from_pretrained(
        str(path), torch_dtype=DTYPES[settings.dtype], local_files_only=True
    ).to(device)
    transformer = pipe.transformer
    adapter = get_adapter(settings.adapter)
    if adapter_for(transformer) is not adapter:
        raise UserInputError(
            f"{path} holds a {type(transformer).__name__}; the profile names adapter "
            f"{settings.adapter!r}"
        )
    grid = _pipeline_grid(pipe, settings)

    def sample(prompt: str, seed: int, on_step: Callable[[int], None]) -> None:
        def after_step(_pipe, step: int, _timestep, callback_kwargs: dict) -> dict:
            on_step(step + 1)
            return callback_kwargs

        on_step(0)
        pipe(
            prompt=prompt,
            height=settings.height,
            width=settings.width,
            num_frames=settings.frames,
            num_inference_steps=settings.num_steps,
            guidance_scale=settings.guidance,
            generator=torch.Generator(device=device).manual_seed(seed),
            output_type="latent",
            callback_on_step_end=after_step,
        )

    heads, head_dim = _attention_shape(adapter, transformer)
    return ProfiledModel(transformer, adapter, grid, heads, head_dim, sample)


def load_source(settings: ProfileSettings, device: torch.device) -> ProfiledModel:
    """The model the settings name, on `device`."""
    if settings.is_builtin:
        return _tiny(settings, device)
    return _diffusers(settings, device)
