"""compact-search: per-head structured sparse attention for video diffusion transformers."""

from compact_search.runtime.attention import sparse_attention

__version__ = "0.1.0"

__all__ = ["__version__", "sparse_attention"]
