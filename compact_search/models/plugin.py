"""What a model plug-in gives the stages: an `Adapter` per model family, and the models it loads.

An `Adapter` (registered in `models/adapters.py`, `ADAPTERS`) is how compact-search meets one
model family:

- `install(transformer, attention_fn) -> handle` routes every self-attention layer through
  `attention_fn(layer, q, k, v)`, q, k, v [B, H, S, D] after RoPE; `handle.revert()` undoes it.
  `attention_modules` lists those layers; `prefix_at` says where the S - F*H*W prefix (text)
  tokens sit: "start" (CogVideoX: [text + video]) or "end" (HunyuanVideo: [video + text]); Wan
  has none. `transformer_class` is the diffusers class the adapter serves.
- `load(run_profile, device) -> LoadedModel` loads the model that `model.source` names. A
  built-in source (`builtin:NAME`) is one of the adapter's `builtins`, which the registry maps
  back to their adapter; any other source is a folder, read by `load_folder` (the diffusers
  families share `diffusers_folder.load_diffusers_folder`, which also serves image-to-video
  pipelines the run profile's `sampling.image`). The built-in models take no image.

A `LoadedModel` runs its pipeline: `run(prompts, seed=, num_steps=, guidance_scale=, on_step=)`
samples one output per prompt, all from one seed, and returns what the pipeline produces
(`output`: "video", [B, C, F, H, W] in [0, 1], or "latent", the denoised latents); `on_step(i)`
runs before the transformer calls of step i and `on_step(num_steps)` after the last. An
exception raised in `on_step` stops sampling there. `transformers` holds every transformer the
pipeline runs and `install(attention_fn)` routes all of them. A pipeline of several experts
(Wan2.2: `transformer` for the high-noise steps, `transformer_2` for the low-noise ones) names
them in `experts` (the pipeline attributes, in the order of `transformers`) and says in
`step_experts(num_steps)` which of them runs each step of a `num_steps`-step run. Optional
extras: `score_fidelity(videos, prompts)` (does each video show what its prompt says; None where
it cannot judge those prompts) and `heldout_prompts(count, seed)` (prompts the model never saw
in training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from compact_search.errors import UserInputError
from compact_search.geometry import Grid
from compact_search.models.wan import AttentionFn, AttentionHandle

# The pipeline attribute of a diffusers pipeline's (first) transformer.
MAIN_TRANSFORMER = "transformer"

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUTPUTS = ("video", "latent")


class ModelSettings(Protocol):
    """What a loader reads from a run profile (`compact_search.profiling.RunProfile` has it)."""

    name: str
    source: str  # builtin:NAME or a local folder
    adapter: str
    dtype: str  # a key of TORCH_DTYPES
    height: int  # pixels
    width: int
    frames: int


# (prompts, *, seed, num_steps, guidance_scale, on_step) -> videos [B, C, F, H, W] or latents
Runner = Callable[..., torch.Tensor]
Loader = Callable[["Adapter", ModelSettings, torch.device], "LoadedModel"]


@dataclass(frozen=True)
class FidelityReport:
    """Does each video show what its prompt asks for: shares per attribute, and per video."""

    scores: dict[str, float]
    correct: list[bool]


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped in code, named `source` ("builtin:NAME") in run profiles."""

    source: str
    load: Loader
    # Bytes that change when the weights do (resume checks); b"" for weights seeded in code.
    weights_identity: Callable[[], bytes]


@dataclass(frozen=True)
class Adapter:
    """How compact-search meets one model family: its attention, and how to load its models."""

    name: str
    install: Callable[[object, AttentionFn], AttentionHandle]
    attention_modules: Callable[[object], list]
    prefix_at: str  # "start" | "end"; irrelevant when the model has no prefix tokens
    transformer_class: str  # diffusers class name, to infer the adapter from a checkpoint
    load_folder: Loader
    builtins: tuple[BuiltinModel, ...] = ()

    def __post_init__(self) -> None:
        if self.prefix_at not in ("start", "end"):
            raise ValueError(f"prefix_at must be 'start' or 'end', got {self.prefix_at!r}")
        for builtin in self.builtins:
            if not builtin.source.startswith("builtin:"):
                raise ValueError(f"built-in sources start with 'builtin:', got {builtin.source!r}")

    def num_layers(self, transformer) -> int:
        return len(self.attention_modules(transformer))

    def attention_shape(self, transformer) -> tuple[int, int]:
        """(heads, head dim) of the transformer's self-attention."""
        module = self.attention_modules(transformer)[0]
        return module.heads, module.to_q.out_features // module.heads

    def serves(self, transformer) -> bool:
        """Whether the transformer is (or derives from) this adapter's diffusers class."""
        return self.transformer_class in {cls.__name__ for cls in type(transformer).__mro__}

    def builtin(self, source: str) -> BuiltinModel | None:
        return next((b for b in self.builtins if b.source == source), None)

    def load(self, settings: ModelSettings, device: torch.device) -> LoadedModel:
        """The model `settings.source` names, on `device`."""
        builtin = self.builtin(settings.source)
        if builtin is not None and getattr(settings, "image", None) is not None:
            raise UserInputError(
                f"profile {settings.name!r}: sampling.image: {settings.source} generates video "
                "from text only and takes no image; remove sampling.image"
            )
        loader = builtin.load if builtin is not None else self.load_folder
        return loader(self, settings, device)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to sample, with what the stages need to know about its attention."""

    adapter: Adapter
    pipeline: object  # what compact_search.apply takes
    transformers: tuple[torch.nn.Module, ...]
    grid: Grid
    run: Runner
    output: str  # "video" | "latent"
    score_fidelity: Callable[[torch.Tensor, list[str]], FidelityReport | None] | None = None
    heldout_prompts: Callable[[int, int], list[str]] | None = None
    # The pipeline attribute of each transformer; empty: transformer, transformer_2, ...
    experts: tuple[str, ...] = ()
    # num_steps -> for every step the index into `transformers` of the one that runs it; None:
    # not known (one transformer, or a model that routes steps itself)
    step_experts: Callable[[int], tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not self.transformers:
            raise ValueError("a LoadedModel needs at least one transformer")
        if self.experts and len(self.experts) != len(self.transformers):
            raise ValueError(f"{len(self.experts)} expert names for {len(self.transformers)}")
        shapes = {self._shape(t) for t in self.transformers}
        if len(shapes) != 1:
            raise ValueError(f"the transformers' attention differs (layers, heads, dim): {shapes}")

    def _shape(self, transformer) -> tuple[int, int, int]:
        return (self.adapter.num_layers(transformer), *self.adapter.attention_shape(transformer))

    @property
    def expert_names(self) -> tuple[str, ...]:
        """The pipeline attribute of each transformer."""
        if self.experts:
            return self.experts
        return tuple(
            MAIN_TRANSFORMER if i == 0 else f"{MAIN_TRANSFORMER}_{i + 1}"
            for i in range(len(self.transformers))
        )

    def expert_of_steps(self, num_steps: int) -> tuple[str, ...] | None:
        """The expert (pipeline attribute) that runs each step of a `num_steps`-step run; None
        where the model does not say (`step_experts`)."""
        if self.step_experts is None:
            return None
        return tuple(self.expert_names[i] for i in self.step_experts(num_steps))

    @property
    def num_layers(self) -> int:
        return self._shape(self.transformers[0])[0]

    @property
    def num_heads(self) -> int:
        return self._shape(self.transformers[0])[1]

    @property
    def head_dim(self) -> int:
        return self._shape(self.transformers[0])[2]

    def install(self, attention_fn: AttentionFn) -> AttentionHandle:
        """Route the self-attention of every transformer through `attention_fn`; one undo."""
        combined = AttentionHandle()
        try:
            for transformer in self.transformers:
                handle = self.adapter.install(transformer, attention_fn)
                combined.modules += handle.modules
                combined.originals += handle.originals
        except Exception:
            combined.revert()
            raise
        return combined


def pipeline_experts(pipeline) -> tuple[str, ...]:
    """The attributes of a pipeline's transformers (`transformer`, then `transformer_2`, ...):
    what a several-expert pipeline such as Wan2.2's runs; a bare transformer has none."""
    components = getattr(pipeline, "components", None)
    if not isinstance(components, dict):
        return ()
    names = [
        name
        for name, value in components.items()
        if value is not None
        and (name == MAIN_TRANSFORMER or name.removeprefix(MAIN_TRANSFORMER + "_").isdigit())
    ]
    return tuple(sorted(names, key=lambda n: (n != MAIN_TRANSFORMER, len(n), n)))
