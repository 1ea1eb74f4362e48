"""The search result: what `optimize` writes to RUN_DIR/search.json and `export` reads.

Per (bucket, layer, head): the chosen pattern with its recall (mean and worst over samples, and
the worst query tile), density and cost, the greedy baseline's pattern and cost, and the head's
Pareto front (the cheapest pattern at several recall levels) so export can pick another
threshold without searching again. Around them: the geometry (tile shape), the step schedule
(dense warm-up K, bucket bounds), the frame-group cuts and the study that produced it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compact_search.errors import UserInputError
from compact_search.patterns import HeadPattern

RESULT_FORMAT = "compact-search/search"
RESULT_VERSION = 1
RESULT_FILE = "search.json"


@dataclass(frozen=True)
class FrontEntry:
    """The cheapest pattern found with recall >= level (the constraint's measure)."""

    level: float
    recall_mean: float
    recall_min: float
    cost: float
    density: float
    pattern: HeadPattern

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pattern": self.pattern.to_json()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FrontEntry:
        return cls(**{**obj, "pattern": HeadPattern.from_json(obj["pattern"])})


@dataclass(frozen=True)
class HeadResult:
    bucket: int
    layer: int
    head: int
    kind: str
    pattern: HeadPattern
    recall_mean: float  # mean over samples of the mean over query tiles
    recall_min: float  # worst sample
    recall_worst_tile: float | None  # worst query tile of the worst sample (None: not measured)
    density: float
    cost: float
    greedy_pattern: HeadPattern
    greedy_cost: float
    front: tuple[FrontEntry, ...] = field(default=())

    def at_recall(self, level: float, mean_over_samples: bool = False) -> FrontEntry:
        """The cheapest front point keeping `level` (worst sample, or the mean over samples);
        the dearest point when none does. What `export --recall` picks per head."""
        if not self.front:
            raise UserInputError(f"head {self.layer}.{self.head} has no Pareto front")

        def reached(entry: FrontEntry) -> float:
            return entry.recall_mean if mean_over_samples else entry.recall_min

        keeping = [e for e in self.front if reached(e) >= level - 1e-9]
        if not keeping:
            return max(self.front, key=lambda e: e.cost)
        return min(keeping, key=lambda e: e.cost)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["pattern"] = self.pattern.to_json()
        out["greedy_pattern"] = self.greedy_pattern.to_json()
        out["front"] = [entry.to_json() for entry in self.front]
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> HeadResult:
        return cls(
            **{
                **obj,
                "pattern": HeadPattern.from_json(obj["pattern"]),
                "greedy_pattern": HeadPattern.from_json(obj["greedy_pattern"]),
                "front": tuple(FrontEntry.from_json(e) for e in obj["front"]),
            }
        )


@dataclass(frozen=True)
class BucketBounds:
    """Denoising steps [start, stop) share one bucket's patterns; `steps`: its profiled steps;
    `recall`: the threshold it was searched at when not the run's (a searched warm-up)."""

    start: int
    stop: int
    steps: tuple[int, ...]
    recall: float | None = None


@dataclass(frozen=True)
class SearchResult:
    model: str
    fingerprint: str
    grid: tuple[int, int, int]
    prefix_tokens: int
    num_layers: int
    layers: tuple[int, ...]  # the profiled layers, the only ones with heads here
    num_heads: int
    num_steps: int
    tile: tuple[int, int, int]
    tile_grid: tuple[int, int, int]
    block_size: int
    recall: float
    mean_over_samples: bool
    dense_steps: int
    buckets: tuple[BucketBounds, ...]
    frame_cuts: tuple[int, ...]
    objective: float  # attention cost over all denoising steps, dense = 1
    study: dict[str, Any]
    heads: tuple[HeadResult, ...]
    budget: dict[str, Any] | None = None

    def bucket_recall(self, bucket: int) -> float:
        """The threshold `bucket`'s heads were searched at."""
        own = self.buckets[bucket].recall
        return self.recall if own is None else own

    def head(self, bucket: int, layer: int, head: int) -> HeadResult:
        """The head's result; layers that were not profiled have none (export keeps them dense)."""
        index = (bucket * len(self.layers) + self.layers.index(layer)) * self.num_heads + head
        return self.heads[index]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["buckets"] = [asdict(b) for b in self.buckets]
        out["heads"] = [h.to_json() for h in self.heads]
        return {"format": RESULT_FORMAT, "version": RESULT_VERSION, **out}

    @classmethod
    def from_json(cls, obj: dict[str, Any], source: str = RESULT_FILE) -> SearchResult:
        if obj.get("format") != RESULT_FORMAT or obj.get("version") != RESULT_VERSION:
            raise UserInputError(
                f"{source}: expected format {RESULT_FORMAT!r} version {RESULT_VERSION}, got "
                f"{obj.get('format')!r} version {obj.get('version')!r}"
            )
        fields = {k: v for k, v in obj.items() if k not in ("format", "version")}
        for name in ("grid", "layers", "tile", "tile_grid", "frame_cuts"):
            fields[name] = tuple(fields[name])
        fields["buckets"] = tuple(
            BucketBounds(b["start"], b["stop"], tuple(b["steps"]), b.get("recall"))
            for b in fields["buckets"]
        )
        fields["heads"] = tuple(HeadResult.from_json(h) for h in fields["heads"])
        return cls(**fields)

    def save(self, run_dir: Path) -> Path:
        from compact_search.io import atomic_write_json

        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / RESULT_FILE
        atomic_write_json(path, self.to_json())  # a killed run never leaves half a result
        return path


def load_search_result(run_dir: str | Path) -> SearchResult:
    """Read RUN_DIR/search.json (or the file itself)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / RESULT_FILE
    if not path.exists():
        raise UserInputError(f"{path}: no search result (run `compact-search optimize` first)")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc})") from exc
    return SearchResult.from_json(obj, str(path))
