"""Where a number was measured: device, versions, git sha and date, for benchmark CSV rows."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch


def git_sha() -> str:
    """Short sha of the checkout (COMPACT_SEARCH_GIT_SHA wins: device copies carry no .git)."""
    sha = os.environ.get("COMPACT_SEARCH_GIT_SHA")
    if sha:
        return sha
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    )
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }
