"""Helpers shared by benchmark scripts: environment facts and CSV appends."""

from __future__ import annotations

import csv
import datetime as dt
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, str]:
    """Device, versions, git sha and date for every CSV row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    )
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": sha,
        "date": dt.date.today().isoformat(),
    }


def append_rows(csv_path: Path, rows: list[dict[str, object]]) -> None:
    """Append rows to a CSV; columns are the union of the old header and the new rows' keys."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    existing: list[dict[str, str]] = []
    if csv_path.exists():
        with csv_path.open(newline="") as handle:
            existing = list(csv.DictReader(handle))
    columns = list(dict.fromkeys(k for row in [*existing, *rows] for k in row))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(existing)
        writer.writerows(rows)
