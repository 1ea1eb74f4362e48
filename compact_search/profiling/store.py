"""On-disk layout of a capture, written unit by unit so a killed run resumes without loss.

    <capture folder>/                  default runs/<name>/profile
      settings.json                    the run's settings and their fingerprint (resume check)
      parts/rank-<r>/s<step>-l<layer>.safetensors   units one process has written
      tile_mass/s<step>-l<layer>.safetensors        merged units (all prompts)
      profile.json                     metadata + fingerprint; written last: the capture is done

A *unit* is one (captured step, layer): one safetensors file holding, for every candidate tile
shape "tf x th x tw", a tensor [G, H, nt, nt] fp16 of tile mass, and in its metadata the prompt
indices it covers. Store "per-prompt": G = number of covered prompts, in that order. Store
"prompt-mean": G = 1, the mean over the covered prompts.

Every write goes to a temporary file that is renamed over the unit (atomic on POSIX), so a unit
on disk is always whole and the prompts it lists are exactly those it holds: that list *is* the
manifest. A resumed run reads the lists and captures only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from compact_search.errors import UserInputError
from compact_search.geometry import TileShape
from compact_search.io import atomic_write_bytes, atomic_write_text, ensure_folder

UNIT_PATTERN = re.compile(r"^s(\d+)-l(\d+)\.safetensors$")
STORAGE_DTYPE = torch.float16


def unit_name(step: int, layer: int) -> str:
    return f"s{step:04d}-l{layer:03d}.safetensors"


def tile_key(tile: TileShape) -> str:
    return str(tile)


@dataclass(frozen=True)
class Unit:
    """The contents of one unit file: prompt indices and {tile: [G, H, nt, nt]} tensors."""

    prompts: tuple[int, ...]
    masses: dict[TileShape, torch.Tensor]
    prefix_tokens: int = 0


def read_unit_prompts(path: Path) -> tuple[int, ...]:
    """The prompts a unit covers, from its header only."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise UserInputError(f"{path}: unreadable profile unit ({_first_line(exc)})") from None
    try:
        return tuple(json.loads(metadata["prompts"]))
    except (KeyError, ValueError):
        raise UserInputError(f"{path}: profile unit without a prompt list") from None


def read_unit(path: Path) -> Unit:
    """Load a unit file; any damage becomes one UserInputError line naming the file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            masses = {
                TileShape.of(_parse_tile(key)): handle.get_tensor(key)
                for key in handle.keys()  # noqa: SIM118
            }
        prompts = tuple(json.loads(metadata["prompts"]))
        prefix = int(metadata.get("prefix_tokens", "0"))
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
        raise UserInputError(f"{path}: corrupt profile unit ({_first_line(exc)})") from None
    if not masses or not prompts:
        raise UserInputError(f"{path}: empty profile unit")
    for tile, tensor in masses.items():
        # [G, H, nt, nt]: G = covered prompts (per-prompt store) or 1 (prompt-mean store)
        if tensor.ndim != 4 or tensor.shape[0] not in (1, len(prompts)):
            raise UserInputError(f"{path}: tile {tile} tensor has shape {tuple(tensor.shape)}")
    return Unit(prompts, masses, prefix)


def read_unit_tensor(path: Path, tile: TileShape) -> torch.Tensor:
    """One tile's tensor [G, H, nt, nt] of a unit, without loading the other tiles."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(tile_key(tile))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UserInputError(f"{path}: corrupt profile unit ({_first_line(exc)})") from None


def _parse_tile(key: str) -> tuple[int, int, int]:
    parts = key.split("x")
    if len(parts) != 3:
        raise ValueError(f"bad tile key {key!r}")
    return tuple(int(p) for p in parts)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def write_unit(path: Path, unit: Unit) -> None:
    """Atomic write: temporary file in the same directory, flushed, then renamed over `path`.
    A full disk raises one UserInputError line naming the unit and the space it needs."""
    ensure_folder(path.parent)
    tensors = {
        tile_key(tile): t.to("cpu", STORAGE_DTYPE).contiguous() for tile, t in unit.masses.items()
    }
    metadata = {"prompts": json.dumps(list(unit.prompts)), "prefix_tokens": str(unit.prefix_tokens)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def unit_is_whole(path: Path) -> bool:
    """Whether a unit file's header opens and covers the whole file (a truncated or damaged
    unit fails here; safetensors checks the data offsets against the file size)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        json.loads(metadata["prompts"])
    except (SafetensorError, OSError, KeyError, ValueError):
        return False
    return True


def add_prompt(existing: Unit | None, prompt: int, masses: dict, store: str, prefix: int) -> Unit:
    """Fold one prompt's tile masses {tile: [H, nt, nt]} into a unit; a covered prompt is kept
    as it is (never counted twice)."""
    if existing is not None and prompt in existing.prompts:
        return existing
    new = {tile: m.float().cpu()[None] for tile, m in masses.items()}  # [1, H, nt, nt]
    if existing is None:
        return Unit((prompt,), new, prefix)
    prompts = existing.prompts
    if store == "per-prompt":
        order = sorted(range(len(prompts) + 1), key=lambda i: (list(prompts) + [prompt])[i])
        combined = {
            tile: torch.cat([existing.masses[tile].float(), new[tile]])[order] for tile in new
        }
        return Unit(
            tuple(sorted(prompts + (prompt,))), combined, max(prefix, existing.prefix_tokens)
        )
    count = len(prompts)
    combined = {
        tile: (existing.masses[tile].float() * count + new[tile]) / (count + 1) for tile in new
    }
    return Unit(tuple(sorted(prompts + (prompt,))), combined, max(prefix, existing.prefix_tokens))


def merge_units(units: list[Unit], store: str) -> Unit:
    """Combine the units of several processes (disjoint prompts) into one."""
    prompts = [p for unit in units for p in unit.prompts]
    if len(set(prompts)) != len(prompts):
        raise UserInputError(f"profile parts overlap in prompts {sorted(prompts)}")
    tiles = list(units[0].masses)
    prefix = max(unit.prefix_tokens for unit in units)
    if store == "per-prompt":
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        masses = {
            tile: torch.cat([unit.masses[tile].float() for unit in units])[order] for tile in tiles
        }
    else:
        weights = torch.tensor([len(unit.prompts) for unit in units], dtype=torch.float32)
        masses = {
            tile: sum(w * unit.masses[tile].float() for w, unit in zip(weights, units, strict=True))
            / weights.sum()
            for tile in tiles
        }
    return Unit(tuple(sorted(prompts)), masses, prefix)


class CaptureStore:
    """A capture folder: parts per process, merged units, settings and final metadata."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def settings_path(self) -> Path:
        return self.root / "settings.json"

    @property
    def metadata_path(self) -> Path:
        return self.root / "profile.json"

    @property
    def merged_dir(self) -> Path:
        return self.root / "tile_mass"

    def part_dir(self, rank: int) -> Path:
        return self.root / "parts" / f"rank-{rank}"

    def part_dirs(self) -> list[Path]:
        parts = self.root / "parts"
        return sorted(p for p in parts.iterdir() if p.is_dir()) if parts.is_dir() else []

    def is_complete(self) -> bool:
        return self.metadata_path.is_file()

    def check_resumable(self, fingerprint: str) -> bool:
        """Read-only: True when the folder holds a run of these settings, False when it holds
        none; other settings are refused (the numbers would mix two experiments)."""
        if not self.settings_path.is_file():
            return False
        try:
            recorded = json.loads(self.settings_path.read_text())["fingerprint"]
        except (ValueError, KeyError):
            raise UserInputError(f"{self.settings_path}: corrupt settings file") from None
        if recorded != fingerprint:
            raise UserInputError(
                f"{self.root} holds a profile with other settings or model weights; "
                "pass --restart to discard it or choose another --out"
            )
        return True

    def begin(self, settings_json: dict, fingerprint: str, *, restart: bool = False) -> bool:
        """Create or reopen the directory. Returns True when resuming an earlier run.

        Reopening with other settings is refused: the numbers would mix two experiments.
        """
        if restart and self.root.exists():
            self._clear()
        if self.check_resumable(fingerprint):
            return True
        ensure_folder(self.root)
        payload = {"fingerprint": fingerprint, "settings": settings_json}
        # Under torchrun every rank may get here at once: each writes its own temporary file
        # (the same content) and renames it into place.
        atomic_write_text(self.settings_path, json.dumps(payload, indent=2) + "\n")
        return False

    def _clear(self) -> None:
        for path in sorted(self.root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()

    def drop_damaged_units(self) -> list[Path]:
        """Delete every unit file that is not whole (truncated by a full disk or a cut copy),
        so that a resumed run computes it again; a damaged merged unit also reopens a finished
        capture (profile.json goes). -> the deleted files."""
        damaged = []
        for directory in [*self.part_dirs(), self.merged_dir]:
            if not directory.is_dir():
                continue
            for path in sorted(directory.iterdir()):
                if UNIT_PATTERN.match(path.name) and not unit_is_whole(path):
                    path.unlink()
                    damaged.append(path)
        if any(path.parent == self.merged_dir for path in damaged):
            self.metadata_path.unlink(missing_ok=True)
        return damaged

    def covered(self, steps, layers) -> dict[tuple[int, int], set[int]]:
        """Prompts already on disk for every (step, layer), over all parts and merged units."""
        done: dict[tuple[int, int], set[int]] = {
            (s, layer): set() for s in steps for layer in layers
        }
        for directory in [*self.part_dirs(), self.merged_dir]:
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                match = UNIT_PATTERN.match(path.name)
                if match is None:
                    continue
                key = (int(match.group(1)), int(match.group(2)))
                if key in done:
                    done[key].update(read_unit_prompts(path))
        return done

    def update_part(
        self, rank: int, step: int, layer: int, prompt: int, masses: dict, store: str, prefix: int
    ) -> None:
        path = self.part_dir(rank) / unit_name(step, layer)
        existing = read_unit(path) if path.is_file() else None
        write_unit(path, add_prompt(existing, prompt, masses, store, prefix))

    def merge(self, steps, layers, num_prompts: int, store: str) -> None:
        """Parts -> merged units; each merged unit is written before its parts are removed, so a
        merge killed half way resumes too."""
        ensure_folder(self.merged_dir)
        for step in steps:
            for layer in layers:
                name = unit_name(step, layer)
                final = self.merged_dir / name
                parts = [d / name for d in self.part_dirs() if (d / name).is_file()]
                if not final.is_file():
                    units = [read_unit(p) for p in parts]
                    if not units:
                        raise UserInputError(f"{self.root}: no captured data for {name}")
                    merged = merge_units(units, store)
                    if merged.prompts != tuple(range(num_prompts)):
                        raise UserInputError(
                            f"{self.root}: {name} covers prompts {list(merged.prompts)}, "
                            f"expected 0..{num_prompts - 1}"
                        )
                    write_unit(final, merged)
                for part in parts:
                    part.unlink()
        for directory in self.part_dirs():
            for leftover in directory.glob(".*.tmp"):
                leftover.unlink()
            if not any(directory.iterdir()):
                directory.rmdir()
        parts_root = self.root / "parts"
        if parts_root.is_dir() and not any(parts_root.iterdir()):
            parts_root.rmdir()

    def content_hash(self, steps, layers) -> str:
        """sha256 over the merged units' prompts and tensors, in (step, layer, tile) order (not
        the file bytes: safetensors orders header metadata arbitrarily)."""
        digest = hashlib.sha256()
        for step in steps:
            for layer in layers:
                unit = read_unit(self.merged_dir / unit_name(step, layer))
                digest.update(f"{unit_name(step, layer)}:{list(unit.prompts)}".encode())
                for tile in sorted(unit.masses, key=lambda t: t.as_tuple()):
                    digest.update(str(tile).encode())
                    digest.update(
                        unit.masses[tile].contiguous().view(torch.uint8).numpy().tobytes()
                    )
        return digest.hexdigest()

    def write_metadata(self, metadata: dict) -> None:
        atomic_write_text(self.metadata_path, json.dumps(metadata, indent=2) + "\n")
