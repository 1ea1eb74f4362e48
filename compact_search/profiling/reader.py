"""`load_capture(path) -> Capture`: the read API over a finished capture (what `compact-search
profile` writes). `load_profile` is the same function under its stable name (DESIGN.md).

Tile masses come back as fp32 with every row renormalised to sum to 1 (storage is fp16). Samples
are (step, prompt) pairs for a "per-prompt" store and (step, mean over prompts) for a
"prompt-mean" store; `sample_index` says which.

A capture of a pipeline of several experts (Wan2.2) names the expert of every denoising step
(`step_experts`); `expert_view(name)` is the same capture restricted to the captured steps that
expert runs, under a fingerprint of its own, which is what the search and the gate read for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch

from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape, tile_grid_of
from compact_search.profiling.capture import CAPTURE_FORMAT, CAPTURE_VERSION
from compact_search.profiling.store import (
    CaptureStore,
    read_unit_prompts,
    read_unit_tensor,
    unit_name,
)

REQUIRED_FIELDS = (
    "format", "version", "model", "adapter", "grid", "prefix_tokens", "num_layers", "num_heads",
    "head_dim", "num_steps", "steps", "layers", "prompts", "seeds", "tiles", "store", "fingerprint",
)  # fmt: skip


def _normalise_rows(mass: torch.Tensor) -> torch.Tensor:
    mass = mass.float()
    return mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class Capture:
    """A finished capture. Metadata as attributes; tile masses loaded lazily per unit."""

    path: Path
    model: str
    adapter: str
    grid: Grid
    prefix_tokens: int
    num_layers: int
    num_heads: int
    head_dim: int
    num_steps: int
    steps: list[int]
    layers: list[int]
    prompts: list[str]
    seeds: list[int]
    tiles: list[TileShape]
    store: str
    fingerprint: str
    metadata: dict = field(repr=False)
    step_experts: list[str] | None = None  # the expert of every denoising step; None: one
    expert: str | None = None  # a view of one expert's steps (`expert_view`)

    # --- experts -----------------------------------------------------------------------------

    @property
    def experts(self) -> list[str]:
        """The transformers (pipeline attributes) whose steps the capture holds, in step order;
        empty for a one-transformer model."""
        if self.step_experts is None:
            return []
        return list(dict.fromkeys(self.step_experts))

    def expert_steps(self, name: str) -> list[int]:
        """Every denoising step (captured or not) that expert `name` runs."""
        return [step for step, expert in enumerate(self.step_experts or []) if expert == name]

    def expert_view(self, name: str) -> Capture:
        """The capture restricted to the captured steps expert `name` runs."""
        if name not in self.experts:
            raise UserInputError(
                f"{self.path}: no expert {name!r} in this profile; it holds "
                f"{', '.join(self.experts) or 'one transformer'}"
            )
        runs = self.expert_steps(name)
        steps = [s for s in self.steps if s in runs]
        if not steps:
            raise UserInputError(
                f"{self.path}: {name} runs steps {runs[0]}..{runs[-1]} and none of them was "
                f"captured (capture.steps {self.steps}): add one of its steps to capture.steps"
            )
        digest = hashlib.sha256(f"{self.fingerprint}:{name}".encode()).hexdigest()[:32]
        return replace(self, steps=steps, fingerprint=digest, expert=name)

    # --- geometry ----------------------------------------------------------------------------

    def tile_grid(self, tile: TileShape | tuple[int, int, int] | None = None) -> Grid:
        return tile_grid_of(self.grid, self._tile(tile))

    @property
    def sample_index(self) -> list[tuple[int, int | None]]:
        """What the S axis of `sample_tile_mass` holds, for all steps: (step, prompt index), or
        (step, None) where the store keeps the mean over prompts."""
        if self.store == "per-prompt":
            return [(s, p) for s in self.steps for p in range(len(self.prompts))]
        return [(s, None) for s in self.steps]

    # --- tile mass ---------------------------------------------------------------------------

    def sample_tile_mass(
        self, layer: int, tile: TileShape | tuple | None = None, steps: list[int] | None = None
    ) -> torch.Tensor:
        """[S, H, nq, nk] fp32, rows summing to 1: every profiled sample of one layer.

        S = len(steps) x prompts (step-major) for a per-prompt store, len(steps) for a
        prompt-mean store (each sample then the mean over prompts at that step).
        """
        tile = self._tile(tile)
        chosen = self._steps(steps)
        masses = [self._unit_tensor(step, layer, tile) for step in chosen]  # [G, H, nt, nt] each
        return _normalise_rows(torch.cat(masses))

    def tile_mass(
        self,
        layer: int,
        head: int,
        step: int | None = None,
        prompt: int | None = None,
        tile: TileShape | tuple | None = None,
    ) -> torch.Tensor:
        """[nq, nk] fp32, rows summing to 1. None averages over that axis (steps, prompts);
        tile None is the first candidate tile."""
        if not 0 <= head < self.num_heads:
            raise UserInputError(f"head {head} outside 0..{self.num_heads - 1}")
        tile = self._tile(tile)
        if prompt is not None:
            if not 0 <= prompt < len(self.prompts):
                raise UserInputError(f"prompt {prompt} outside 0..{len(self.prompts) - 1}")
            if self.store != "per-prompt":
                raise UserInputError(
                    f"{self.path} stores the mean over prompts; per-prompt tile mass is not kept"
                )
        chosen = self._steps(None if step is None else [step])
        per_step = []
        for s in chosen:
            unit = self._unit_tensor(s, layer, tile)[:, head]  # [G, nt, nt]
            per_step.append(unit[prompt] if prompt is not None else unit.float().mean(0))
        return _normalise_rows(torch.stack([m.float() for m in per_step]).mean(0))

    # --- internals ---------------------------------------------------------------------------

    def _tile(self, tile) -> TileShape:
        if tile is None:
            return self.tiles[0]
        tile = TileShape.of(tile)
        if tile not in self.tiles:
            raise UserInputError(
                f"tile {tile} was not profiled; candidates: {', '.join(map(str, self.tiles))}"
            )
        return tile

    def _steps(self, steps) -> list[int]:
        if steps is None:
            return list(self.steps)
        unknown = [s for s in steps if s not in self.steps]
        if unknown:
            raise UserInputError(f"steps {unknown} were not captured; captured: {self.steps}")
        return list(steps)

    def _unit_tensor(self, step: int, layer: int, tile: TileShape) -> torch.Tensor:
        if layer not in self.layers:
            raise UserInputError(f"layer {layer} was not captured; captured: {self.layers}")
        path = self.path / "tile_mass" / unit_name(step, layer)
        stat = path.stat()
        tensor = _load_unit_tensor(path, stat.st_mtime_ns, stat.st_size, tile)
        nt = self.tile_grid(tile).num_tokens
        groups = len(self.prompts) if self.store == "per-prompt" else 1
        if tuple(tensor.shape) != (groups, self.num_heads, nt, nt):
            raise UserInputError(
                f"{self.path}: unit s{step}-l{layer} tile {tile} has shape {tuple(tensor.shape)}, "
                f"expected {(groups, self.num_heads, nt, nt)}"
            )
        return tensor


@lru_cache(maxsize=64)
def _load_unit_tensor(path: Path, mtime_ns: int, size: int, tile: TileShape) -> torch.Tensor:
    """One tile of one unit, cached per file version (mtime and size are part of the key)."""
    return read_unit_tensor(path, tile)


def _capture_dir(path: Path) -> Path:
    if path.is_file() and path.name == "profile.json":
        return path.parent
    if (path / "profile.json").is_file():
        return path
    if (path / "profile" / "profile.json").is_file():
        return path / "profile"
    if (path / "settings.json").is_file():
        raise UserInputError(
            f"{path} holds an unfinished profile; run `compact-search profile` again to resume it"
        )
    raise UserInputError(f"no profile at {path} (expected profile.json)")


def load_capture(path: str | Path) -> Capture:
    """Open a finished capture (its folder, the run folder above it, or its profile.json)."""
    root = _capture_dir(Path(path))
    try:
        meta = json.loads((root / "profile.json").read_text())
    except (ValueError, OSError) as exc:
        raise UserInputError(f"{root / 'profile.json'}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise UserInputError(f"{root / 'profile.json'}: not a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in meta]
    if missing:
        raise UserInputError(f"{root / 'profile.json'}: missing fields {missing}")
    if meta["format"] != CAPTURE_FORMAT or meta["version"] != CAPTURE_VERSION:
        raise UserInputError(
            f"{root / 'profile.json'}: format {meta['format']!r} v{meta['version']}, "
            f"expected {CAPTURE_FORMAT!r} v{CAPTURE_VERSION}"
        )
    try:
        capture = Capture(
            path=root,
            model=meta["model"],
            adapter=meta["adapter"],
            grid=Grid.of(meta["grid"]),
            prefix_tokens=int(meta["prefix_tokens"]),
            num_layers=int(meta["num_layers"]),
            num_heads=int(meta["num_heads"]),
            head_dim=int(meta["head_dim"]),
            num_steps=int(meta["num_steps"]),
            steps=[int(s) for s in meta["steps"]],
            layers=[int(layer) for layer in meta["layers"]],
            prompts=[str(p) for p in meta["prompts"]],
            seeds=[int(s) for s in meta["seeds"]],
            tiles=[TileShape.of(t) for t in meta["tiles"]],
            store=str(meta["store"]),
            fingerprint=str(meta["fingerprint"]),
            metadata=meta,
            step_experts=(
                None if meta.get("step_experts") is None else [str(e) for e in meta["step_experts"]]
            ),
        )
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{root / 'profile.json'}: bad field ({exc})") from None
    if capture.step_experts is not None and len(capture.step_experts) != capture.num_steps:
        raise UserInputError(
            f"{root / 'profile.json'}: step_experts names {len(capture.step_experts)} steps, "
            f"num_steps is {capture.num_steps}"
        )
    # Every unit must be present and whole (headers are cheap to read; data loads lazily).
    everyone = tuple(range(len(capture.prompts)))
    store = CaptureStore(root)
    for step in capture.steps:
        for layer in capture.layers:
            unit = store.merged_dir / unit_name(step, layer)
            if not unit.is_file():
                raise UserInputError(f"{root}: profile unit {unit.name} is missing")
            if read_unit_prompts(unit) != everyone:
                raise UserInputError(f"{unit}: does not cover every prompt")
    return capture


# The stable name (DESIGN.md): other code and outside checks call it.
load_profile = load_capture
