"""The loader every diffusers family shares: a local pipeline folder (`save_pretrained` layout).

`load_diffusers_folder(adapter, run_profile, device)` opens the folder with
`DiffusionPipeline.from_pretrained(path, local_files_only=True)` (nothing is downloaded), checks
that its transformer is the adapter's class and that the run profile's size is one the pipeline
samples unchanged, and returns a `LoadedModel` whose `run` returns the denoised latents. A
pipeline of several experts (Wan2.2's `transformer` and `transformer_2`, switched at the
pipeline's `boundary_ratio`) hands over every transformer and which one runs each step. A
pipeline whose call takes an `image` (Wan2.2-I2V-A14B's `WanImageToVideoPipeline`) samples every
prompt from the run profile's `sampling.image`, read here with PIL; the loader refuses such a
pipeline without one, and a text-to-video pipeline with one, in one line.
`folder_identity(folder)` names the weights of a folder cheaply, for resume checks.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import torch

from compact_search.errors import ConfigError, UserInputError
from compact_search.geometry import Grid
from compact_search.models.plugin import (
    TORCH_DTYPES,
    Adapter,
    LoadedModel,
    ModelSettings,
    pipeline_experts,
)


def _patch_sizes(config) -> tuple[int, int, int]:
    patch = config.patch_size
    if isinstance(patch, (tuple, list)):
        return tuple(patch)
    return (getattr(config, "patch_size_t", None) or 1, patch, patch)


def pipeline_grid(pipe, settings: ModelSettings) -> Grid:
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


def load_diffusers_folder(
    adapter: Adapter, settings: ModelSettings, device: torch.device
) -> LoadedModel:
    """The diffusers pipeline in folder `settings.source`, on `device`."""
    import diffusers

    path = Path(settings.source)
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise UserInputError(f"{path} is not a local diffusers pipeline (no model_index.json)")
    try:
        class_name = json.loads(index_path.read_text(encoding="utf-8")).get("_class_name")
    except (ValueError, AttributeError):
        raise UserInputError(f"{index_path} is not a diffusers model index (JSON)") from None
    # The image check runs before the weights load (minutes for a 14B checkpoint) when the
    # folder names a diffusers pipeline class, and on the loaded pipeline otherwise.
    named_class = getattr(diffusers, str(class_name), None)
    if isinstance(named_class, type):
        conditioning = _conditioning_image(named_class, settings)
    # transformers holds the text encoders and tokenizers; without accelerate diffusers refuses
    # to load a Wan transformer (its fp32 modules) and randomly initialises any other model in
    # full before reading its weights.
    missing = [name for name in ("transformers", "accelerate") if find_spec(name) is None]
    if missing:
        raise UserInputError(
            f"loading the diffusers pipeline {path} needs {' and '.join(missing)}: "
            f"pip install {' '.join(missing)}"
        )
    pipe = diffusers.DiffusionPipeline.from_pretrained(
        str(path), torch_dtype=TORCH_DTYPES[settings.dtype], local_files_only=True
    ).to(device)
    _use_profile_scheduler(pipe, settings)
    experts = pipeline_experts(pipe)
    transformers = tuple(getattr(pipe, name) for name in experts)
    for name, transformer in zip(experts, transformers, strict=True):
        if not adapter.serves(transformer):
            raise UserInputError(
                f"{path} holds a {type(transformer).__name__} as {name}; the profile names "
                f"adapter {settings.adapter!r}"
            )
    grid = pipeline_grid(pipe, settings)
    if type(pipe) is not named_class:
        conditioning = _conditioning_image(type(pipe), settings)
    takes = call_parameters(pipe)

    def run(
        prompts: list[str],
        *,
        seed: int,
        num_steps: int,
        guidance_scale: float,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        def after_step(_pipe, step: int, _timestep, callback_kwargs: dict) -> dict:
            if on_step is not None:
                on_step(step + 1)
            return callback_kwargs

        options = {} if conditioning is None else {"image": conditioning}
        if "callback_on_step_end" in takes:
            options["callback_on_step_end"] = after_step
        if "guidance_scale" in takes:
            options["guidance_scale"] = guidance_scale
        if on_step is not None:
            on_step(0)
        with (
            _guided(pipe, guidance_scale, "guidance_scale" not in takes),
            _scheduler_steps(pipe, on_step, "callback_on_step_end" not in takes),
        ):
            return pipe(
                prompt=list(prompts),
                height=settings.height,
                width=settings.width,
                num_frames=settings.frames,
                num_inference_steps=num_steps,
                generator=torch.Generator(device=device).manual_seed(seed),
                output_type="latent",
                **options,
            ).frames

    step_experts = None
    if len(transformers) > 1:
        step_experts = functools.partial(boundary_experts, pipe, len(transformers))
    return LoadedModel(
        adapter,
        pipe,
        transformers,
        grid,
        run,
        "latent",
        experts=experts,
        step_experts=step_experts,
    )


def _conditioning_image(pipeline_class: type, settings: ModelSettings):
    """The PIL image a pipeline of `pipeline_class` starts every prompt from when its call takes
    an `image` (image-to-video), None when it does not; the pipeline resizes it."""
    from PIL import Image, UnidentifiedImageError

    takes_image = "image" in inspect.signature(pipeline_class.__call__).parameters
    path, name = getattr(settings, "image", None), pipeline_class.__name__
    where = f"profile {settings.name!r}: sampling.image"
    if takes_image and path is None:
        raise UserInputError(
            f"{where}: {name} generates video from an image; set sampling.image to a picture "
            'file (the first frame, e.g. "first-frame.png", relative to the run profile)'
        )
    if not takes_image:
        if path is not None:
            raise UserInputError(
                f"{where}: {name} generates video from text only and takes no image; "
                "remove sampling.image"
            )
        return None
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UserInputError(f"{where}: no such file: {path}") from None
    except UnidentifiedImageError:
        raise UserInputError(f"{where}: {path} is not an image file PIL can read") from None
    except OSError as exc:
        raise UserInputError(f"{where}: cannot read {path} ({exc.strerror or exc})") from None


def call_parameters(pipe) -> set[str]:
    """The keyword arguments the pipeline's `__call__` takes."""
    return set(inspect.signature(type(pipe).__call__).parameters)


@contextlib.contextmanager
def _guided(pipe, guidance_scale: float, needed: bool):
    """A pipeline without a `guidance_scale` argument (HunyuanVideo 1.5) takes its guidance
    from its `guider`: one with the profile's scale for the call, the original after."""
    guider = getattr(pipe, "guider", None)
    if not needed or guider is None:
        yield
        return
    pipe.guider = guider.new(guidance_scale=guidance_scale)
    try:
        yield
    finally:
        pipe.guider = guider


def _use_profile_scheduler(pipe, settings: ModelSettings) -> None:
    """Swap in the run profile's `sampling.scheduler` (a diffusers scheduler class, built from the
    folder's scheduler config) and its `sampling.flow_shift`; neither set keeps the folder's."""
    import diffusers

    name = getattr(settings, "scheduler", None)
    flow_shift = getattr(settings, "flow_shift", None)
    if name is None and flow_shift is None:
        return
    current = pipe.scheduler
    kind = type(current) if name is None else getattr(diffusers, name, None)
    if not (isinstance(kind, type) and issubclass(kind, diffusers.SchedulerMixin)):
        raise UserInputError(
            f"profile {settings.name!r}: sampling.scheduler {name!r} is not a diffusers "
            f"scheduler class (the folder's is {type(current).__name__})"
        )
    overrides = {}
    if flow_shift is not None:
        # UniPC and DPM++ call it flow_shift, flow-matching Euler calls it shift.
        accepted = inspect.signature(kind.__init__).parameters
        key = next((k for k in ("flow_shift", "shift") if k in accepted), None)
        if key is None:
            raise UserInputError(
                f"profile {settings.name!r}: sampling.flow_shift: {kind.__name__} has no flow "
                "shift (flow_shift or shift)"
            )
        overrides[key] = float(flow_shift)
    pipe.scheduler = kind.from_config(current.config, **overrides)


@contextlib.contextmanager
def _scheduler_steps(pipe, on_step: Callable[[int], None] | None, needed: bool):
    """A pipeline without a step callback (HunyuanVideo 1.5): `on_step(i + 1)` after the
    scheduler's i-th `step` of the call (each denoising step ends with one)."""
    if not needed or on_step is None:
        yield
        return
    scheduler = pipe.scheduler
    original, own = scheduler.step, scheduler.__dict__.get("step")
    done = [0]

    def step(*args, **kwargs):
        result = original(*args, **kwargs)
        done[0] += 1
        on_step(done[0])
        return result

    scheduler.step = step
    try:
        yield
    finally:
        if own is None:
            del scheduler.step  # the class's method again
        else:
            scheduler.step = own


def boundary_experts(pipe, count: int, num_steps: int) -> tuple[int, ...]:
    """Which of a two-expert pipeline's transformers runs each step, as diffusers' Wan2.2
    pipelines decide it: `transformer` (0) at timesteps >= boundary_ratio x the scheduler's
    training timesteps, `transformer_2` (1) below."""
    ratio = getattr(pipe.config, "boundary_ratio", None)
    if count != 2 or ratio is None:
        raise UserInputError(
            f"{type(pipe).__name__} holds {count} transformers; compact-search knows which one "
            "runs a step only for two experts switched at the pipeline's boundary_ratio"
        )
    scheduler = copy.deepcopy(pipe.scheduler)  # the pipeline's own stays untouched
    scheduler.set_timesteps(num_steps, device="cpu")
    boundary = ratio * scheduler.config.num_train_timesteps
    return tuple(0 if float(t) >= boundary else 1 for t in scheduler.timesteps)


def folder_identity(folder: str | Path) -> bytes:
    """Bytes naming a folder's weights: the text of every JSON in it and the name and size of
    every other file (weights are not read, so a 30 GB checkpoint costs nothing)."""
    folder = Path(folder)
    parts = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".json":
            parts.append(f"{name}:".encode() + path.read_bytes())
        else:
            parts.append(f"{name}:{path.stat().st_size}".encode())
    return b"".join(parts)
