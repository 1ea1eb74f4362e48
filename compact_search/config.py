"""The versioned config: what the runtime needs to run a model with per-head sparse attention.

Format "compact-search/config", versions 1 to 3, documented field by field in docs/config.md
(which also says how versions evolve). Loading validates everything and raises `ConfigError`
naming the file, the field and what was expected; writes are atomic (see compact_search.io) and
use the lowest version that can express the config, so a config without version-2 features
stays readable by version-1 readers.

A pipeline with several transformers (Wan2.2's two experts: `transformer` for the high-noise
steps, `transformer_2` for the low-noise ones) gets one config: the top level is the patterns of
`pipeline.transformer`, and `experts` (version 3) holds a whole config per other transformer,
named by the pipeline's attribute, each with its own geometry, step schedule and buckets.

`precision` (top level, every version) is the attention arithmetic the runtime runs the config
with: "bf16" (the model's own fp16/bf16, the default and what a config without the field means),
"fp8" (INT8 Q K^T, FP8 e4m3 P V; `runtime.attention`) or "int8" (INT8 Q K^T and P V: slower than
"fp8", more accurate). One value for the whole config, experts included. Ignoring it runs bf16,
which is never less accurate, so it needs no new version.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compact_search._version import __version__
from compact_search.errors import ConfigError, UserInputError
from compact_search.geometry import DEFAULT_BLOCK_SIZE, Grid, TileLayout, TileShape
from compact_search.io import atomic_write_json, read_json
from compact_search.patterns import HeadPattern, density

CONFIG_FORMAT = "compact-search/config"
CONFIG_VERSION = 3  # the newest version this code reads and writes
SUPPORTED_VERSIONS = (1, 2, CONFIG_VERSION)
# The pipeline attribute the top level of a config serves; `experts` names the others.
MAIN_TRANSFORMER = "transformer"
STAT_FIELDS = ("recall_mean", "recall_min", "recall_worst_tile", "density", "cost")
# The attention precisions a config can ask for: `runtime.attention.PRECISIONS` (the runtime
# imports this module, so the names are spelled here too; a test keeps the two equal).
PRECISIONS = ("bf16", "fp8", "int8")
DEFAULT_PRECISION = "bf16"


def check_precision(value: Any, name: str = "precision") -> str:
    """`value` if it names a precision, else UserInputError naming `name` (a field or option)."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise UserInputError(f"{name} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def _check_integer(field_name: str, value: Any, minimum: int) -> None:
    """What the JSON reader checks, for configs built in code: an int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserInputError(f"{field_name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ModelSpec:
    """Which model the config is for: its self-attention layers and heads."""

    name: str
    adapter: str
    num_layers: int
    num_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        for name in ("name", "adapter"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise UserInputError(f"model.{name} must be a non-empty string, got {value!r}")
        for name in ("num_layers", "num_heads", "head_dim"):
            _check_integer(f"model.{name}", getattr(self, name), 1)


@dataclass(frozen=True)
class GeometrySpec:
    """Token geometry the patterns were searched on."""

    grid: Grid
    tile: TileShape
    block_size: int = DEFAULT_BLOCK_SIZE
    prefix_tokens: int = 0
    prefix_at: str = "start"

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", Grid.of(self.grid))
        object.__setattr__(self, "tile", TileShape.of(self.tile))
        _check_integer("geometry.block_size", self.block_size, 1)
        _check_integer("geometry.prefix_tokens", self.prefix_tokens, 0)
        if self.prefix_at not in ("start", "end"):
            raise UserInputError(
                f"geometry.prefix_at must be 'start' or 'end', got {self.prefix_at!r}"
            )

    def layout(self) -> TileLayout:
        return TileLayout(self.grid, self.tile, self.block_size, self.prefix_tokens, self.prefix_at)


@dataclass(frozen=True)
class StepSchedule:
    """Steps [0, dense_steps) run dense; bucket b covers [bucket_starts[b], next start or end).

    Step indices count denoising steps of a `num_steps`-step run. A run with another number of
    steps is mapped by position in the trajectory (step * num_steps / run_steps).
    """

    num_steps: int
    dense_steps: int
    bucket_starts: tuple[int, ...]
    # The recall threshold each bucket was searched at (version 2); empty: every bucket at the
    # config's `provenance.recall_threshold`. A sparse warm-up is bucket 0 at a higher one.
    bucket_recall: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "bucket_starts", tuple(self.bucket_starts))
        object.__setattr__(self, "bucket_recall", tuple(float(r) for r in self.bucket_recall))
        if self.num_steps < 1:
            raise UserInputError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0 <= self.dense_steps < self.num_steps:
            raise UserInputError(
                f"dense_steps must be in [0, num_steps) = [0, {self.num_steps}), "
                f"got {self.dense_steps}"
            )
        starts = self.bucket_starts
        if not starts or starts[0] != self.dense_steps:
            raise UserInputError(
                f"bucket_starts must begin at dense_steps={self.dense_steps}, got {list(starts)}"
            )
        if any(b <= a for a, b in zip(starts, starts[1:], strict=False)) or starts[-1] >= (
            self.num_steps
        ):
            raise UserInputError(
                f"bucket_starts must increase strictly and stay below num_steps="
                f"{self.num_steps}, got {list(starts)}"
            )

        if self.bucket_recall and len(self.bucket_recall) != len(starts):
            raise UserInputError(
                f"bucket_recall needs one threshold per bucket ({len(starts)}), got "
                f"{list(self.bucket_recall)}"
            )
        if any(not 0.0 < r <= 1.0 for r in self.bucket_recall):
            raise UserInputError(
                f"bucket_recall thresholds must lie in (0, 1], got {list(self.bucket_recall)}"
            )

    @property
    def num_buckets(self) -> int:
        return len(self.bucket_starts)

    def recall_of(self, bucket: int, default: float | None) -> float | None:
        """The threshold `bucket` was searched at (`default` where the schedule names none)."""
        return self.bucket_recall[bucket] if self.bucket_recall else default

    def bucket_range(self, bucket: int) -> tuple[int, int]:
        stops = (*self.bucket_starts[1:], self.num_steps)
        return self.bucket_starts[bucket], stops[bucket]

    def bucket_for_step(self, step: int, run_steps: int | None = None) -> int | None:
        """The bucket of a denoising step, or None for a dense warm-up step."""
        position = (
            step if run_steps in (None, self.num_steps) else step * self.num_steps / run_steps
        )
        if position < self.dense_steps:
            return None
        bucket = 0
        for b, start in enumerate(self.bucket_starts):
            if position >= start:
                bucket = b
        return bucket


@dataclass(frozen=True)
class HeadEntry:
    """One (bucket, layer, head): its pattern and, where known, the numbers the search measured."""

    pattern: HeadPattern
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CompactConfig:
    model: ModelSpec
    geometry: GeometrySpec
    schedule: StepSchedule
    heads: tuple[tuple[tuple[HeadEntry, ...], ...], ...]  # [bucket][layer][head]
    provenance: dict[str, Any] = field(default_factory=dict)
    # Pipeline attribute (e.g. "transformer_2") -> the config of that transformer (version 3).
    experts: dict[str, CompactConfig] = field(default_factory=dict)
    # The attention arithmetic the runtime runs: one of PRECISIONS, for every expert too.
    precision: str = DEFAULT_PRECISION

    def __post_init__(self) -> None:
        check_precision(self.precision)
        for name, expert in self.experts.items():
            if name == MAIN_TRANSFORMER or not name.isidentifier():
                raise UserInputError(
                    f"expert name {name!r} must be a pipeline attribute other than "
                    f"{MAIN_TRANSFORMER!r} (the top level of the config serves that one)"
                )
            if expert.experts:
                raise UserInputError(f"expert {name!r} holds experts of its own")
            if expert.precision != self.precision:
                raise UserInputError(
                    f"expert {name!r} has precision {expert.precision!r}, the config "
                    f"{self.precision!r}: a config has one precision, for all its experts"
                )
        heads = tuple(tuple(tuple(layer) for layer in bucket) for bucket in self.heads)
        object.__setattr__(self, "heads", heads)
        if len(heads) != self.schedule.num_buckets:
            raise UserInputError(
                f"{len(heads)} buckets of patterns for {self.schedule.num_buckets} step buckets"
            )
        tile_grid = self.geometry.layout().tile_grid
        for b, bucket in enumerate(heads):
            if len(bucket) != self.model.num_layers:
                raise UserInputError(
                    f"bucket {b}: {len(bucket)} layers, model has {self.model.num_layers}"
                )
            for layer_index, layer in enumerate(bucket):
                if len(layer) != self.model.num_heads:
                    raise UserInputError(
                        f"bucket {b} layer {layer_index}: {len(layer)} heads, model has "
                        f"{self.model.num_heads}"
                    )
                for h, entry in enumerate(layer):
                    entry.pattern.validate_for(
                        tile_grid, f"bucket {b} layer {layer_index} head {h}"
                    )

    # --- what the runtime asks -----------------------------------------------------------------

    def expert_configs(self) -> dict[str, CompactConfig]:
        """Pipeline attribute -> the config of that transformer, this config's own first."""
        own = CompactConfig(
            self.model,
            self.geometry,
            self.schedule,
            self.heads,
            self.provenance,
            precision=self.precision,
        )
        return {MAIN_TRANSFORMER: own, **self.experts}

    def with_experts(self, experts: dict[str, CompactConfig]) -> CompactConfig:
        """This config serving `pipeline.transformer`, with `experts` serving the others."""
        return CompactConfig(
            self.model,
            self.geometry,
            self.schedule,
            self.heads,
            self.provenance,
            dict(experts),
            self.precision,
        )

    def with_precision(self, precision: str) -> CompactConfig:
        """This config, its experts too, run at `precision` (one of PRECISIONS)."""
        check_precision(precision)
        experts = {
            name: dataclasses.replace(expert, precision=precision)
            for name, expert in self.experts.items()
        }
        return dataclasses.replace(self, experts=experts, precision=precision)

    def layout(self) -> TileLayout:
        return self.geometry.layout()

    def pattern(self, bucket: int, layer: int, head: int) -> HeadPattern:
        return self.heads[bucket][layer][head].pattern

    def tile_masks(self, bucket: int, layer: int) -> torch.Tensor:
        """[H, nt, nt] bool tile masks of one layer in one bucket."""
        tile_grid = self.layout().tile_grid
        return torch.stack([e.pattern.tile_mask(tile_grid) for e in self.heads[bucket][layer]])

    def block_masks(self, bucket: int, layer: int) -> torch.Tensor:
        """[H, nb, nb] bool block masks over the slot layout."""
        return self.layout().block_mask(self.tile_masks(bucket, layer))

    def summary(self) -> dict[str, float]:
        """Mean density and cost over every (bucket, layer, head) of every expert."""
        densities, costs = [], []
        for config in self.expert_configs().values():
            layout = config.layout()
            for b in range(config.schedule.num_buckets):
                for layer in range(config.model.num_layers):
                    masks = config.tile_masks(b, layer)
                    densities.append(density(masks))
                    costs.append(layout.cost(masks))
        return {
            "mean_density": float(torch.cat(densities).mean()),
            "mean_cost": float(torch.cat(costs).mean()),
        }

    # --- JSON ----------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The lowest format version that expresses this config (see docs/config.md)."""
        if self.experts:
            return 3
        far = any(e.pattern.uses_far_windows for b in self.heads for layer in b for e in layer)
        return 2 if far or self.schedule.bucket_recall else 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": CONFIG_FORMAT, "version": self.version}
        # Written only when it is not the default, so a bf16 config stays byte for byte what
        # readers without the field know (and what `evaluate`'s cache keys were made of).
        if self.precision != DEFAULT_PRECISION:
            out["precision"] = self.precision
        out |= self._body_json()
        if self.experts:
            out["experts"] = [
                {"transformer": name, **expert._body_json()}
                for name, expert in self.experts.items()
            ]
        return out

    def _body_json(self) -> dict[str, Any]:
        schedule: dict[str, Any] = {
            "num_steps": self.schedule.num_steps,
            "dense_steps": self.schedule.dense_steps,
            "bucket_starts": list(self.schedule.bucket_starts),
        }
        if self.schedule.bucket_recall:
            schedule["bucket_recall"] = list(self.schedule.bucket_recall)
        return {
            "model": {
                "name": self.model.name,
                "adapter": self.model.adapter,
                "num_layers": self.model.num_layers,
                "num_heads": self.model.num_heads,
                "head_dim": self.model.head_dim,
            },
            "geometry": {
                "grid": list(self.geometry.grid.as_tuple()),
                "tile": list(self.geometry.tile.as_tuple()),
                "block_size": self.geometry.block_size,
                "prefix_tokens": self.geometry.prefix_tokens,
                "prefix_at": self.geometry.prefix_at,
            },
            "schedule": schedule,
            "buckets": [
                {"layers": [[_entry_json(entry) for entry in layer] for layer in bucket]}
                for bucket in self.heads
            ],
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, obj: Any, source: str = "config") -> CompactConfig:
        return _parse_config(obj, source)


def _entry_json(entry: HeadEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"pattern": entry.pattern.to_json()}
    if entry.stats:
        out["stats"] = {k: round(float(v), 6) for k, v in entry.stats.items()}
    return out


def default_provenance(**extra: Any) -> dict[str, Any]:
    return {
        "tool_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


# --- loading ---------------------------------------------------------------------------------


class _Reader:
    """Typed field access that raises ConfigError with the field's path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.source, path, problem)

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected an object, got {type(value).__name__}")
        return value

    def get(self, parent: dict[str, Any], key: str, path: str) -> Any:
        if key not in parent:
            raise self.fail(f"{path}.{key}" if path else key, "missing")
        return parent[key]

    def integer(self, value: Any, path: str, minimum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(path, f"expected an integer >= {minimum}, got {value}")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"expected a non-empty string, got {value!r}")
        return value

    def int_list(self, value: Any, path: str, length: int | None, minimum: int) -> list[int]:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            want = f"a list of {length} integers" if length is not None else "a list of integers"
            raise self.fail(path, f"expected {want}, got {value!r}")
        return [self.integer(v, f"{path}[{i}]", minimum) for i, v in enumerate(value)]

    def array(self, value: Any, path: str, length: int, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list of {length} {what}, got {type(value).__name__}")
        if len(value) != length:
            raise self.fail(path, f"expected {length} {what}, got {len(value)}")
        return value


def _parse_config(obj: Any, source: str) -> CompactConfig:
    r = _Reader(source)
    root = r.obj(obj, "(root)")
    fmt = r.get(root, "format", "")
    if fmt != CONFIG_FORMAT:
        raise r.fail("format", f"expected {CONFIG_FORMAT!r}, got {fmt!r}")
    version = r.get(root, "version", "")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise r.fail(
            "version",
            f"expected 1, 2 or 3, got {version!r} (unsupported version; a newer compact-search "
            "writes it)",
        )
    precision = root.get("precision", DEFAULT_PRECISION)
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise r.fail("precision", f"expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    experts_json = root.get("experts", [])
    if experts_json and version < 3:
        raise r.fail("experts", "needs config version 3")
    if not isinstance(experts_json, list):
        raise r.fail("experts", f"expected a list of objects, got {type(experts_json).__name__}")
    experts = {}
    for index, expert_json in enumerate(experts_json):
        path = f"experts[{index}]"
        expert_obj = r.obj(expert_json, path)
        name = r.string(r.get(expert_obj, "transformer", path), f"{path}.transformer")
        if name in experts or name == MAIN_TRANSFORMER or not name.isidentifier():
            raise r.fail(
                f"{path}.transformer",
                f"expected a pipeline attribute named once and other than {MAIN_TRANSFORMER!r}, "
                f"got {name!r}",
            )
        if "experts" in expert_obj:
            raise r.fail(f"{path}.experts", "an expert holds no experts of its own")
        if "precision" in expert_obj:
            raise r.fail(
                f"{path}.precision", "set once, at the top level: it holds for every expert"
            )
        body = {k: v for k, v in expert_obj.items() if k != "transformer"}
        experts[name] = _parse_config(
            {"format": CONFIG_FORMAT, "version": version, **body, "precision": precision},
            f"{source}: {path}",
        )

    m = r.obj(r.get(root, "model", ""), "model")
    model = _build(
        r,
        "model",
        ModelSpec,
        name=r.string(r.get(m, "name", "model"), "model.name"),
        adapter=r.string(r.get(m, "adapter", "model"), "model.adapter"),
        num_layers=r.integer(r.get(m, "num_layers", "model"), "model.num_layers", 1),
        num_heads=r.integer(r.get(m, "num_heads", "model"), "model.num_heads", 1),
        head_dim=r.integer(r.get(m, "head_dim", "model"), "model.head_dim", 1),
    )

    g = r.obj(r.get(root, "geometry", ""), "geometry")
    prefix_at = g.get("prefix_at", "start")
    if prefix_at not in ("start", "end"):
        raise r.fail("geometry.prefix_at", f"expected 'start' or 'end', got {prefix_at!r}")
    geometry = _build(
        r,
        "geometry",
        GeometrySpec,
        grid=Grid(*r.int_list(r.get(g, "grid", "geometry"), "geometry.grid", 3, 1)),
        tile=TileShape(*r.int_list(r.get(g, "tile", "geometry"), "geometry.tile", 3, 1)),
        block_size=r.integer(g.get("block_size", DEFAULT_BLOCK_SIZE), "geometry.block_size", 1),
        prefix_tokens=r.integer(g.get("prefix_tokens", 0), "geometry.prefix_tokens", 0),
        prefix_at=prefix_at,
    )

    s = r.obj(r.get(root, "schedule", ""), "schedule")
    bucket_recall = s.get("bucket_recall", [])
    if bucket_recall and version < 2:
        raise r.fail("schedule.bucket_recall", "needs config version 2")
    if not isinstance(bucket_recall, list) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) for v in bucket_recall
    ):
        raise r.fail("schedule.bucket_recall", f"expected a list of numbers, got {bucket_recall!r}")
    try:
        schedule = StepSchedule(
            num_steps=r.integer(r.get(s, "num_steps", "schedule"), "schedule.num_steps", 1),
            dense_steps=r.integer(r.get(s, "dense_steps", "schedule"), "schedule.dense_steps", 0),
            bucket_starts=tuple(
                r.int_list(r.get(s, "bucket_starts", "schedule"), "schedule.bucket_starts", None, 0)
            ),
            bucket_recall=tuple(bucket_recall),
        )
    except ConfigError:
        raise
    except UserInputError as exc:
        raise r.fail("schedule", str(exc)) from exc

    tile_grid = geometry.layout().tile_grid
    buckets_json = r.array(r.get(root, "buckets", ""), "buckets", schedule.num_buckets, "buckets")
    heads = []
    for b, bucket_json in enumerate(buckets_json):
        bpath = f"buckets[{b}]"
        layers_json = r.array(
            r.get(r.obj(bucket_json, bpath), "layers", bpath),
            f"{bpath}.layers",
            model.num_layers,
            "layers (model.num_layers)",
        )
        layers = []
        for li, layer_json in enumerate(layers_json):
            lpath = f"{bpath}.layers[{li}]"
            entries = []
            heads_json = r.array(layer_json, lpath, model.num_heads, "heads (model.num_heads)")
            for hi, head_json in enumerate(heads_json):
                hpath = f"{lpath}[{hi}]"
                entries.append(_parse_entry(r, head_json, hpath, tile_grid, version))
            layers.append(tuple(entries))
        heads.append(tuple(layers))

    provenance = root.get("provenance", {})
    r.obj(provenance, "provenance")
    return _build(
        r,
        "buckets",
        CompactConfig,
        model,
        geometry,
        schedule,
        tuple(heads),
        provenance,
        experts,
        precision,
    )


def _build(r: _Reader, path: str, kind: type, *args: Any, **kwargs: Any) -> Any:
    """``kind(*args, **kwargs)``, its own validation's error (what the reader's checks did not
    already catch) as a ConfigError naming the file and ``path``."""
    try:
        return kind(*args, **kwargs)
    except ConfigError:
        raise
    except UserInputError as exc:
        raise r.fail(path, str(exc)) from exc


def _parse_entry(r: _Reader, value: Any, path: str, tile_grid: Grid, version: int) -> HeadEntry:
    head = r.obj(value, path)
    try:
        pattern = HeadPattern.from_json(r.get(head, "pattern", path))
        pattern.validate_for(tile_grid, "window")
    except ConfigError:
        raise
    except UserInputError as exc:
        raise r.fail(f"{path}.pattern", str(exc)) from exc
    if pattern.uses_far_windows and version < 2:
        raise r.fail(f"{path}.pattern", "band or wrapped windows need config version 2")
    stats_json = r.obj(head.get("stats", {}), f"{path}.stats")
    stats = {}
    for key, number in stats_json.items():
        if key not in STAT_FIELDS:
            raise r.fail(f"{path}.stats.{key}", f"unknown field (expected one of {STAT_FIELDS})")
        if (
            isinstance(number, bool)
            or not isinstance(number, (int, float))
            or not math.isfinite(number)
        ):
            raise r.fail(f"{path}.stats.{key}", f"expected a finite number, got {number!r}")
        stats[key] = float(number)
    return HeadEntry(pattern, stats)


def load_config(path: str | Path) -> CompactConfig:
    """Read and validate a config file; any problem raises ConfigError (one line)."""
    return CompactConfig.from_json(read_json(path, "config"), str(path))


def save_config(config: CompactConfig, path: str | Path) -> None:
    """Atomic write: an interrupted write leaves the previous file intact."""
    atomic_write_json(path, config.to_json())


def uniform_config(
    model: ModelSpec,
    geometry: GeometrySpec,
    schedule: StepSchedule,
    patterns: Sequence[HeadPattern] | HeadPattern,
    provenance: dict[str, Any] | None = None,
) -> CompactConfig:
    """A config whose every bucket and layer uses the same per-head patterns (hand-built configs).

    `patterns` is one pattern for every head, or one per head.
    """
    if isinstance(patterns, HeadPattern):
        patterns = [patterns] * model.num_heads
    if len(patterns) != model.num_heads:
        raise UserInputError(f"{len(patterns)} patterns for {model.num_heads} heads")
    layer = tuple(HeadEntry(p) for p in patterns)
    bucket = tuple(layer for _ in range(model.num_layers))
    heads = tuple(bucket for _ in range(schedule.num_buckets))
    return CompactConfig(model, geometry, schedule, heads, provenance or default_provenance())
