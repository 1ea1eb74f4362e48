"""The adapter registry: every model family compact-search serves, and the models built into them.

`ADAPTERS[name]` is an `Adapter` (`models/plugin.py`): how to route the family's self-attention
(`install`, `attention_modules`, `prefix_at`), and how to load its models (`load`). The diffusers
families load local pipeline folders with the one shared loader; the built-in tiny model is a Wan
transformer and registers as the Wan adapter's built-in models `builtin:tiny` and
`builtin:tiny-random` (`models/tiny/builtin.py`). A new family, or a new built-in model, is one
entry here; the stages that use them look them up and never name them.

`load_model(run_profile, device)` loads what a run profile's `[model]` names;
`source_identity(source)` names its weights for resume checks.
"""

from __future__ import annotations

import hashlib

import torch

from compact_search.errors import UserInputError
from compact_search.models.cogvideox import (
    cogvideox_self_attention_modules,
    install_cogvideox_attention,
)
from compact_search.models.diffusers_folder import folder_identity, load_diffusers_folder
from compact_search.models.hunyuan import hunyuan_self_attention_modules, install_hunyuan_attention
from compact_search.models.hunyuan15 import (
    hunyuan15_self_attention_modules,
    install_hunyuan15_attention,
)
from compact_search.models.plugin import Adapter, BuiltinModel, LoadedModel, ModelSettings
from compact_search.models.skyreels import install_skyreels_attention
from compact_search.models.tiny.builtin import TINY_MODELS
from compact_search.models.wan import install_wan_attention, wan_self_attention_modules

ADAPTERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (
        Adapter(
            "wan",
            install_wan_attention,
            wan_self_attention_modules,
            "start",
            "WanTransformer3DModel",
            load_diffusers_folder,
            builtins=TINY_MODELS,
        ),
        Adapter(
            "cogvideox",
            install_cogvideox_attention,
            cogvideox_self_attention_modules,
            "start",
            "CogVideoXTransformer3DModel",
            load_diffusers_folder,
        ),
        Adapter(
            "hunyuanvideo",
            install_hunyuan_attention,
            hunyuan_self_attention_modules,
            "end",
            "HunyuanVideoTransformer3DModel",
            load_diffusers_folder,
        ),
        Adapter(
            "hunyuanvideo15",
            install_hunyuan15_attention,
            hunyuan15_self_attention_modules,
            "end",
            "HunyuanVideo15Transformer3DModel",
            load_diffusers_folder,
        ),
        Adapter(
            "skyreels-v2",
            install_skyreels_attention,
            wan_self_attention_modules,
            "start",
            "SkyReelsV2Transformer3DModel",
            load_diffusers_folder,
        ),
    )
}


def adapter_names() -> tuple[str, ...]:
    return tuple(ADAPTERS)


def get_adapter(name: str) -> Adapter:
    if name not in ADAPTERS:
        raise UserInputError(f"unknown adapter {name!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[name]


def adapter_for(transformer) -> Adapter:
    """The adapter whose diffusers class the transformer is (or derives from)."""
    for adapter in ADAPTERS.values():
        if adapter.serves(transformer):
            return adapter
    raise UserInputError(f"no adapter for {type(transformer).__name__}; known: {adapter_names()}")


def builtin_sources() -> dict[str, str]:
    """Every built-in `model.source` -> the name of the adapter that registered it."""
    return {b.source: a.name for a in ADAPTERS.values() for b in a.builtins}


def _builtin(source: str) -> BuiltinModel | None:
    return next((b for a in ADAPTERS.values() if (b := a.builtin(source)) is not None), None)


def load_model(settings: ModelSettings, device: torch.device) -> LoadedModel:
    """The model a run profile names (`model.source` through `model.adapter`), on `device`."""
    return get_adapter(settings.adapter).load(settings, device)


def source_identity(source: str) -> str:
    """sha256 naming the weights behind `model.source`, cheap even for a 30 GB checkpoint.

    A built-in model: what it says names its weights (the shipped model: its model JSON, which
    records the training run; seeded ones: nothing beyond the name). A folder:
    `diffusers_folder.folder_identity`.
    """
    builtin = _builtin(source)
    named = builtin.weights_identity() if builtin is not None else folder_identity(source)
    return hashlib.sha256(source.encode() + named).hexdigest()
