"""Runtime: block-sparse attention backends and their PyTorch reference."""

from compact_search.runtime.attention import sparse_attention

__all__ = ["sparse_attention"]
