"""`apply(pipeline_or_transformer, config)`: run a model's self-attention with a config's patterns.

The handle installs one attention function into every self-attention layer (through the model's
adapter) and a forward pre-hook on the transformer that reads the timestep of each call, so the
step follows the scheduler:

- the step index is the position of the call's timestep in the pipeline's timestep list
  (`pipeline.scheduler.timesteps` for diffusers pipelines, `pipeline.timesteps` for the built-in
  one), or what `handle.set_step(step, num_steps)` last said for a bare transformer;
- steps in the config's dense warm-up run plain SDPA; later steps run the kernel with the
  bucket's per-head block masks, on tokens permuted into the config's tile slot layout.

`handle.revert()` restores the original processors and removes the hook.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from compact_search.config import CompactConfig, HeadEntry
from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileLayout, valid_block_lengths
from compact_search.runtime.attention import sparse_attention

Installer = Callable[[object, Callable], object]


def installer_for(adapter: str) -> Installer:
    """The function that routes a model family's self-attention through an attention function."""
    from compact_search.models.adapters import ADAPTERS

    if adapter not in ADAPTERS:
        raise UserInputError(
            f"config adapter {adapter!r} is unknown; known: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[adapter].install


def find_transformer(obj):
    """The transformer of a pipeline, or obj itself when it is one."""
    return getattr(obj, "transformer", obj)


def head_shape(transformer) -> tuple[int, int]:
    """(heads, head dim) of a diffusers video transformer's self-attention."""
    cfg = getattr(transformer, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "attention_head_dim", None)
    if heads is None or head_dim is None:
        raise UserInputError(f"cannot read heads/head dim from {type(transformer).__name__}.config")
    return int(heads), int(head_dim)


@dataclass
class StepTracker:
    """Which denoising step the next transformer call belongs to."""

    pipeline: object | None
    step: int | None = None
    num_steps: int | None = None

    def timesteps(self) -> torch.Tensor | None:
        if self.pipeline is None:
            return None
        scheduler = getattr(self.pipeline, "scheduler", None)
        values = getattr(scheduler, "timesteps", None)
        if values is None:
            values = getattr(self.pipeline, "timesteps", None)
        return values if isinstance(values, torch.Tensor) and values.numel() else None

    def observe(self, timestep) -> None:
        """Called before every transformer forward with its timestep argument."""
        schedule = self.timesteps()
        if schedule is None or timestep is None:
            return  # a bare transformer: set_step() drives the step
        t = float(torch.as_tensor(timestep).flatten()[0])
        distance = (schedule.detach().float().cpu() - t).abs()
        self.step = int(torch.argmin(distance))
        self.num_steps = int(schedule.numel())


def rescale_config(config: CompactConfig, grid: Grid) -> tuple[CompactConfig, str]:
    """The config's patterns on another grid, windows scaled by the tile grid ratio.

    Returns the new config and a sentence on what happens to the recall guarantee.
    """
    from compact_search.config import GeometrySpec
    from compact_search.patterns import FrameGroup, HeadPattern

    old = config.layout()
    geometry = GeometrySpec(
        grid,
        config.geometry.tile,
        config.geometry.block_size,
        config.geometry.prefix_tokens,
        config.geometry.prefix_at,
    )
    new_tg = geometry.layout().tile_grid
    old_tg = old.tile_grid
    ratio = [n / o for n, o in zip(new_tg.as_tuple(), old_tg.as_tuple(), strict=True)]

    def convert(pattern: HeadPattern) -> HeadPattern:
        if pattern.groups is None:
            return pattern
        groups, start = [], 0
        for group in pattern.groups:
            stop = min(new_tg.frames, max(start + 1, math.ceil(group.stop * ratio[0])))
            if start >= new_tg.frames:
                break
            rects = tuple(r.scaled(ratio[1], ratio[2], new_tg) for r in group.rects)
            groups.append(FrameGroup(start, stop, rects))
            start = stop
        return HeadPattern(tuple(groups))

    heads = tuple(
        tuple(tuple(HeadEntry(convert(e.pattern)) for e in layer) for layer in bucket)
        for bucket in config.heads
    )
    provenance = {**config.provenance, "rescaled_from_grid": list(config.geometry.grid.as_tuple())}
    rescaled = CompactConfig(config.model, geometry, config.schedule, heads, provenance)
    note = (
        f"config rescaled from grid {config.geometry.grid} to {grid}: windows scaled by the tile "
        f"grid ratio {old_tg} -> {new_tg}; the recall threshold "
        f"{config.provenance.get('recall_threshold', '?')} was measured at {config.geometry.grid} "
        f"only and is no longer guaranteed here: profile and search at this size to restore it"
    )
    return rescaled, note


@dataclass
class CompactHandle:
    """What `apply` returns: the installed runtime, its step state, and `revert()`."""

    config: CompactConfig
    transformer: object
    tracker: StepTracker
    backend: str
    notes: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=lambda: {"dense": 0, "sparse": 0})
    _attention_handle: object | None = None
    _hook: object | None = None
    _masks: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict)
    _lengths: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    _warned_unknown_step: bool = False

    @cached_property
    def layout(self) -> TileLayout:
        # One layout per handle: its permutation indices are built once, not on every call.
        return self.config.layout()

    def set_step(self, step: int, num_steps: int) -> None:
        """Tell the runtime the current denoising step (for callers without a scheduler)."""
        self.tracker.step, self.tracker.num_steps = step, num_steps

    def current_bucket(self) -> int | None:
        if self.tracker.step is None:
            if not self._warned_unknown_step:
                warnings.warn(
                    "compact-search: the denoising step is unknown (no scheduler timesteps on "
                    "the pipeline and no handle.set_step call), so attention runs dense",
                    stacklevel=2,
                )
                self._warned_unknown_step = True
            return None  # step unknown: dense is always correct
        return self.config.schedule.bucket_for_step(self.tracker.step, self.tracker.num_steps)

    def block_masks(self, bucket: int, layer: int, device: torch.device) -> torch.Tensor:
        key = (bucket, layer, str(device))
        if key not in self._masks:
            self._masks[key] = self.config.block_masks(bucket, layer).to(device)
        return self._masks[key]

    def key_block_lengths(self, device: torch.device, prefix_tokens: int) -> torch.Tensor:
        """[nb] int32 valid keys per block when ``prefix_tokens`` of the layout's prefix are real.

        Cached per (device, count): the kernel's lookup-table cache keys on the tensor itself.
        """
        key = (str(device), prefix_tokens)
        if key not in self._lengths:
            layout = self.layout
            lengths = layout.key_block_lengths(device).clone()
            # Prefix token j sits in slot j (prefix blocks first): real ones are a prefix of it.
            lengths[: layout.prefix_blocks] = valid_block_lengths(
                prefix_tokens, layout.block_size, layout.prefix_blocks, device
            )
            self._lengths[key] = lengths
        return self._lengths[key]

    def _missing_prefix_tokens(self, num_tokens: int) -> int:
        """Prefix tokens the layout has beyond the call's (0 if it fits); raises if it can't fit.

        A HunyuanVideo call carries only its prompt's real text tokens, fewer than the longest
        profiled prompt: the missing ones are padded at the end and masked as keys.
        """
        layout = self.layout
        missing = layout.num_tokens - num_tokens
        if missing == 0 or (layout.prefix_at == "end" and 0 < missing <= layout.prefix_tokens):
            return missing
        hint = "other resolution or frame count? apply(..., rescale=True) adapts the config"
        if layout.prefix_at == "end" and missing < 0:
            hint += "; or a prompt longer than every profiled one? profile with longer prompts"
        raise UserInputError(
            f"config geometry does not fit the model input: config grid "
            f"{self.config.geometry.grid} + {layout.prefix_tokens} prefix tokens = "
            f"{layout.num_tokens} tokens, the model attends over {num_tokens} ({hint})"
        )

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """The installed attention: q, k, v [B, H, N, D] in model order -> [B, H, N, D]."""
        layout = self.layout
        num_tokens = q.shape[2]
        missing = self._missing_prefix_tokens(num_tokens)
        bucket = self.current_bucket()
        if bucket is None:
            self.calls["dense"] += 1
            return F.scaled_dot_product_attention(q, k, v)
        self.calls["sparse"] += 1
        if missing:
            q, k, v = (F.pad(t, (0, 0, 0, missing)) for t in (q, k, v))  # [B, H, layout N, D]
        masks = self.block_masks(bucket, layer, q.device)
        out = sparse_attention(
            _to_slots(layout, q),
            _to_slots(layout, k),
            _to_slots(layout, v),
            masks,
            block_size=layout.block_size,
            backend=self.backend,
            key_block_lengths=self.key_block_lengths(q.device, layout.prefix_tokens - missing),
        )  # [B, H, padded_len, D], in the slots' memory order
        # Gather back through a [B, P, H, D] view: the result is contiguous as [B, N, H, D], which
        # is the layout the processor flattens next, so that step copies nothing. With token-major
        # slots the kernel's output is token-major too and this gather reads whole H x D rows.
        out = layout.from_slots(out.transpose(1, 2), dim=1).transpose(1, 2)
        return out[:, :, :num_tokens] if missing else out  # the padded rows dropped

    def revert(self) -> None:
        if self._attention_handle is not None:
            self._attention_handle.revert()
            self._attention_handle = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self) -> CompactHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def _to_slots(layout, x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] in model order -> [B, H, P, D] in slot order.

    Attention processors hand over views of token-major [B, N, H, D] projections. Those are
    gathered along N in their own storage, whole H x D rows at a time (contiguous reads and
    writes), and passed on as a [B, H, P, D] view of [B, P, H, D] memory, which every backend
    takes; anything else is gathered along dim 2 into a contiguous copy.
    """
    if x.transpose(1, 2).is_contiguous():
        return layout.to_slots(x.transpose(1, 2), dim=1).transpose(1, 2)
    return layout.to_slots(x, dim=2)


def apply(
    pipeline_or_transformer,
    config: CompactConfig,
    *,
    backend: str = "auto",
    rescale: bool = False,
    grid: Grid | tuple[int, int, int] | None = None,
) -> CompactHandle:
    """Make a pipeline (or a bare transformer) run self-attention with `config`'s patterns.

    Args:
        pipeline_or_transformer: a diffusers pipeline, the built-in pipeline, or a transformer.
        config: a loaded CompactConfig.
        backend: passed to `sparse_attention` ("auto": the Triton kernel on CUDA).
        rescale: if the model's token grid differs from the config's, rescale the patterns to it
            instead of failing (the handle's `notes` say what that does to recall).
        grid: the model's token grid when the object does not expose `.grid` (checked now);
            otherwise a mismatch surfaces at the first call as one clear error.

    Returns:
        A CompactHandle; `handle.revert()` restores the original attention exactly.
    """
    transformer = find_transformer(pipeline_or_transformer)
    model = config.model
    install = installer_for(model.adapter)
    heads, head_dim = head_shape(transformer)
    # Self-attention layers as the adapter counts them (HunyuanVideo: dual- and single-stream
    # blocks; its config's num_layers counts the dual-stream ones only).
    from compact_search.models.adapters import ADAPTERS

    layers = ADAPTERS[model.adapter].num_layers(transformer)
    if (layers, heads, head_dim) != (model.num_layers, model.num_heads, model.head_dim):
        raise UserInputError(
            f"config is for {model.num_layers} layers x {model.num_heads} heads x head dim "
            f"{model.head_dim} ({model.name}); the model has {layers} x {heads} x {head_dim}"
        )
    notes = []
    model_grid = grid if grid is not None else getattr(pipeline_or_transformer, "grid", None)
    if model_grid is not None and Grid.of(model_grid) != config.geometry.grid:
        if not rescale:
            raise UserInputError(
                f"config grid {config.geometry.grid} does not fit the model grid "
                f"{Grid.of(model_grid)}; rescale=True (compact-search evaluate --rescale) adapts it"
            )
        config, note = rescale_config(config, Grid.of(model_grid))
        notes.append(note)

    pipeline = pipeline_or_transformer if pipeline_or_transformer is not transformer else None
    handle = CompactHandle(config, transformer, StepTracker(pipeline), backend, notes)
    handle._attention_handle = install(transformer, handle.attention)

    def before_forward(module, args, kwargs):
        handle.tracker.observe(kwargs.get("timestep", args[1] if len(args) > 1 else None))

    handle._hook = transformer.register_forward_pre_hook(before_forward, with_kwargs=True)
    return handle
