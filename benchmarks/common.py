"""Helpers shared by benchmark scripts: environment facts and CSV appends."""

from __future__ import annotations

import csv
from pathlib import Path

from compact_search.environment import environment  # noqa: F401  (re-exported)

RESULTS = Path(__file__).resolve().parent / "results"


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
