"""`compact-search profile`: run a run profile, record tile mass at the chosen steps, stream it
to disk as a capture.

Flow for one process (rank r of w; a plain run is rank 0 of 1):

1. Open the capture folder (`store.py`); a folder from an interrupted run with the same run
   profile resumes, other settings are refused.
2. Load the model through the adapter registry (`models.adapters.load_model`) and install
   `TileMassRecorder` into its transformers. The recorder returns the model's own dense
   attention, so sampling is unchanged; at captured steps it also computes the tile mass of every
   captured layer for every candidate tile.
3. For each of this rank's prompts (prompt i belongs to rank i mod w): read which (step, layer)
   units already cover it, sample only as far as the last missing step (the rest of the
   trajectory is never needed), and after each captured step fold the prompt's tile masses into
   the rank's unit files, one atomic rename per (step, layer).
4. Rank 0 waits until every unit covers every prompt, merges the parts and writes profile.json
   with the metadata and the fingerprint (run profile + weights + content).

A pipeline of several experts (Wan2.2) runs each step on one of its transformers: the recorder is
installed into all of them, every captured step is recorded from the expert that runs it (a
forward pre-hook checks that it is the one the model's `step_experts` names), and profile.json
lists the expert of every step (`step_experts`), so that the search can take each expert's steps
apart (`Capture.expert_view`).

With classifier-free guidance the tile mass of a step is the average over every transformer call
of that step (conditional and unconditional, batched or not): one pattern serves both.

MM-DiT prefix (text) tokens are never sparsified, so the tile mass covers video queries and video
keys only, with each query's probabilities renormalised over video keys: the softmax of the video
keys alone. Recall measured this way is a lower bound on the share of the full attention kept.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from compact_search._version import __version__
from compact_search.errors import UserInputError
from compact_search.geometry import Grid, TileShape
from compact_search.models.adapters import load_model, source_identity
from compact_search.models.plugin import LoadedModel
from compact_search.profiling.dense import dense_attention_with_log_sum_exp
from compact_search.profiling.settings import RunProfile, load_run_profile, resolve_run_profile
from compact_search.profiling.store import CaptureStore, read_unit, unit_name
from compact_search.profiling.tile_mass import multi_tile_mass

# What profile.json of a capture declares (the folder format predates the word "capture").
CAPTURE_FORMAT = "compact-search/profile"
CAPTURE_VERSION = 1
# How often rank 0 looks for the other ranks' units while waiting to merge, in seconds.
MERGE_POLL_S = 2.0
# Rank 0 gives up when no rank has added a unit for this long (a dead rank, e.g. one launched
# separately from a job scheduler; torchrun itself stops every rank when one fails).
MERGE_STALL_S = 3600.0


class _SamplingDone(Exception):
    """Raised from the step callback once a prompt's last missing step has been captured."""


class TileMassRecorder:
    """attention_fn for the adapters: dense attention out, tile mass of captured layers recorded.

    `start_step(layers)` arms it for the layers to capture in the coming step; `take()` returns
    {layer: {tile: [H, nt, nt] fp32}} averaged over the step's calls and disarms it.
    """

    def __init__(self, grid: Grid, tiles: tuple[TileShape, ...], prefix_at: str):
        self.grid = grid
        self.tiles = tiles
        self.prefix_at = prefix_at
        self.layers: frozenset[int] = frozenset()
        self.step: int | None = None  # the denoising step the next calls belong to
        self.prefix_tokens = 0
        self._sums: dict[int, dict[TileShape, torch.Tensor]] = {}
        self._weights: dict[int, int] = {}

    def start_step(self, layers: frozenset[int]) -> None:
        self.layers = layers
        self._sums, self._weights = {}, {}

    def take(self) -> dict[int, dict[TileShape, torch.Tensor]]:
        means = {
            layer: {tile: s / self._weights[layer] for tile, s in sums.items()}
            for layer, sums in self._sums.items()
        }
        self.start_step(frozenset())
        return means

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if layer not in self.layers:
            return F.scaled_dot_product_attention(q, k, v)
        batch, _, length, _ = q.shape
        video = self.grid.num_tokens
        prefix = length - video
        if prefix < 0:
            raise UserInputError(
                f"layer {layer} attends over {length} tokens, fewer than grid {self.grid} holds"
            )
        self.prefix_tokens = max(self.prefix_tokens, prefix)
        out, log_sum_exp = dense_attention_with_log_sum_exp(q, k, v)
        if prefix:
            # Renormalised over video keys: the video-only softmax; its normaliser is computed
            # by the tile mass itself (the dense one includes the prefix keys).
            part = slice(prefix, None) if self.prefix_at == "start" else slice(0, video)
            q, k, log_sum_exp = q[:, :, part], k[:, :, part], None
        masses = multi_tile_mass(q, k, self.grid, self.tiles, log_sum_exp=log_sum_exp)
        sums = self._sums.setdefault(layer, {})
        for tile, mass in masses.items():
            weighted = mass * batch  # [H, nt, nt]
            sums[tile] = sums[tile] + weighted if tile in sums else weighted
        self._weights[layer] = self._weights.get(layer, 0) + batch
        return out


@dataclass(frozen=True)
class CaptureResult:
    """What a profile run did, for the CLI to render."""

    path: Path
    complete: bool
    resumed: bool
    captured_units: int
    skipped_units: int
    seconds: float
    metadata: dict | None
    repaired: tuple[Path, ...] = ()  # damaged units found on resume, deleted and recomputed


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserInputError(f"--device must be auto, cpu or cuda[:N], got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda asked for, but no CUDA device is available")
    return resolved


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world:
        raise UserInputError(f"RANK {rank} outside WORLD_SIZE {world}")
    return rank, world


def _versions() -> dict[str, str]:
    import diffusers

    return {
        "compact_search": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def _metadata(settings: RunProfile, model_info: dict, layers: list[int], fingerprint: str) -> dict:
    experts = (
        {} if model_info["step_experts"] is None else {"step_experts": model_info["step_experts"]}
    )
    return {
        **experts,
        "format": CAPTURE_FORMAT,
        "version": CAPTURE_VERSION,
        "name": settings.name,
        "model": settings.source,
        "adapter": settings.adapter,
        "grid": model_info["grid"],
        "prefix_tokens": model_info["prefix_tokens"],
        "prefix_at": model_info["prefix_at"],
        "num_layers": model_info["num_layers"],
        "num_heads": model_info["num_heads"],
        "head_dim": model_info["head_dim"],
        "num_steps": settings.num_steps,
        "steps": list(settings.capture_steps),
        "layers": layers,
        "prompts": list(settings.prompts),
        "seeds": list(settings.seeds),
        "tiles": [list(t.as_tuple()) for t in settings.tiles],
        "store": settings.store,
        "settings": settings.to_json(),
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
    }


def run_profile(
    settings: RunProfile,
    out: str | Path,
    *,
    device: str = "auto",
    restart: bool = False,
    rank: int | None = None,
    world: int | None = None,
    progress: bool = True,
    on_unit: Callable[[int, int, int], None] | None = None,
) -> CaptureResult:
    """Run (or resume) a run profile into the capture folder `out`. See the module doc.

    `rank`/`world` default to torchrun's environment. `on_unit(prompt, step, layer)` is called
    after each unit write (tests use it to stop a run at a chosen point).
    """
    started = time.perf_counter()
    if rank is None or world is None:
        rank, world = distributed_rank()
    if restart and world > 1:
        # Rank 0 would clear the folder while other ranks read it: delete it before launching.
        raise UserInputError("--restart is not supported under torchrun; remove the folder instead")
    store = CaptureStore(out)
    # Settings and the weights they point at: resuming over other weights (a retrained built-in
    # model, a replaced checkpoint) is refused like resuming over other settings.
    settings_fingerprint = hashlib.sha256(
        f"{settings.fingerprint()}:{source_identity(settings.source)}".encode()
    ).hexdigest()
    repaired: list[Path] = []
    if not restart and store.check_resumable(settings_fingerprint):
        if rank == 0:  # a truncated unit (a full disk, a cut copy) is computed again
            repaired = store.drop_damaged_units()
        if store.is_complete():
            metadata = _read_metadata(store)
            return CaptureResult(store.root, True, True, 0, 0, 0.0, metadata)

    # The model refuses sizes it cannot sample before anything is written: a refused run leaves
    # no settings.json that would refuse the corrected rerun.
    model = load_model(settings, _resolve_device(device))
    layers = list(settings.capture_layers or range(model.num_layers))
    if layers[-1] >= model.num_layers:
        raise UserInputError(
            f"capture.layers names layer {layers[-1]}; the model has {model.num_layers}"
        )
    resumed = store.begin(settings.to_json(), settings_fingerprint, restart=restart)
    steps = list(settings.capture_steps)
    mine = [p for p in range(len(settings.prompts)) if p % world == rank]
    covered = store.covered(steps, layers)
    missing = {
        p: {s: frozenset(l for l in layers if p not in covered[(s, l)]) for s in steps}
        for p in mine
    }
    for p in mine:
        missing[p] = {s: ls for s, ls in missing[p].items() if ls}
    total_units = len(mine) * len(steps) * len(layers)
    todo_units = sum(len(ls) for per_step in missing.values() for ls in per_step.values())

    recorder = TileMassRecorder(model.grid, settings.tiles, model.adapter.prefix_at)
    step_experts = model.expert_of_steps(settings.num_steps)
    if hasattr(model.pipeline, "set_progress_bar_config"):
        model.pipeline.set_progress_bar_config(disable=True)  # one progress display: ours
    captured = 0
    with _progress(progress, settings.name) as bar:
        task = bar.add_task("capturing", total=todo_units)
        with torch.no_grad(), model.install(recorder), _expert_check(model, recorder, step_experts):
            for prompt in mine:
                if not missing[prompt]:
                    continue

                def unit_written(step: int, layer: int, prompt: int = prompt) -> None:
                    bar.advance(task)
                    if on_unit is not None:
                        on_unit(prompt, step, layer)

                captured += _capture_prompt(
                    settings, model, store, recorder, rank, prompt, missing[prompt], unit_written
                )
    model_info = {
        "step_experts": None if step_experts is None else list(step_experts),
        "grid": list(model.grid.as_tuple()),
        "prefix_tokens": recorder.prefix_tokens,
        "prefix_at": model.adapter.prefix_at,
        "num_layers": model.num_layers,
        "num_heads": model.num_heads,
        "head_dim": model.head_dim,
    }
    if rank != 0:
        return CaptureResult(store.root, False, resumed, captured, total_units - todo_units,
                             time.perf_counter() - started, None, tuple(repaired))  # fmt: skip
    _wait_for_ranks(store, steps, layers, len(settings.prompts), world)
    store.merge(steps, layers, len(settings.prompts), settings.store)
    model_info["prefix_tokens"] = _merged_prefix_tokens(store, steps, layers)
    fingerprint = _fingerprint(settings_fingerprint, store.content_hash(steps, layers))
    metadata = _metadata(settings, model_info, layers, fingerprint)
    store.write_metadata(metadata)
    return CaptureResult(store.root, True, resumed, captured, total_units - todo_units,
                         time.perf_counter() - started, metadata, tuple(repaired))  # fmt: skip


def _capture_prompt(
    settings: RunProfile,
    model: LoadedModel,
    store: CaptureStore,
    recorder: TileMassRecorder,
    rank: int,
    prompt: int,
    missing: dict[int, frozenset[int]],
    after_unit: Callable[[int, int], None],
) -> int:
    """Sample one prompt up to its last missing step, writing each captured step's units."""
    last = max(missing)
    state = {"step": None, "written": 0}

    def flush() -> None:
        step = state["step"]
        if step is None or step not in missing:
            return
        for layer, masses in sorted(recorder.take().items()):
            store.update_part(
                rank, step, layer, prompt, masses, settings.store, recorder.prefix_tokens
            )
            state["written"] += 1
            after_unit(step, layer)

    def on_step(step: int) -> None:
        flush()
        if step > last:
            raise _SamplingDone
        state["step"] = recorder.step = step
        recorder.start_step(missing.get(step, frozenset()))

    with contextlib.suppress(_SamplingDone):
        model.run(
            [settings.prompts[prompt]],
            seed=settings.seeds[prompt],
            num_steps=settings.num_steps,
            guidance_scale=settings.guidance,
            on_step=on_step,
        )
    return state["written"]


@contextlib.contextmanager
def _expert_check(
    model: LoadedModel, recorder: TileMassRecorder, step_experts: tuple[str, ...] | None
):
    """While sampling: fail in one line when a step runs on another expert than `step_experts`
    names (its tile mass would be filed under the wrong expert); None checks nothing."""
    hooks = []

    def before(name: str):
        def hook(_module, _args) -> None:
            step = recorder.step
            if step is not None and step < len(step_experts) and step_experts[step] != name:
                raise UserInputError(
                    f"step {step} ran on {name}, but the model says {step_experts[step]} runs it"
                )

        return hook

    if step_experts is not None:
        for name, transformer in zip(model.expert_names, model.transformers, strict=True):
            hooks.append(transformer.register_forward_pre_hook(before(name)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _wait_for_ranks(store: CaptureStore, steps, layers, num_prompts: int, world: int) -> None:
    """Rank 0 waits until the other ranks' units cover every prompt (file-based, no NCCL)."""
    everything = set(range(num_prompts))
    progress, last_change = -1, time.monotonic()
    while True:
        covered = store.covered(steps, layers)
        if all(prompts >= everything for prompts in covered.values()):
            return
        if world == 1:
            raise UserInputError(f"{store.root}: capture finished with prompts missing")
        done = sum(len(prompts) for prompts in covered.values())
        if done != progress:
            progress, last_change = done, time.monotonic()
        elif time.monotonic() - last_change > MERGE_STALL_S:
            missing = sorted(everything - set.intersection(*covered.values()))
            raise UserInputError(
                f"{store.root}: no rank wrote a unit for {MERGE_STALL_S:.0f} s; prompts "
                f"{missing} are incomplete (is a rank dead? rerun the same command to resume)"
            )
        time.sleep(MERGE_POLL_S)


def _merged_prefix_tokens(store: CaptureStore, steps, layers) -> int:
    return read_unit(store.merged_dir / unit_name(steps[0], layers[0])).prefix_tokens


def _fingerprint(settings_fingerprint: str, content_hash: str) -> str:
    return hashlib.sha256(f"{settings_fingerprint}:{content_hash}".encode()).hexdigest()[:32]


def _read_metadata(store: CaptureStore) -> dict:
    try:
        return json.loads(store.metadata_path.read_text())
    except ValueError:
        raise UserInputError(f"{store.metadata_path}: corrupt profile metadata") from None


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args) -> None:
        return None


class _PlainProgress(_NoProgress):
    """Without a terminal (a log file, CI): a plain line every tenth of the work."""

    def __init__(self, name: str):
        self.name = name
        self.total = self.done = 0

    def add_task(self, description: str, total: int = 0, **kwargs) -> int:
        self.total = total
        print(f"profile {self.name}: {total} layer-steps to capture", flush=True)
        return 0

    def advance(self, *args) -> None:
        self.done += 1
        every = max(1, self.total // 10)
        if self.done % every == 0 or self.done == self.total:
            print(f"profile {self.name}: {self.done} of {self.total} layer-steps", flush=True)


def _progress(enabled: bool, name: str):
    if not enabled:
        return _NoProgress()
    import sys

    if not sys.stdout.isatty():
        return _PlainProgress(name)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    return Progress(
        f"[bold]profile {name}[/]",
        BarColumn(),
        MofNCompleteColumn(),
        "layer-steps",
        TimeRemainingColumn(),
        transient=False,
    )


def profile_from_file(
    profile: str | Path,
    out: str | Path | None = None,
    *,
    device: str = "auto",
    restart: bool = False,
    progress: bool = True,
) -> CaptureResult:
    """The CLI's entry: resolve and parse a run profile, then run it into the capture folder
    `out` (default runs/<name>/profile)."""
    settings = load_run_profile(resolve_run_profile(profile))
    out = Path(out) if out is not None else Path("runs") / settings.name / "profile"
    return run_profile(settings, out, device=device, restart=restart, progress=progress)
