"""Run profiles: what `compact-search profile` runs, read from `profiles/*.toml`.

A run profile names the model, how to sample from it and what to capture::

    name = "wan2.1-t2v-1.3b"

    [model]
    source = "../checkpoints/Wan2.1-T2V-1.3B-Diffusers"  # a local diffusers folder, or builtin:NAME
    adapter = "wan"              # a key of models.adapters.ADAPTERS
    dtype = "bfloat16"           # float32 | float16 | bfloat16

    [sampling]
    height = 480                 # pixels
    width = 832
    frames = 81
    steps = 50                   # denoising steps
    guidance = 5.0
    prompts = ["a red fox runs through fresh snow"]
    # prompts_file = "prompts.txt" (one prompt a line, relative to this file) instead of prompts
    seeds = [0]                  # one per prompt, or one for all (prompt i then uses seed + i)
    # image = "first-frame.png"  (image-to-video pipelines: the conditioning picture, relative
    #                             to this file; every prompt starts from it)

    [capture]
    steps = [0, 10, 20]          # denoising step indices, or "all"
    layers = "all"               # or a list of self-attention layer indices
    tiles = [[3, 8, 8], [3, 16, 16]]
    store = "per-prompt"         # or "prompt-mean" (average over prompts on disk)

The built-in sources (`builtin:NAME`) are whatever the adapter registry says
(`models.adapters.builtin_sources()`); each belongs to one adapter. Every bad field raises one
`UserInputError` line naming the file and the field. docs/profile.md lists every field.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from compact_search.errors import ConfigError, UserInputError
from compact_search.geometry import TileShape
from compact_search.models.adapters import adapter_names, builtin_sources
from compact_search.models.plugin import TORCH_DTYPES

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

DTYPES = tuple(TORCH_DTYPES)
STORE_MODES = ("per-prompt", "prompt-mean")

# Every key a run profile may hold, per section ("" is the top level). A key outside it is an
# error: a misspelled optional key would otherwise run with its default without a word.
# RunProfile fields a profile may leave unset (absent from its JSON form when unset).
OPTIONAL_SAMPLING = ("scheduler", "flow_shift", "image")

SCHEMA: dict[str, tuple[str, ...]] = {
    "": ("name", "model", "sampling", "capture"),
    "model": ("source", "adapter", "dtype"),
    "sampling": ("height", "width", "frames", "steps", "guidance", "prompts", "prompts_file",
                 "seeds", "scheduler", "flow_shift", "image"),
    "capture": ("steps", "layers", "tiles", "store"),
}  # fmt: skip


@dataclass(frozen=True)
class RunProfile:
    """One run profile (a `profiles/*.toml` file): the model, its sampling, what to capture.

    `seeds` holds one seed per prompt; `capture_layers` None means all.
    """

    name: str
    source: str
    adapter: str
    dtype: str
    height: int
    width: int
    frames: int
    num_steps: int
    guidance: float
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    capture_steps: tuple[int, ...]
    capture_layers: tuple[int, ...] | None
    tiles: tuple[TileShape, ...]
    store: str = "per-prompt"
    # A diffusers scheduler class to sample with instead of the folder's, and its flow shift;
    # None keeps the folder's scheduler and its configuration.
    scheduler: str | None = None
    flow_shift: float | None = None
    # An image-to-video pipeline's conditioning picture (a file path), the same for every prompt.
    # Read when sampling, not here: a shipped profile names a picture the user puts there.
    image: str | None = None

    def __post_init__(self) -> None:
        where = f"profile {self.name!r}"
        if self.adapter not in adapter_names():
            raise ConfigError(where, "model.adapter", f"must be one of {adapter_names()}")
        owner = builtin_sources().get(self.source)
        if owner is not None and owner != self.adapter:
            raise ConfigError(
                where, "model.adapter", f"{self.source} is a model of adapter {owner!r}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(where, "model.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.store not in STORE_MODES:
            raise ConfigError(
                where, "capture.store", f"must be one of {STORE_MODES}, got {self.store!r}"
            )
        for field in ("height", "width", "frames", "num_steps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(where, field, f"must be a positive integer, got {value!r}")
        if not self.prompts:
            raise ConfigError(where, "sampling.prompts", "needs at least one prompt")
        if len(self.seeds) != len(self.prompts):
            raise ConfigError(where, "sampling.seeds", "needs one seed per prompt")
        if not self.capture_steps:
            raise ConfigError(where, "capture.steps", "needs at least one step")
        bad_steps = [s for s in self.capture_steps if not 0 <= s < self.num_steps]
        if bad_steps:
            raise ConfigError(
                where, "capture.steps", f"{bad_steps} outside 0..{self.num_steps - 1}"
            )
        if list(self.capture_steps) != sorted(set(self.capture_steps)):
            raise ConfigError(where, "capture.steps", "must be increasing without repeats")
        if self.capture_layers is not None and (
            not self.capture_layers
            or any(layer < 0 for layer in self.capture_layers)
            or list(self.capture_layers) != sorted(set(self.capture_layers))
        ):
            raise ConfigError(where, "capture.layers", "must be increasing indices >= 0, or 'all'")
        if not self.tiles:
            raise ConfigError(where, "capture.tiles", "needs at least one tile shape")
        if len(set(self.tiles)) != len(self.tiles):
            raise ConfigError(where, "capture.tiles", "lists a tile shape twice")
        if self.scheduler is not None and (
            not isinstance(self.scheduler, str) or not self.scheduler.isidentifier()
        ):
            raise ConfigError(
                where,
                "sampling.scheduler",
                f"must name a diffusers scheduler class, got {self.scheduler!r}",
            )
        if self.flow_shift is not None and (
            isinstance(self.flow_shift, bool)
            or not isinstance(self.flow_shift, (int, float))
            or not self.flow_shift > 0
        ):
            raise ConfigError(
                where, "sampling.flow_shift", f"must be a positive number, got {self.flow_shift!r}"
            )
        if self.image is not None and (not isinstance(self.image, str) or not self.image):
            raise ConfigError(where, "sampling.image", f"must be a file path, got {self.image!r}")

    def to_json(self) -> dict:
        values = asdict(self)
        values["tiles"] = [list(t.as_tuple()) for t in self.tiles]
        values["prompts"] = list(self.prompts)
        values["seeds"] = list(self.seeds)
        values["capture_steps"] = list(self.capture_steps)
        values["capture_layers"] = (
            None if self.capture_layers is None else list(self.capture_layers)
        )
        # Unset sampling options stay out, so profiles without them keep their fingerprints.
        for key in OPTIONAL_SAMPLING:
            if values[key] is None:
                del values[key]
        return values

    @classmethod
    def from_json(cls, values: dict) -> RunProfile:
        values = dict(values)
        values["tiles"] = tuple(TileShape.of(t) for t in values["tiles"])
        for key in ("prompts", "seeds", "capture_steps"):
            values[key] = tuple(values[key])
        if values["capture_layers"] is not None:
            values["capture_layers"] = tuple(values["capture_layers"])
        return cls(**values)

    def fingerprint(self) -> str:
        """sha256 of the settings (what decides the numbers), for resume checks; with an image,
        of its bytes too (another picture under the same name is other settings)."""
        values = self.to_json()
        if self.image is not None:
            values["image_sha256"] = image_sha256(self.image, f"profile {self.name!r}")
        canonical = json.dumps(values, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def image_sha256(path: str, where: str) -> str:
    """sha256 of the file `sampling.image` names; a missing or unreadable one is one line."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        problem = "no such file" if not Path(path).exists() else f"cannot read ({exc.strerror})"
        raise ConfigError(
            where,
            "sampling.image",
            f"{problem}: {path} (the conditioning image; relative paths "
            "start at the run profile's folder)",
        ) from None


def check_schema(data: dict, source: str) -> None:
    """Refuse any key or section the schema does not know, naming the closest valid one."""
    for section, allowed in SCHEMA.items():
        table = data if not section else data.get(section, {})
        if not isinstance(table, dict):
            continue  # _table reports a section that is not a table
        for key in table:
            if key in allowed:
                continue
            field = f"{section}.{key}" if section else key
            near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            if not near:  # a key put into the wrong section, e.g. `frames` under [capture]
                owner = [s for s, keys in SCHEMA.items() if s and s != section and key in keys]
                near = [f"{owner[0]}.{key}"] if owner else []
            hint = f"; did you mean {near[0]!r}?" if near else ""
            what = "section" if isinstance(table[key], dict) else "key"
            raise ConfigError(source, field, f"unknown {what}{hint} (docs/profile.md lists them)")


def _table(data: dict, key: str, source: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(source, key, "must be a table")
    return value


def _int(table: dict, key: str, source: str, field: str, default: int | None = None) -> int:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(source, field, "is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(source, field, f"must be a positive integer, got {value!r}")
    return value


def _int_list(value: object, source: str, field: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise ConfigError(source, field, f"must be a list of integers, got {value!r}")
    return value


def _prompts(sampling: dict, path: Path) -> tuple[str, ...]:
    source = str(path)
    if "prompts" in sampling and "prompts_file" in sampling:
        raise ConfigError(source, "sampling.prompts", "give prompts or prompts_file, not both")
    if "prompts_file" in sampling:
        prompts_path = path.parent / str(sampling["prompts_file"])
        if not prompts_path.is_file():
            raise ConfigError(source, "sampling.prompts_file", f"no such file: {prompts_path}")
        lines = prompts_path.read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    else:
        prompts = sampling.get("prompts")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(source, "sampling.prompts", "must be a list of strings")
    if not prompts:
        raise ConfigError(source, "sampling.prompts", "needs at least one prompt")
    return tuple(prompts)


def _tiles(capture: dict, source: str) -> tuple[TileShape, ...]:
    tiles = capture.get("tiles")
    if not isinstance(tiles, list) or not tiles:
        raise ConfigError(source, "capture.tiles", "must be a list of [tf, th, tw] shapes")
    shapes = []
    for tile in tiles:
        try:
            shapes.append(TileShape.of(_int_list(tile, source, "capture.tiles")))
        except UserInputError as exc:
            raise ConfigError(source, "capture.tiles", str(exc)) from None
    return tuple(shapes)


# The run profiles shipped with the project, next to the package in a source checkout.
SHIPPED_PROFILES = Path(__file__).resolve().parents[2] / "profiles"


def resolve_run_profile(name_or_path: str | Path) -> Path:
    """A run profile's path: a file path, a name in ./profiles, or a name in the shipped ones."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    for folder in (Path("profiles"), SHIPPED_PROFILES):
        named = folder / f"{name_or_path}.toml"
        if named.is_file():
            return named
    raise UserInputError(f"no profile {str(name_or_path)!r}: not a file, nor profiles/NAME.toml")


def load_run_profile(path: str | Path) -> RunProfile:
    """Parse a run profile TOML file into a validated `RunProfile`."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise UserInputError(f"no profile file at {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "toml", str(exc)) from None
    check_schema(data, source)
    model = _table(data, "model", source)
    sampling = _table(data, "sampling", source)
    capture = _table(data, "capture", source)

    model_source = model.get("source")
    builtins = tuple(builtin_sources())
    if not isinstance(model_source, str) or not model_source:
        raise ConfigError(
            source, "model.source", f"must name one of {builtins} or a local directory"
        )
    if model_source.startswith("builtin:") and model_source not in builtins:
        raise ConfigError(source, "model.source", f"must be one of {builtins} or a path")
    if not model_source.startswith("builtin:"):
        model_path = Path(model_source).expanduser()
        if not model_path.is_absolute():
            model_path = (path.parent / model_path).resolve()
        model_source = str(model_path)
    adapter = model.get("adapter", "wan")
    image = sampling.get("image")
    if isinstance(image, str) and image:
        image_path = Path(image).expanduser()
        image = str(
            image_path if image_path.is_absolute() else (path.parent / image_path).resolve()
        )

    num_steps = _int(sampling, "steps", source, "sampling.steps")
    guidance = sampling.get("guidance", 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise ConfigError(source, "sampling.guidance", f"must be a number, got {guidance!r}")
    prompts = _prompts(sampling, path)
    seeds = _int_list(sampling.get("seeds", [0]), source, "sampling.seeds")
    if len(seeds) == 1:
        seeds = [seeds[0] + i for i in range(len(prompts))]
    elif len(seeds) != len(prompts):
        raise ConfigError(
            source, "sampling.seeds", f"give 1 seed or {len(prompts)} (one per prompt)"
        )

    steps = capture.get("steps", "all")
    steps = list(range(num_steps)) if steps == "all" else _int_list(steps, source, "capture.steps")
    layers = capture.get("layers", "all")
    layers = None if layers == "all" else tuple(_int_list(layers, source, "capture.layers"))
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise ConfigError(source, "name", "must be a non-empty string")
    try:
        return RunProfile(
            name=name,
            source=model_source,
            adapter=adapter,
            dtype=model.get("dtype", "bfloat16"),
            height=_int(sampling, "height", source, "sampling.height"),
            width=_int(sampling, "width", source, "sampling.width"),
            frames=_int(sampling, "frames", source, "sampling.frames"),
            num_steps=num_steps,
            guidance=float(guidance),
            prompts=prompts,
            seeds=tuple(seeds),
            capture_steps=tuple(steps),
            capture_layers=layers,
            tiles=_tiles(capture, source),
            store=capture.get("store", "per-prompt"),
            scheduler=sampling.get("scheduler"),
            flow_shift=sampling.get("flow_shift"),
            image=image,
        )
    except ConfigError as exc:
        raise ConfigError(source, exc.field, exc.problem) from None
