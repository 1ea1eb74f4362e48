"""Adapter for diffusers' HunyuanVideo 1.5 transformer (`HunyuanVideo15Transformer3DModel`).

HunyuanVideo 1.5 is an MM-DiT of dual-stream blocks only (`transformer_blocks`, 54 at the
published 8.3B size): each runs one joint attention over [video + text] tokens, the text (prefix)
tokens last. Its text is the real tokens of the image, ByT5 and Qwen2.5-VL streams first and the
padding after them; the model masks padded tokens both as keys and as queries (a padded query
attends to nothing and comes out as SDPA's fully masked row).

`HunyuanVideo15AttnProcessor` does what diffusers' HunyuanVideo15AttnProcessor2_0 does
(projections, q/k RMS norm, RoPE on the video tokens, output projections), hands
`attention_fn(layer, q, k, v)` the real tokens only ([video + valid text], q, k, v [1, H,
N + L_valid, D] after RoPE) and computes the padded queries' rows itself as the masked call does.
Context parallelism is refused in one line: diffusers ships no context-parallel plan for it, and
its joint sequence (video split over ranks, text not) does not fit the Ulysses processor's
token split.
"""

from __future__ import annotations

import torch

from compact_search.models.hunyuan import HunyuanJointAttnProcessor
from compact_search.models.wan import AttentionFn, AttentionHandle, install_processors


class HunyuanVideo15AttnProcessor(HunyuanJointAttnProcessor):
    """Joint video-text attention of one HunyuanVideo 1.5 block, the attention call delegated."""

    family = "HunyuanVideo 1.5"

    def valid_lengths(self, attention_mask, batch: int, total: int) -> list[int]:
        # The mask covers the text only ([B, L]); the video tokens before it are all real.
        if attention_mask is None:
            return [total] * batch
        text = attention_mask.reshape(batch, -1)
        return (text.sum(dim=1) + total - text.shape[1]).tolist()

    def padded_rows(self, query, key, value) -> torch.Tensor:
        # Masked as queries too: what SDPA gives a row masked from every key (torch >= 2.5),
        # without computing ~1,000 padded rows over the whole sequence.
        return torch.zeros_like(query)


def hunyuan15_self_attention_modules(transformer) -> list:
    """The joint attention of every (dual-stream) block, in layer order."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None or hasattr(transformer, "single_transformer_blocks"):
        raise TypeError(f"{type(transformer).__name__} is not a HunyuanVideo 1.5 transformer")
    return [block.attn for block in blocks]


def install_hunyuan15_attention(
    transformer, attention_fn: AttentionFn, layers: list | None = None
) -> AttentionHandle:
    """Route every joint attention of a HunyuanVideo 1.5 transformer through attention_fn
    (called with `layers[i]` instead of the index i where given)."""
    return install_processors(
        hunyuan15_self_attention_modules(transformer),
        lambda layer: HunyuanVideo15AttnProcessor(layer, attention_fn),
        layers,
    )
