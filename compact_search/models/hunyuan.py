"""Adapter for diffusers' HunyuanVideo transformer (`HunyuanVideoTransformer3DModel`).

HunyuanVideo is an MM-DiT with two kinds of blocks, dual-stream (`transformer_blocks`, text with
its own projections) and single-stream (`single_transformer_blocks`); both run one joint
attention over [video + text] tokens, the text (prefix) tokens last. Layers are numbered through
the dual-stream blocks first, then the single-stream ones.

The model pads the text to a fixed length and masks the padded text keys. `attention_fn(layer, q,
k, v)` takes no mask, so `HunyuanJointAttnProcessor` hands it the real tokens only
([video + valid text], q, k, v [1, H, N + L_valid, D] after RoPE) and computes the outputs of the
padded text queries itself with dense attention over the real keys: exactly what the masked call
computes, row for row. Batches whose samples have different text lengths go one sample at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compact_search.models.cogvideox import apply_real_rope
from compact_search.models.ulysses import NoContextParallel
from compact_search.models.wan import AttentionFn, AttentionHandle, install_processors


def _valid_lengths(attention_mask: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Real tokens of every sample: the key mask [B, 1, 1, N] keeps a prefix of the sequence."""
    if attention_mask is None:
        return [length] * batch
    return attention_mask.reshape(batch, -1).sum(dim=1).tolist()


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class HunyuanJointAttnProcessor(NoContextParallel):
    """Joint video-text attention of one HunyuanVideo block, the attention call delegated."""

    family = "HunyuanVideo"

    def __init__(self, layer, attention_fn: AttentionFn):
        self.layer = layer
        self.attention_fn = attention_fn

    def _project(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """q, k, v [B, H, N + L, D]: video tokens (after RoPE) then text tokens."""
        single_stream = attn.add_q_proj is None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = _norm(attn.norm_q, attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)))
        key = _norm(attn.norm_k, attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [B, H, S, D]
        video_len = hidden_states.shape[1] - (
            encoder_hidden_states.shape[1] if single_stream else 0
        )
        if image_rotary_emb is not None:
            query = torch.cat(
                [
                    apply_real_rope(query[:, :, :video_len], image_rotary_emb),
                    query[:, :, video_len:],
                ],
                dim=2,
            )
            key = torch.cat(
                [apply_real_rope(key[:, :, :video_len], image_rotary_emb), key[:, :, video_len:]],
                dim=2,
            )
        if not single_stream:
            text = encoder_hidden_states
            text_q = _norm(attn.norm_added_q, attn.add_q_proj(text).unflatten(2, (attn.heads, -1)))
            text_k = _norm(attn.norm_added_k, attn.add_k_proj(text).unflatten(2, (attn.heads, -1)))
            text_v = attn.add_v_proj(text).unflatten(2, (attn.heads, -1))
            query = torch.cat([query, text_q.transpose(1, 2)], dim=2)
            key = torch.cat([key, text_k.transpose(1, 2)], dim=2)
            value = torch.cat([value, text_v.transpose(1, 2)], dim=2)
        return query, key, value

    def valid_lengths(self, attention_mask, batch: int, total: int) -> list[int]:
        """Real tokens of every sample (a prefix of the [video + text] sequence)."""
        return _valid_lengths(attention_mask, batch, total)

    def padded_rows(self, query, key, value) -> torch.Tensor:
        """[B, H, P, D]: what the model computes for padded text queries (q [B, H, P, D]) over
        the real keys and values: HunyuanVideo masks keys only, so they attend densely."""
        return F.scaled_dot_product_attention(query, key, value)

    def _attend(self, query, key, value, lengths: list[int]) -> torch.Tensor:
        """[B, H, S, D]: attention_fn over the real tokens; padded text queries attend densely."""
        total = query.shape[2]
        if all(n == lengths[0] for n in lengths):
            return self._attend_group(query, key, value, lengths[0], total)
        return torch.cat(
            [
                self._attend_group(query[i : i + 1], key[i : i + 1], value[i : i + 1], n, total)
                for i, n in enumerate(lengths)
            ]
        )

    def _attend_group(self, query, key, value, real: int, total: int) -> torch.Tensor:
        out = self.attention_fn(
            self.layer, query[:, :, :real], key[:, :, :real], value[:, :, :real]
        )  # [B, H, real, D]
        if real == total:
            return out
        padded_rows = self.padded_rows(
            query[:, :, real:], key[:, :, :real], value[:, :, :real]
        )  # [B, H, total - real, D]
        return torch.cat([out, padded_rows.to(out.dtype)], dim=2)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("HunyuanJointAttnProcessor serves joint video-text attention only")
        text_len = encoder_hidden_states.shape[1]
        query, key, value = self._project(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb
        )
        batch, _, total, _ = query.shape
        out = self._attend(query, key, value, self.valid_lengths(attention_mask, batch, total))
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)  # [B, S, H*D]
        video_out, text_out = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def hunyuan_self_attention_modules(transformer) -> list:
    """The joint attention of every dual-stream block, then every single-stream block."""
    dual = getattr(transformer, "transformer_blocks", None)
    single = getattr(transformer, "single_transformer_blocks", None)
    if dual is None or single is None:
        raise TypeError(f"{type(transformer).__name__} is not a HunyuanVideo transformer")
    return [block.attn for block in dual] + [block.attn for block in single]


def install_hunyuan_attention(
    transformer, attention_fn: AttentionFn, layers: list | None = None
) -> AttentionHandle:
    """Route every joint attention of a HunyuanVideo transformer through attention_fn (called with
    `layers[i]` instead of the index i where given)."""
    return install_processors(
        hunyuan_self_attention_modules(transformer),
        lambda layer: HunyuanJointAttnProcessor(layer, attention_fn),
        layers,
    )
