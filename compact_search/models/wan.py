"""Adapter for diffusers' Wan transformer (`WanTransformer3DModel`): Wan2.1 and the built-in model.

`install_wan_attention(transformer, attention_fn)` swaps every block's self-attention processor
(attn1) for `WanSelfAttnProcessor`, which does what diffusers' WanAttnProcessor does for
self-attention (projections, q/k RMS norm, RoPE, output projection) but hands the attention
itself to `attention_fn(layer, q, k, v)` with q, k, v [B, H, N, D] after RoPE, in the model's
token order (frame-major, no prefix tokens in Wan). The profiler records q and k there; the
runtime runs the sparse kernel there. `handle.revert()` restores the original processors.
Cross-attention (attn2) is untouched.

`layer` is the layer index, or what the installer's `layers` gave for that layer: the runtime
passes each layer's tables (`runtime/tables.py`), so compiled code reads tensors instead of
branching on a Python index. Under diffusers' context parallelism the processor runs Ulysses
(`models/ulysses.py`) and calls `attention_fn(layer, q, k, v, heads=(start, stop))` with this
rank's heads over the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from compact_search.models.ulysses import UlyssesProcessor

# (layer, q, k, v) -> attention output; all [B, H, N, D]. `layer` is the layer index or the
# installer's `layers[index]`; with Ulysses a keyword `heads=(start, stop)` comes too.
AttentionFn = Callable[..., torch.Tensor]


def dense_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain SDPA; what the model computes without compact-search."""
    return F.scaled_dot_product_attention(q, k, v)


def apply_wan_rope(
    x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor
) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs. x [B, N, H, D]; freqs [1, N, 1, D]."""
    pairs = x.unflatten(-1, (-1, 2))  # [B, N, H, D/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos = freqs_cos[..., 0::2]  # [1, N, 1, D/2]
    sin = freqs_sin[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class WanSelfAttnProcessor(UlyssesProcessor):
    """Self-attention processor for a WanAttention module that delegates the attention call."""

    def __init__(self, layer, attention_fn: AttentionFn):
        self.layer = layer
        self.attention_fn = attention_fn

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanSelfAttnProcessor serves self-attention without a mask only")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = (
                attn.to_q(hidden_states),
                attn.to_k(hidden_states),
                attn.to_v(hidden_states),
            )
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, N, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_wan_rope(query, *rotary_emb)
            key = apply_wan_rope(key, *rotary_emb)
        out = self.attend(self.attention_fn, self.layer, query, key, value, attn.heads)
        out = out.flatten(2, 3).type_as(query)  # [B, N, H*D]
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


@dataclass
class AttentionHandle:
    """Undo for an installed attention hook: `revert()` puts the original processors back."""

    modules: list = field(default_factory=list)
    originals: list = field(default_factory=list)
    active: bool = True

    def revert(self) -> None:
        if not self.active:
            return
        for module, original in zip(self.modules, self.originals, strict=True):
            # enable_parallelism after install configured the installed processor only
            parallel = getattr(module.processor, "_parallel_config", None)
            if parallel is not None and hasattr(original, "_parallel_config"):
                original._parallel_config = parallel
            module.set_processor(original)
        self.active = False

    def __enter__(self) -> AttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.revert()


def wan_self_attention_modules(transformer) -> list:
    """The self-attention module (attn1) of every block, in layer order."""
    blocks = getattr(transformer, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(transformer).__name__} has no .blocks: not a Wan transformer")
    return [block.attn1 for block in blocks]


def install_processors(
    modules: list, make_processor: Callable[[object], object], layers: list | None = None
) -> AttentionHandle:
    """Give module i the processor make_processor(layers[i]) (default make_processor(i)); the
    handle restores the originals."""
    if layers is not None and len(layers) != len(modules):
        raise ValueError(f"{len(layers)} layer arguments for {len(modules)} attention layers")
    handle = AttentionHandle()
    for index, module in enumerate(modules):
        handle.modules.append(module)
        handle.originals.append(module.processor)
        module.set_processor(make_processor(index if layers is None else layers[index]))
    return handle


def install_wan_attention(
    transformer, attention_fn: AttentionFn, layers: list | None = None
) -> AttentionHandle:
    """Route every self-attention layer of a Wan transformer through attention_fn (called with
    `layers[i]` instead of the index i where given)."""
    return install_processors(
        wan_self_attention_modules(transformer),
        lambda layer: WanSelfAttnProcessor(layer, attention_fn),
        layers,
    )
