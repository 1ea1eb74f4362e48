"""Profiling: exact tile-level attention mass captured from real denoising runs.

Words: a *run profile* (`RunProfile`, a `profiles/*.toml` file) says what to run; running it
(`run_profile`, the `compact-search profile` command) writes a *capture* (`Capture`, a folder,
by default `runs/<name>/profile`), which `load_capture` opens. `load_profile` is `load_capture`
under its stable name; `load_settings` and `settings.resolve_profile_path` are the older names of
`load_run_profile` and `settings.resolve_run_profile`.
"""

from compact_search.profiling.capture import CaptureResult, run_profile
from compact_search.profiling.reader import Capture, load_capture, load_profile
from compact_search.profiling.settings import RunProfile, load_run_profile, load_settings
from compact_search.profiling.tile_mass import attention_tile_mass

__all__ = [
    "Capture",
    "CaptureResult",
    "RunProfile",
    "attention_tile_mass",
    "load_capture",
    "load_profile",
    "load_run_profile",
    "load_settings",
    "run_profile",
]
