"""Runtime: `sparse_attention` (the kernel chooser), the kernels under `kernels/`, their lookup
tables (`lut`) and `apply`."""

from compact_search.runtime.attention import sparse_attention

__all__ = ["sparse_attention"]
