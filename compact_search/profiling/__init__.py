"""Profiling: exact tile-level attention mass captured from real denoising runs."""

from compact_search.profiling.capture import ProfileResult, run_profile
from compact_search.profiling.profile import Profile, load_profile
from compact_search.profiling.settings import ProfileSettings, load_settings
from compact_search.profiling.tile_mass import attention_tile_mass

__all__ = [
    "Profile",
    "ProfileResult",
    "ProfileSettings",
    "attention_tile_mass",
    "load_profile",
    "load_settings",
    "run_profile",
]
