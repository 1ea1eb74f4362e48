"""Where a number was measured (device, versions, git sha, date) and the CSV it is appended to.

Shared by `compact-search bench` and the scripts in benchmarks/, so every results CSV carries the
same facts and grows the same way.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
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
    """device (GPU name, else the CPU), torch, triton, git_sha and the UTC date (YYYY-MM-DD)."""
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


def append_rows(csv_path: Path, rows: Iterable[Mapping[str, object]]) -> None:
    """Append rows to a CSV; its columns become the old header followed by any new keys.

    The file is rewritten whole, so rows from older runs keep their cells when a benchmark adds a
    column (their new cells stay empty) instead of shifting under a header they do not match.
    """
    rows = list(rows)
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    header: list[str] = []
    existing: list[dict[str, str]] = []
    if csv_path.exists():
        with csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            existing = list(reader)
            header = list(reader.fieldnames or [])
    columns = list(dict.fromkeys([*header, *(key for row in rows for key in row)]))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(existing)
        writer.writerows(rows)
