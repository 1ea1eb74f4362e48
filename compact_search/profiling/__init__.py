"""Profiling: exact tile-level attention mass captured from real denoising runs."""

from compact_search.profiling.tile_mass import attention_tile_mass

__all__ = ["attention_tile_mass"]
