"""Adapter for diffusers' CogVideoX transformer (`CogVideoXTransformer3DModel`).

CogVideoX is an MM-DiT: every block runs one joint attention over [text + video] tokens, the text
(prefix) tokens first. `install_cogvideox_attention(transformer, attention_fn)` swaps every
block's processor (`attn1`) for `CogVideoXJointAttnProcessor`, which does what diffusers'
CogVideoXAttnProcessor2_0 does (projections, q/k LayerNorm, RoPE on the video tokens, output
projection, split back into text and video) but hands the attention itself to
`attention_fn(layer, q, k, v)` with q, k, v [B, H, L + N, D] after RoPE, prefix first. The handle
from `models/wan.py` reverts it.
"""

from __future__ import annotations

import torch

from compact_search.models.ulysses import NoContextParallel
from compact_search.models.wan import AttentionFn, AttentionHandle, install_processors


def apply_real_rope(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotary embedding on interleaved (real, imaginary) pairs. x [B, H, N, D]; freqs [N, D]."""
    cos, sin = freqs
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # [B, H, N, D/2]
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)  # [B, H, N, D]
    return (x.float() * cos[None, None] + rotated.float() * sin[None, None]).to(x.dtype)


class CogVideoXJointAttnProcessor(NoContextParallel):
    """Joint text-video attention of one CogVideoX block, the attention call delegated."""

    family = "CogVideoX"

    def __init__(self, layer, attention_fn: AttentionFn):
        self.layer = layer
        self.attention_fn = attention_fn

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("CogVideoXJointAttnProcessor serves unmasked joint attention only")
        text_len = encoder_hidden_states.size(1)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # [B, L + N, C]
        batch = joint.shape[0]
        query = attn.to_q(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2)  # [B, H, L+N, D]
        key = attn.to_k(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            # RoPE on the video tokens only; text tokens keep their projections.
            query = torch.cat(
                [query[:, :, :text_len], apply_real_rope(query[:, :, text_len:], image_rotary_emb)],
                dim=2,
            )
            key = torch.cat(
                [key[:, :, :text_len], apply_real_rope(key[:, :, text_len:], image_rotary_emb)],
                dim=2,
            )
        out = self.attention_fn(self.layer, query, key, value)  # [B, H, L + N, D]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        text_out, video_out = out.split([text_len, out.size(1) - text_len], dim=1)
        return video_out, text_out


def cogvideox_self_attention_modules(transformer) -> list:
    """The joint attention module (attn1) of every block, in layer order."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None or not all(hasattr(b, "attn1") for b in blocks):
        raise TypeError(f"{type(transformer).__name__} is not a CogVideoX transformer")
    return [block.attn1 for block in blocks]


def install_cogvideox_attention(
    transformer, attention_fn: AttentionFn, layers: list | None = None
) -> AttentionHandle:
    """Route every joint attention of a CogVideoX transformer through attention_fn (called with
    `layers[i]` instead of the index i where given)."""
    return install_processors(
        cogvideox_self_attention_modules(transformer),
        lambda layer: CogVideoXJointAttnProcessor(layer, attention_fn),
        layers,
    )
