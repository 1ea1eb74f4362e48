"""Deterministic word tokenizer and the small text encoder trained jointly with the tiny model.

The tokenizer knows exactly the words of the prompt grammar (:func:`data.grammar_words`); any
other word maps to ``<unk>``. Prompts are lower-cased, commas become spaces, and the token ids
are padded with ``<pad>`` to a fixed length, so the empty prompt (used for classifier-free
guidance) is all padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from compact_search.models.tiny.data import grammar_words

PAD_TOKEN = "<pad>"
UNKNOWN_TOKEN = "<unk>"


class WordTokenizer:
    """Maps prompts to fixed-length id tensors; the vocabulary is fixed in code."""

    def __init__(self, max_length: int = 24) -> None:
        self.max_length = max_length
        self.vocabulary = [PAD_TOKEN, UNKNOWN_TOKEN, *grammar_words()]
        self._ids = {word: index for index, word in enumerate(self.vocabulary)}

    @property
    def pad_id(self) -> int:
        return self._ids[PAD_TOKEN]

    def words(self, prompt: str) -> list[str]:
        return prompt.lower().replace(",", " ").split()

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Token ids ``[B, max_length]`` (int64); longer prompts are cut at ``max_length``."""
        unknown = self._ids[UNKNOWN_TOKEN]
        rows = []
        for prompt in prompts:
            ids = [self._ids.get(word, unknown) for word in self.words(prompt)][: self.max_length]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of :class:`TinyTextEncoder`; ``width`` is the transformer's ``text_dim``."""

    vocabulary_size: int
    max_length: int = 24
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4

    def __post_init__(self) -> None:
        if self.width % self.num_heads != 0:
            raise ValueError(
                f"TextEncoderConfig.width={self.width} must be divisible by "
                f"num_heads={self.num_heads}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class TinyTextEncoder(nn.Module):
    """Token and position embeddings, a few pre-norm transformer layers, a final layer norm."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocabulary_size, config.width)
        self.position_embedding = nn.Parameter(torch.randn(config.max_length, config.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=config.width,
            nhead=config.num_heads,
            dim_feedforward=4 * config.width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(
            layer, num_layers=config.num_layers, enable_nested_tensor=False
        )
        self.final_norm = nn.LayerNorm(config.width)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``token_ids`` [B, L] -> embeddings [B, L, width]."""
        hidden = self.token_embedding(token_ids) + self.position_embedding[: token_ids.shape[1]]
        return self.final_norm(self.layers(hidden))
