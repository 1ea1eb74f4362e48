"""`apply(pipeline_or_transformer, config)`: run a model's self-attention with a config's patterns.

The handle builds every layer's lookup tables once (`runtime/tables.py`, buffers on each attention
module), installs one attention function into every self-attention layer (through the model's
adapter), and follows the denoising step outside the model, so the transformer can be compiled
(`compile_repeated_blocks(fullgraph=True)` or `torch.compile(transformer, fullgraph=True)`):

- a diffusers pipeline: `apply` wraps its scheduler's `set_timesteps` (step 0 of a run of
  `len(timesteps)` steps) and `step` (the scheduler's next `step_index`), so the step is a Python
  number decided between transformer calls;
- a pipeline without such a scheduler that lists its timesteps (`pipeline.timesteps`, the
  built-in model): a forward pre-hook on the transformer finds each call's timestep in the list.
  The hook reads the timestep's value, so only the blocks compile (`compile_repeated_blocks`);
- a bare transformer: `handle.set_step(step, num_steps)`.

Steps in the config's dense warm-up run plain SDPA; later steps run the kernel operator
(`compact_search::sparse_attention_lut`) with the bucket's per-head tables, on tokens permuted
into the config's tile slot layout. Compiled code reads only `handle.bucket` (a Python int or
None) and tensors: at most one graph per step bucket plus dense, whatever the number of layers.

`handle.revert()` restores the original processors, the scheduler and the model.

A pipeline of several experts (Wan2.2's `transformer` and `transformer_2`) gets the runtime
installed into every expert the config has patterns for, one single-transformer install each
(`ExpertsHandle`, which reverts them all). Experts the config has no patterns for are refused in
one line, or left dense with `dense_experts=True` (the handle's notes say which).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from compact_search.config import CompactConfig, HeadEntry, check_precision
from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileLayout, scatter_to_slots, valid_block_lengths
from compact_search.runtime.attention import (
    lut_sparse_attention,
    mask_sparse_attention,
    reads_lookup_tables,
)
from compact_search.runtime.lut import BlockLUT, lut_block_mask, lut_tensors_from_mask
from compact_search.runtime.tables import (
    TABLES_ATTRIBUTE,
    BucketMasks,
    LayerTables,
    build_layer_tables,
)

Installer = Callable[[object, Callable], object]


def installer_for(adapter: str) -> Installer:
    """The function that routes a model family's self-attention through an attention function."""
    from compact_search.models.adapters import ADAPTERS

    if adapter not in ADAPTERS:
        raise UserInputError(
            f"config adapter {adapter!r} is unknown; known: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[adapter].install


def find_transformer(obj, name: str = "transformer"):
    """The transformer `name` of a pipeline (default its first), or obj itself when it is one."""
    return getattr(obj, name, obj)


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
    """Which denoising step the next transformer call belongs to (step of num_steps)."""

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

    def observe(self, timestep) -> bool:
        """Set the step from a transformer call's timestep argument (its position in the
        pipeline's timestep list); False where there is no list or no timestep."""
        schedule = self.timesteps()
        if schedule is None or timestep is None:
            return False
        t = float(torch.as_tensor(timestep).flatten()[0])
        distance = (schedule.detach().float().cpu() - t).abs()
        self.step = int(torch.argmin(distance))
        self.num_steps = int(schedule.numel())
        return True


def follows_scheduler(scheduler) -> bool:
    """Whether a scheduler drives steps as diffusers' do (`set_timesteps`, then `step` per step)."""
    return callable(getattr(scheduler, "set_timesteps", None)) and callable(
        getattr(scheduler, "step", None)
    )


def _follow_scheduler(scheduler, handle: CompactHandle) -> Callable[[], None]:
    """Wrap the scheduler instance's `set_timesteps`, `set_begin_index` and `step` so that they
    tell the handle the step of the next transformer calls; returns the undo."""
    names = [n for n in ("set_timesteps", "set_begin_index", "step") if hasattr(scheduler, n)]
    own = {n: scheduler.__dict__[n] for n in names if n in scheduler.__dict__}
    originals = {n: getattr(scheduler, n) for n in names}

    def run_length() -> int | None:
        timesteps = getattr(scheduler, "timesteps", None)
        return len(timesteps) if timesteps is not None else None

    @functools.wraps(originals["set_timesteps"])
    def set_timesteps(*args, **kwargs):
        result = originals["set_timesteps"](*args, **kwargs)
        handle.set_step(0, run_length())
        return result

    @functools.wraps(originals["step"])
    def step(*args, **kwargs):
        result = originals["step"](*args, **kwargs)
        # Schedulers with a step index (most of diffusers') count it themselves; else one more.
        index = getattr(scheduler, "step_index", None)
        current = handle.tracker.step
        if isinstance(index, int):
            handle.set_step(index, run_length())
        elif current is not None:
            handle.set_step(current + 1, run_length())
        return result

    wrappers = {"set_timesteps": set_timesteps, "step": step}
    if "set_begin_index" in originals:

        @functools.wraps(originals["set_begin_index"])
        def set_begin_index(begin_index: int = 0, *args, **kwargs):
            result = originals["set_begin_index"](begin_index, *args, **kwargs)
            handle.set_step(begin_index, run_length())
            return result

        wrappers["set_begin_index"] = set_begin_index
    for name, wrapper in wrappers.items():
        setattr(scheduler, name, wrapper)

    def undo() -> None:
        for name in wrappers:
            if name in own:
                setattr(scheduler, name, own[name])
            else:
                delattr(scheduler, name)

    return undo


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
    rescaled = CompactConfig(
        config.model, geometry, config.schedule, heads, provenance, precision=config.precision
    )
    note = (
        f"config rescaled from grid {config.geometry.grid} to {grid}: windows scaled by the tile "
        f"grid ratio {old_tg} -> {new_tg}; the recall threshold "
        f"{config.provenance.get('recall_threshold', '?')} was measured at {config.geometry.grid} "
        f"only and is no longer guaranteed here: profile and search at this size to restore it"
    )
    return rescaled, note


@dataclass
class CompactHandle:
    """What `apply` returns: the installed runtime, its step state, and `revert()`.

    `bucket` is the step bucket the next transformer calls run (None: dense), the one value of
    the handle that compiled code reads. `calls` counts attention calls that ran eagerly, dense
    and sparse (a compiled graph does not count). `precision` is the sparse steps' attention
    arithmetic ("bf16", "fp8" or "int8", `runtime.attention.PRECISIONS`), a constant of the handle;
    dense warm-up steps run plain SDPA whatever it is.
    """

    config: CompactConfig
    transformer: object
    tracker: StepTracker
    backend: str
    notes: list[str] = field(default_factory=list)
    precision: str = "bf16"
    calls: dict[str, int] = field(default_factory=lambda: {"dense": 0, "sparse": 0})
    bucket: int | None = None
    _attention_handle: object | None = None
    _hook: object | None = None
    _undo_scheduler: Callable[[], None] | None = None
    _tables: list[LayerTables] | None = None
    _densities: tuple[float, ...] = ()
    _table_modules: list = field(default_factory=list)
    _warned_unknown_step: bool = False
    _undo_processor_api: Callable[[], None] | None = None

    @cached_property
    def layout(self) -> TileLayout:
        # One layout per handle: its permutation indices are built once, not on every call.
        return self.config.layout()

    def set_step(self, step: int, num_steps: int | None = None) -> None:
        """Say which denoising step the next transformer calls belong to.

        Args:
            step: the step index, from 0.
            num_steps: steps in this run; default the config's own schedule length
                (`config.schedule.num_steps`). A run of another length maps its steps by
                position in the trajectory, as `StepSchedule.bucket_for_step` does.

        Also usable as a per-step callback taking one argument (`on_step=handle.set_step`).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UserInputError(f"set_step: step must be an integer >= 0, got {step!r}")
        if num_steps is None:
            num_steps = self.config.schedule.num_steps
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise UserInputError(f"set_step: num_steps must be an integer >= 1, got {num_steps!r}")
        self.tracker.step, self.tracker.num_steps = step, num_steps
        self.bucket = self.config.schedule.bucket_for_step(step, num_steps)

    def current_bucket(self) -> int | None:
        """The step bucket the next transformer calls run (None: dense), i.e. `bucket`."""
        return self.bucket

    def block_masks(self, bucket: int, layer: int, device: torch.device) -> torch.Tensor:
        """[H, nb, nb] bool: what a layer runs in a bucket, as a block mask (benchmarks, tests)."""
        return self.config.block_masks(bucket, layer).to(device)

    def key_block_lengths(self, device: torch.device, prefix_tokens: int) -> torch.Tensor:
        """[nb] int32 valid keys per block when ``prefix_tokens`` of the layout's prefix are real
        (tensor operations only: it also runs inside a compiled graph)."""
        layout = self.layout
        lengths = layout.key_block_lengths(device)
        if prefix_tokens == layout.prefix_tokens:
            return lengths
        # Prefix token j sits in slot j (prefix blocks first): real ones are a prefix of it.
        prefix = valid_block_lengths(prefix_tokens, layout.block_size, layout.prefix_blocks, device)
        return torch.cat([prefix, lengths[layout.prefix_blocks :]])

    def layer_tables(self, device: torch.device) -> list[LayerTables]:
        """Every layer's tables on ``device``, built here if `apply` did not (eager use): lookup
        tables where the backend's kernel reads them, else block masks (`runtime/tables.py`)."""
        if self._tables is None or self._tables[0].token_to_slot.device != device:
            self._tables, self._densities = build_layer_tables(
                self.config,
                self.layout,
                device,
                lookup_tables=reads_lookup_tables(self.backend, device),
            )
        return self._tables

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

    def _count(self, bucket: int | None) -> None:
        """Eager bookkeeping of one attention call: the counters, and the unknown-step warning."""
        self.calls["dense" if bucket is None else "sparse"] += 1
        if bucket is None and self.tracker.step is None and not self._warned_unknown_step:
            warnings.warn(
                "compact-search: the denoising step is unknown (no scheduler timesteps on "
                "the pipeline and no handle.set_step call), so attention runs dense",
                stacklevel=4,
            )
            self._warned_unknown_step = True

    def attention(
        self,
        layer: LayerTables | int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        heads: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """The installed attention: q, k, v [B, H, N, D] in model order -> [B, H, N, D].

        Args:
            layer: the layer's `LayerTables` (what the installed processors pass) or its index.
            heads: (start, stop), the heads of the model that q, k, v hold (Ulysses context
                parallelism: this rank's heads over the whole sequence); default all.
        """
        bucket = self.bucket  # compiled code specialises on it: one graph per bucket and dense
        if not torch.compiler.is_compiling():
            self._count(bucket)
        layout = self.layout
        num_tokens = q.shape[2]
        missing = self._missing_prefix_tokens(num_tokens)
        if bucket is None:
            return F.scaled_dot_product_attention(q, k, v)
        tables = layer if isinstance(layer, LayerTables) else self.layer_tables(q.device)[layer]
        if missing:
            q, k, v = (F.pad(t, (0, 0, 0, missing)) for t in (q, k, v))  # [B, H, layout N, D]
        to_slots = functools.partial(_to_slots, layout, tables.token_to_slot, tables.padding_slots)
        q, k, v = to_slots(q), to_slots(k), to_slots(v)  # [B, H, padded_len, D]
        entry = tables.buckets[bucket]
        if isinstance(entry, BucketMasks):  # the reference or flex: no lookup tables
            mask, key_lengths = entry.block_mask, entry.key_lengths  # [H, nb, nb], [nb]
            if heads is not None:
                mask = mask[heads[0] : heads[1]]
            if missing:
                key_lengths = self.key_block_lengths(q.device, layout.prefix_tokens - missing)
            out = mask_sparse_attention(
                q,
                k,
                v,
                mask,
                key_block_lengths=key_lengths,
                block_size=layout.block_size,
                backend=self.backend,
                precision=self.precision,
            )
        else:
            lut = entry.lut(self._densities[bucket])
            if heads is not None:
                lut = lut.heads(*heads)
            if missing:
                lut = _with_key_lengths(
                    lut, self.key_block_lengths(q.device, layout.prefix_tokens - missing), layout
                )
            out = lut_sparse_attention(
                q,
                k,
                v,
                lut,
                block_size=layout.block_size,
                backend=self.backend,
                precision=self.precision,
            )  # [B, H, padded_len, D], in the slots' memory order
        # Gather back through a [B, P, H, D] view: the result is contiguous as [B, N, H, D], which
        # is the layout the processor flattens next, so that step copies nothing. With token-major
        # slots the kernel's output is token-major too and this gather reads whole H x D rows.
        out = out.transpose(1, 2).index_select(1, tables.token_to_slot).transpose(1, 2)
        return out[:, :, :num_tokens] if missing else out  # the padded rows dropped

    def install_attention(self, wrap: Callable[[Callable], Callable] | None = None) -> None:
        """Route the transformer's self-attention through this runtime again, with the per-layer
        tables (after other processors were installed in between, e.g. by the model's own
        `set_attn_processor`). `wrap` takes the runtime's attention function and returns the one
        to install (`evaluate` times it so); `revert` undoes either."""
        self._release_attention()
        install = installer_for(self.config.model.adapter)
        attention = self.attention if wrap is None else wrap(self.attention)
        self._attention_handle = _installed(
            install(self.transformer, attention, layers=self._tables)
        )

    def bypassed_layers(self) -> list[int]:
        """Self-attention layers whose processor is no longer the one this handle installed (the
        model's `set_attn_processor` or a module's `set_processor` replaced it since)."""
        attention_handle = self._attention_handle
        installed = getattr(attention_handle, "installed", None)
        if attention_handle is None or installed is None:
            return []
        pairs = zip(attention_handle.modules, installed, strict=True)
        return [i for i, (module, ours) in enumerate(pairs) if module.processor is not ours]

    def _release_attention(self) -> None:
        """Put the original processors back where this handle's processors still run; a layer
        whose processor was replaced since keeps the replacement."""
        attention_handle = self._attention_handle
        if attention_handle is None:
            return
        bypassed = set(self.bypassed_layers())
        if bypassed:
            keep = [i for i in range(len(attention_handle.modules)) if i not in bypassed]
            attention_handle.modules = [attention_handle.modules[i] for i in keep]
            attention_handle.originals = [attention_handle.originals[i] for i in keep]
        attention_handle.revert()
        self._attention_handle = None

    def revert(self) -> None:
        """Restore the processors `apply` replaced (a layer given another processor since keeps
        that one), the scheduler and the model, and drop the tables."""
        if self._undo_processor_api is not None:
            self._undo_processor_api()
            self._undo_processor_api = None
        self._release_attention()
        for module in self._table_modules:
            delattr(module, TABLES_ATTRIBUTE)
        self._table_modules = []
        self._tables = None  # their memory goes with the modules' references
        if self._undo_scheduler is not None:
            self._undo_scheduler()
            self._undo_scheduler = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __repr__(self) -> str:
        return (
            f"CompactHandle(model={self.config.model.name!r}, "
            f"layers={self.config.model.num_layers}, backend={self.backend!r}, "
            f"precision={self.precision!r}, bucket={self.bucket!r})"
        )

    def __enter__(self) -> CompactHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def _with_key_lengths(lut: BlockLUT, key_lengths: torch.Tensor, layout: TileLayout) -> BlockLUT:
    """The tables rebuilt for other key lengths (fewer real prefix tokens), the width kept, in
    tensor operations (inside a compiled graph too)."""
    tables = lut_tensors_from_mask(
        lut_block_mask(lut.kv_block_ids, lut.total_counts),
        key_lengths,
        layout.block_size,
        lut.kv_block_ids.shape[-1],
    )
    return BlockLUT(*tables, density=lut.density)


def _to_slots(
    layout: TileLayout, token_to_slot: torch.Tensor, padding_slots: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """[B, H, N, D] in model order -> [B, H, P, D] in slot order.

    Attention processors hand over views of token-major [B, N, H, D] projections. Those are
    gathered along N in their own storage, whole H x D rows at a time (contiguous reads and
    writes), and passed on as a [B, H, P, D] view of [B, P, H, D] memory, which every backend
    takes; anything else is gathered along dim 2 into a contiguous copy.
    """
    if x.transpose(1, 2).is_contiguous():
        slots = scatter_to_slots(
            x.transpose(1, 2), token_to_slot, padding_slots, layout.padded_len, dim=1
        )
        return slots.transpose(1, 2)
    return scatter_to_slots(x, token_to_slot, padding_slots, layout.padded_len, dim=2)


def _installed(attention_handle):
    """The adapter's handle, told which processors it installed (what `bypassed_layers` and
    `revert` compare against; handles installed elsewhere, e.g. by `evaluate`, are trusted)."""
    attention_handle.installed = [module.processor for module in attention_handle.modules]
    return attention_handle


def _watch_processor_api(transformer, handle: CompactHandle) -> Callable[[], None] | None:
    """Wrap the transformer instance's `set_attn_processor` (diffusers' API; its
    `set_default_attn_processor` goes through it too) so that replacing the compact processors
    says so in one warning; returns the undo (None where the model has no such method)."""
    original = getattr(transformer, "set_attn_processor", None)
    if not callable(original):
        return None
    own = "set_attn_processor" in vars(transformer)

    @functools.wraps(original)
    def set_attn_processor(*args, **kwargs):
        result = original(*args, **kwargs)
        bypassed = handle.bypassed_layers()
        if bypassed:
            warnings.warn(
                f"compact-search: set_attn_processor replaced the compact attention of "
                f"{len(bypassed)} of {len(handle._attention_handle.modules)} self-attention "
                f"layers (apply's handle is still active): those layers now run the new "
                f"processors; handle.install_attention() routes them through compact attention "
                f"again, handle.revert() keeps the new processors",
                stacklevel=2,
            )
        return result

    object.__setattr__(transformer, "set_attn_processor", set_attn_processor)

    def undo() -> None:
        if own:
            object.__setattr__(transformer, "set_attn_processor", original)
        else:
            object.__delattr__(transformer, "set_attn_processor")

    return undo


@dataclass
class ExpertsHandle:
    """What `apply` returns for a pipeline of several experts: one CompactHandle per expert with
    patterns (`handles`, by pipeline attribute), reverted together by `revert()`; all of them
    run one `precision`."""

    config: CompactConfig
    handles: dict[str, CompactHandle]
    notes: list[str] = field(default_factory=list)
    precision: str = "bf16"  # what every expert's handle runs

    def __repr__(self) -> str:
        return (
            f"ExpertsHandle(experts={list(self.handles)!r}, precision={self.precision!r}, "
            f"notes={len(self.notes)})"
        )

    @property
    def calls(self) -> dict[str, int]:
        """Eager attention calls of all experts, dense and sparse."""
        return {
            kind: sum(h.calls[kind] for h in self.handles.values()) for kind in ("dense", "sparse")
        }

    def set_step(self, step: int, num_steps: int | None = None) -> None:
        """`CompactHandle.set_step` on every expert (the one whose step it is runs)."""
        for handle in self.handles.values():
            handle.set_step(step, num_steps)

    def revert(self) -> None:
        # Last installed first: each scheduler wrapper restores the one it wrapped.
        for handle in reversed(list(self.handles.values())):
            handle.revert()

    def __enter__(self) -> ExpertsHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def apply(
    pipeline_or_transformer,
    config: CompactConfig,
    *,
    backend: str = "auto",
    rescale: bool = False,
    grid: Grid | tuple[int, int, int] | None = None,
    dense_experts: bool = False,
    precision: str | None = None,
) -> CompactHandle | ExpertsHandle:
    """Make a pipeline (or a bare transformer) run self-attention with `config`'s patterns.

    Args:
        pipeline_or_transformer: a diffusers pipeline, the built-in pipeline, or a transformer.
        config: a loaded CompactConfig.
        backend: passed to `sparse_attention` ("auto": the Triton kernel on CUDA).
        rescale: if the model's token grid differs from the config's, rescale the patterns to it
            instead of failing (the handle's `notes` say what that does to recall).
        grid: the model's token grid when the object does not expose `.grid` (checked now);
            otherwise a mismatch surfaces at the first call as one clear error.
        dense_experts: on a pipeline of several experts, leave the experts the config has no
            patterns for dense (noted in the handle's `notes` and warned) instead of refusing.
        precision: the sparse attention's arithmetic, "bf16", "fp8" or "int8" (passed to the
            kernels, `runtime.attention.PRECISIONS`); None: the config's `precision` (every
            expert's).

    Returns:
        A CompactHandle (an ExpertsHandle for a pipeline of several experts, or a config with
        `experts`); `handle.revert()` restores the original attention exactly.

    One handle per model: `apply` on a model whose earlier handle is still active is refused
    (UserInputError) rather than stacked. Stacking would make the second config run and leave
    the revert order to the caller (reverting the first handle first would put the stock
    processors back under the second handle's feet); `revert()` the first handle, then apply
    again. The model's own processor API wins over the handle: `set_attn_processor` after
    `apply` installs the new processors, warns that compact attention no longer runs in those
    layers (`handle.bypassed_layers()` lists them; `handle.install_attention()` routes them
    back), and `revert()` keeps them.
    """
    from compact_search.models.plugin import pipeline_experts

    if precision is not None:
        check_precision(precision, "apply: precision")
    experts = pipeline_experts(pipeline_or_transformer)
    if len(experts) < 2 and not config.experts:
        return apply_transformer(
            pipeline_or_transformer,
            config,
            backend=backend,
            rescale=rescale,
            grid=grid,
            precision=precision,
        )
    configs = config.expert_configs()
    missing = [name for name in configs if name not in experts]
    if missing:
        raise UserInputError(
            f"the config holds patterns for {', '.join(missing)}, which this "
            f"{type(pipeline_or_transformer).__name__} does not have (its transformers: "
            f"{', '.join(experts) or 'none'}); one expert's patterns on a bare transformer: "
            "apply(transformer, config.expert_configs()[name])"
        )
    notes = []
    dense = [name for name in experts if name not in configs]
    if dense:
        line = (
            f"compact-search: the config holds patterns for {', '.join(configs)} only; "
            f"{', '.join(dense)} stays dense"
        )
        if not dense_experts:
            raise UserInputError(
                f"{line}: export a config of every expert (profile the pipeline folder), or "
                "apply(..., dense_experts=True) to run it so"
            )
        warnings.warn(line, stacklevel=2)
        notes.append(line)
    handles: dict[str, CompactHandle] = {}
    try:
        for name, expert_config in configs.items():
            handles[name] = apply_transformer(
                pipeline_or_transformer,
                expert_config,
                backend=backend,
                rescale=rescale,
                grid=grid,
                transformer_name=name,
                precision=precision,
            )
    except Exception:
        ExpertsHandle(config, handles).revert()
        raise
    notes += [note for handle in handles.values() for note in handle.notes]
    resolved = precision if precision is not None else config.precision
    return ExpertsHandle(config, handles, notes, resolved)


def apply_transformer(
    pipeline_or_transformer,
    config: CompactConfig,
    *,
    backend: str = "auto",
    rescale: bool = False,
    grid: Grid | tuple[int, int, int] | None = None,
    transformer_name: str = "transformer",
    precision: str | None = None,
) -> CompactHandle:
    """`apply` for one transformer: the pipeline's `transformer_name` (or the bare
    transformer given), with `config`'s patterns and no experts, at `precision` (None: the
    config's)."""
    precision = check_precision(
        config.precision if precision is None else precision, "apply: precision"
    )
    transformer = find_transformer(pipeline_or_transformer, transformer_name)
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
    modules = ADAPTERS[model.adapter].attention_modules(transformer)
    if any(hasattr(module, TABLES_ATTRIBUTE) for module in modules):
        raise UserInputError(
            "apply: this model already runs a compact-search config (an earlier apply's handle "
            "is active); call revert() on that handle first"
        )
    handle = CompactHandle(
        config, transformer, StepTracker(pipeline), backend, notes, precision=precision
    )
    tables = handle.layer_tables(_device_of(transformer))
    for module, layer_tables in zip(modules, tables, strict=True):
        module.add_module(TABLES_ATTRIBUTE, layer_tables)  # buffers follow transformer.to()
        handle._table_modules.append(module)
    handle._attention_handle = _installed(install(transformer, handle.attention, layers=tables))
    try:
        _hand_over_parallel_config(transformer, handle._attention_handle)
    except UserInputError:
        handle.revert()
        raise
    handle._undo_processor_api = _watch_processor_api(transformer, handle)

    scheduler = getattr(pipeline, "scheduler", None)
    if follows_scheduler(scheduler):
        handle._undo_scheduler = _follow_scheduler(scheduler, handle)
    elif pipeline is not None:  # e.g. the built-in pipeline, which lists its timesteps per call

        def before_forward(module, args, kwargs):
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if handle.tracker.observe(timestep):
                handle.set_step(handle.tracker.step, handle.tracker.num_steps)

        handle._hook = transformer.register_forward_pre_hook(before_forward, with_kwargs=True)
    return handle


def _device_of(transformer) -> torch.device:
    parameter = next(iter(transformer.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _hand_over_parallel_config(transformer, attention_handle) -> None:
    """`apply` after `enable_parallelism`: give the new processors the model's context-parallel
    config, as `enable_parallelism` gives it to processors that have the attribute."""
    parallel = getattr(transformer, "_parallel_config", None)
    if getattr(parallel, "context_parallel_config", None) is None:
        return
    for module in attention_handle.modules:
        if not hasattr(module.processor, "_parallel_config"):
            raise UserInputError(
                f"{type(module.processor).__name__} does not run context parallelism; apply "
                "compact-search without enable_parallelism"
            )
        module.processor._parallel_config = parallel  # the processor checks what it supports
