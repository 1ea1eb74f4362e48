"""Model adapters: how to route a transformer's self-attention through `attention_fn`, and where
its prefix (text) tokens sit in the joint sequence.

`ADAPTERS[name].install(transformer, attention_fn) -> handle` installs processors that call
`attention_fn(layer, q, k, v)` with q, k, v [B, H, S, D] after RoPE; `handle.revert()` undoes it.
`prefix_at` says where the S - F*H*W prefix tokens sit: "start" (CogVideoX: [text + video]),
"end" (HunyuanVideo: [video + text]); Wan has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from compact_search.errors import UserInputError
from compact_search.models.cogvideox import (
    cogvideox_self_attention_modules,
    install_cogvideox_attention,
)
from compact_search.models.hunyuan import hunyuan_self_attention_modules, install_hunyuan_attention
from compact_search.models.wan import (
    AttentionFn,
    AttentionHandle,
    install_wan_attention,
    wan_self_attention_modules,
)


@dataclass(frozen=True)
class Adapter:
    """How compact-search meets one model family's self-attention."""

    name: str
    install: Callable[[object, AttentionFn], AttentionHandle]
    attention_modules: Callable[[object], list]
    prefix_at: str  # "start" | "end"; irrelevant when the model has no prefix tokens
    transformer_class: str  # diffusers class name, to infer the adapter from a checkpoint

    def __post_init__(self) -> None:
        if self.prefix_at not in ("start", "end"):
            raise ValueError(f"prefix_at must be 'start' or 'end', got {self.prefix_at!r}")

    def num_layers(self, transformer) -> int:
        return len(self.attention_modules(transformer))


ADAPTERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (
        Adapter(
            "wan",
            install_wan_attention,
            wan_self_attention_modules,
            "start",
            "WanTransformer3DModel",
        ),
        Adapter(
            "cogvideox",
            install_cogvideox_attention,
            cogvideox_self_attention_modules,
            "start",
            "CogVideoXTransformer3DModel",
        ),
        Adapter(
            "hunyuanvideo",
            install_hunyuan_attention,
            hunyuan_self_attention_modules,
            "end",
            "HunyuanVideoTransformer3DModel",
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
    names = {cls.__name__ for cls in type(transformer).__mro__}
    for adapter in ADAPTERS.values():
        if adapter.transformer_class in names:
            return adapter
    raise UserInputError(f"no adapter for {type(transformer).__name__}; known: {adapter_names()}")
