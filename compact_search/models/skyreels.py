"""Adapter for diffusers' SkyReels-V2 transformer (`SkyReelsV2Transformer3DModel`).

SkyReels-V2 is Wan-derived: its self-attention (attn1) is Wan's (projections, q/k RMS norm
across heads, RoPE on interleaved pairs, no text in self-attention), so the Wan processor serves
it and hands `attention_fn(layer, q, k, v)` q, k, v [B, H, N, D] after RoPE, frame-major. Two
things differ, both refused in one line: diffusion forcing with `num_frame_per_block > 1`
(a block-causal mask over frames, which the kernel's patterns do not express) and context
parallelism (diffusers ships no context-parallel plan for SkyReels-V2).
"""

from __future__ import annotations

import torch

from compact_search.errors import UserInputError
from compact_search.models.ulysses import NoContextParallel
from compact_search.models.wan import (
    AttentionFn,
    AttentionHandle,
    WanSelfAttnProcessor,
    install_processors,
    wan_self_attention_modules,
)


class SkyReelsSelfAttnProcessor(NoContextParallel, WanSelfAttnProcessor):
    """Wan's self-attention processor for SkyReels-V2, without masks or context parallelism."""

    family = "SkyReels-V2"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise UserInputError(
                "compact-search runs SkyReels-V2 without its diffusion-forcing causal mask: "
                "use num_frame_per_block 1 (the text-to-video and image-to-video pipelines)"
            )
        return super().__call__(attn, hidden_states, encoder_hidden_states, None, rotary_emb)


def install_skyreels_attention(
    transformer, attention_fn: AttentionFn, layers: list | None = None
) -> AttentionHandle:
    """Route every self-attention layer of a SkyReels-V2 transformer through attention_fn
    (called with `layers[i]` instead of the index i where given)."""
    return install_processors(
        wan_self_attention_modules(transformer),
        lambda layer: SkyReelsSelfAttnProcessor(layer, attention_fn),
        layers,
    )
