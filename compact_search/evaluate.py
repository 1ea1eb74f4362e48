"""`compact-search evaluate`: the same prompts and seeds, dense vs compact, side by side.

The model comes from the adapter registry (`models.adapters.load_model`) as a `LoadedModel`.
Each sample (some prompts and one seed) is sampled dense, then once per config with the config
applied; latents are decoded through the pipeline's VAE (`samples.to_videos`). Quality: PSNR and
SSIM of every compact video against its dense one, per video and per frame, LPIPS where its
weights are on this machine (`quality.lpips_status`), and, where the model's plug-in scores
fidelity, that score on both. Speed: end-to-end, per denoising step, text encoding, VAE decoding
and self-attention time, peak GPU memory on CUDA. Previews: one labelled side-by-side video per
prompt (dense left, compact right) as GIF and MP4.

With a `SampleCache`, every finished sample is kept on disk under a key of what decides its
numbers (prompts, seed, steps, guidance, the model's fingerprint; for compact ones the config,
backend and precision too): a second config samples only its compact half, a killed run resumes.

Each config runs at its own `precision` (the config field, "bf16", "fp8" or "int8") unless
`precision` overrides it for all of them; every report names the precision it ran and the kernels
that ran (`runtime.attention.recorded_kernels`: "reference-fp8" is the 8-bit path's CPU
emulation).

With a compile backend (`compact-search evaluate --compile`) the transformers are compiled in
place (`compile_repeated_blocks(fullgraph=True)` where the model names its repeated blocks, else
the whole transformer), each run samples its first sample once untimed first, so that every
graph is compiled (for these shapes) before the timed samples (reported as warm-up seconds), and
self-attention is not timed (a timer would synchronise inside the compiled graph).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compact_search.config import PRECISIONS, CompactConfig, check_precision
from compact_search.errors import UserInputError
from compact_search.models.plugin import LoadedModel
from compact_search.models.wan import AttentionFn, dense_attention
from compact_search.previews import mp4_status, save_gif, save_mp4, side_by_side
from compact_search.profiling.settings import image_sha256
from compact_search.quality import (
    lpips_per_video,
    lpips_status,
    psnr,
    psnr_per_frame,
    ssim,
    ssim_per_frame,
)
from compact_search.runtime.apply import apply
from compact_search.runtime.attention import kernel_precision, recorded_kernels
from compact_search.samples import SampleCache, sample_key, to_videos

__all__ = ["psnr", "ssim", "evaluate_config", "evaluate_configs", "evaluation_prompts"]

REPORT_FORMAT = "compact-search/evaluation"
REPORT_VERSION = 1

# Held-out prompts for the published video models: none is in profiles/prompts-video.txt, so a
# profile of those prompts never saw them. Used when the model offers no held-out prompts.
HELDOUT_VIDEO_PROMPTS = (
    "A red vintage car drives along a coastal road at sunset, the camera follows from the side.",
    "A hummingbird hovers in front of a purple flower, wings blurred, macro shot.",
    "Snow falls over a quiet mountain village at night, warm light in the windows.",
    "A skateboarder does a kickflip in an empty concrete skatepark, low angle.",
    "Time-lapse of clouds rolling over a green valley, shadows sweeping across fields.",
    "A cup of coffee on a wooden table, steam rising, morning light through a window.",
    "A school of silver fish swirls around a coral reef, sunbeams from above.",
    "A paper boat floats down a rain-filled gutter, close-up tracking shot.",
)

CPU_NOTE = (
    "on the CPU, compact attention runs the kernel's PyTorch reference (a gather per kept "
    "block, no fused kernel), which is slower than dense SDPA; the speed figures mean something "
    "on CUDA, where the Triton kernel runs"
)


class AttentionTimer:
    """Accumulates wall time spent inside self-attention (synchronising CUDA around it)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, attention_fn):
        def timed(layer, q, k, v, **kwargs):
            if q.is_cuda:
                torch.cuda.synchronize(q.device)
            start = time.perf_counter()
            out = attention_fn(layer, q, k, v, **kwargs)
            if q.is_cuda:
                torch.cuda.synchronize(q.device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        return timed


@dataclass(frozen=True)
class Sample:
    """Prompts sampled together in one pipeline call, from one seed."""

    prompts: tuple[str, ...]
    seed: int


def plan_samples(prompts: list[str], seeds: list[int] | None, seed: int) -> list[Sample]:
    """`seeds` None: every prompt in one batch from `seed`. Else one sample per prompt: one seed
    each, or one seed s for all (prompt i then uses s + i, as run profiles do)."""
    if seeds is None:
        return [Sample(tuple(prompts), seed)]
    if len(seeds) == 1:
        seeds = [seeds[0] + i for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise UserInputError(
            f"--seeds: give 1 seed or {len(prompts)} (one per prompt), got {len(seeds)}"
        )
    return [Sample((p,), s) for p, s in zip(prompts, seeds, strict=True)]


def evaluation_prompts(model: LoadedModel, run_profile_prompts, count: int, seed: int) -> list[str]:
    """`count` prompts for `evaluate_config` (the demo): the model's held-out prompts drawn from
    `seed` where its plug-in offers them, else the first `count` of the run profile's."""
    if model.heldout_prompts is not None:
        return model.heldout_prompts(count, seed)
    return list(run_profile_prompts)[:count]


def default_prompts(
    model: LoadedModel, run_profile_prompts, count: int, seed: int
) -> tuple[list[str], str]:
    """`count` held-out prompts and where they come from: the model's own held-out prompts drawn
    from `seed` where its plug-in offers them, else `HELDOUT_VIDEO_PROMPTS` less any the run
    profile captured."""
    if model.heldout_prompts is not None:
        return model.heldout_prompts(count, seed), f"the model's held-out prompts (seed {seed})"
    captured = set(run_profile_prompts)
    unseen = [p for p in HELDOUT_VIDEO_PROMPTS if p not in captured]
    if count > len(unseen):
        raise UserInputError(
            f"--prompts {count}: only {len(unseen)} built-in held-out prompts; give --prompts-file"
        )
    return unseen[:count], "compact-search's held-out video prompts (not in the run profile)"


def read_prompts_file(path: Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--prompts-file: no such file: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not prompts:
        raise UserInputError(f"--prompts-file: {path} holds no prompt")
    return prompts


@dataclass(frozen=True)
class PromptResult:
    prompt: str
    psnr_db: float
    ssim: float
    dense_correct: bool | None
    compact_correct: bool | None
    preview: str | None
    seed: int | None = None
    lpips: float | None = None
    psnr_per_frame_db: tuple[float, ...] = ()
    ssim_per_frame: tuple[float, ...] = ()
    preview_mp4: str | None = None


@dataclass
class EvaluationReport:
    """One config against dense. Times are sums over the samples; `dense_timing` and
    `compact_timing` break them down (see `timing_summary`)."""

    prompts: list[PromptResult]
    mean_psnr_db: float
    mean_ssim: float
    dense_fidelity: dict[str, float] | None
    compact_fidelity: dict[str, float] | None
    dense_attention_s: float | None  # None: not timed (compiled)
    compact_attention_s: float | None
    dense_total_s: float
    compact_total_s: float
    mean_density: float
    device: str
    num_steps: int
    dense_steps: int
    extra: dict[str, object] = field(default_factory=dict)
    label: str = "compact"
    mean_lpips: float | None = None
    dense_timing: dict[str, object] = field(default_factory=dict)
    compact_timing: dict[str, object] = field(default_factory=dict)
    precision: str = "bf16"  # the compact run's attention arithmetic
    # The kernels the compact run's sparse steps ran (empty: every sample read from the cache).
    kernels: tuple[str, ...] = ()

    @property
    def ran_precision(self) -> str:
        """The arithmetic the sparse steps ran, from `kernels`: 8 bits asked of inputs outside
        the 8-bit path (a float32 model, block 32, ...) runs the 16-bit kernels after a warning.
        The asked one when every sample came from the cache; "fp8 and bf16" where both ran."""
        if not self.kernels:
            return self.precision
        ran = {kernel_precision(kernel) for kernel in self.kernels}
        return " and ".join(p for p in reversed(PRECISIONS) if p in ran)

    def to_json(self) -> dict:
        out = asdict(self)
        out["prompts"] = [asdict(p) for p in self.prompts]
        return _json_safe(out)


@dataclass
class EvaluationRun:
    """Every config of one evaluate run, with what was sampled; `to_json` is the report file."""

    reports: list[EvaluationReport]
    prompts: list[str]
    prompts_source: str
    samples: list[Sample]
    num_steps: int
    guidance_scale: float
    device: str
    lpips_note: str | None
    preview_note: str | None
    cache: dict[str, object] | None
    settings: dict[str, object] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        """The first config's report at the top level (the keys evaluate wrote before it took
        several configs), then the run's keys and every config under "configs"."""
        return _json_safe(
            {
                **self.reports[0].to_json(),
                "format": REPORT_FORMAT,
                "version": REPORT_VERSION,
                **self.settings,
                "device": self.device,
                "num_steps": self.num_steps,
                "guidance_scale": self.guidance_scale,
                "evaluated_prompts": self.prompts,
                "prompts_source": self.prompts_source,
                "samples": [{"prompts": list(s.prompts), "seed": s.seed} for s in self.samples],
                "lpips": self.lpips_note or "computed (AlexNet)",
                "previews": self.preview_note or "gif and mp4",
                "cache": self.cache,
                "plots": self.plots,
                "configs": [r.to_json() for r in self.reports],
            }
        )


def _json_safe(value):
    """inf/NaN as the strings "inf"/"nan" (JSON has no such numbers), tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _model_device(model: LoadedModel) -> torch.device:
    return next(model.transformers[0].parameters()).device


class _TextEncoderTimer:
    """Wall time inside the pipeline's text encoders (forward hooks on `text_encoder*`)."""

    def __init__(self, pipeline) -> None:
        self.seconds = 0.0
        self.found = False
        self._hooks = []
        for name in ("text_encoder", "text_encoder_2"):
            module = getattr(pipeline, name, None)
            if isinstance(module, torch.nn.Module):
                self.found = True
                self._hooks.append(module.register_forward_pre_hook(self._start))
                self._hooks.append(module.register_forward_hook(self._stop))
        self._started = 0.0

    def _sync(self, module) -> None:
        parameter = next(module.parameters(), None)
        if parameter is not None and parameter.is_cuda:
            torch.cuda.synchronize(parameter.device)

    def _start(self, module, _args) -> None:
        self._sync(module)
        self._started = time.perf_counter()

    def _stop(self, module, _args, _out) -> None:
        self._sync(module)
        self.seconds += time.perf_counter() - self._started

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _sample_once(
    model: LoadedModel,
    sample: Sample,
    *,
    num_steps: int,
    guidance_scale: float,
    attention: AttentionTimer | None,
    on_step: Callable[[int], None] | None,
    on_progress: Callable[[], None] | None,
) -> tuple[torch.Tensor, dict]:
    """Run one sample; its output and timings: total, per step (text encoding taken out), text
    encoding, self-attention (None when not timed), peak GPU memory (None off CUDA)."""
    device = _model_device(model)
    cuda = device.type == "cuda"
    text = _TextEncoderTimer(model.pipeline)
    marks: list[tuple[float, float]] = []  # (time, text-encoding seconds so far) at each step

    def step_hook(step: int) -> None:
        if cuda:
            torch.cuda.synchronize(device)
        marks.append((time.perf_counter(), text.seconds))
        if on_step is not None:
            on_step(step)
        if on_progress is not None and step > 0:
            on_progress()

    attention_before = attention.seconds if attention is not None else 0.0
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        output = model.run(
            list(sample.prompts),
            seed=sample.seed,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            on_step=step_hook,
        )
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        text.remove()
    total = time.perf_counter() - start
    steps = [(t1 - t0) - (x1 - x0) for (t0, x0), (t1, x1) in zip(marks, marks[1:], strict=False)][
        :num_steps
    ]
    timings = {
        "total_s": total,
        "step_s": steps,
        "text_encode_s": text.seconds if text.found else None,
        "attention_s": None if attention is None else attention.seconds - attention_before,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "cached": False,
    }
    return output, timings


def timing_summary(per_sample: list[dict], num_videos: int) -> dict[str, object]:
    """Sums over the samples and per-video / per-step means, with the self-attention share of
    the denoising time (text encoding and VAE decoding excluded)."""

    def total(key: str) -> float | None:
        values = [t.get(key) for t in per_sample]
        return None if any(v is None for v in values) else float(sum(values))

    steps = [s for t in per_sample for s in t["step_s"]]
    denoise = float(sum(steps))
    attention = total("attention_s")
    memory = [t["peak_memory_bytes"] for t in per_sample if t.get("peak_memory_bytes") is not None]
    sampling = total("total_s") or 0.0
    decode = total("decode_s")
    return {
        "total_s": sampling,
        "per_video_s": (sampling + (decode or 0.0)) / num_videos,
        "denoise_s": denoise,
        "per_step_s": denoise / len(steps) if steps else None,
        "text_encode_s": total("text_encode_s"),
        "decode_s": decode,
        "attention_s": attention,
        "attention_share": attention / denoise if attention is not None and denoise else None,
        "peak_memory_bytes": max(memory) if memory else None,
        "cached_samples": sum(bool(t.get("cached")) for t in per_sample),
    }


def _config_fingerprint(config: CompactConfig) -> str:
    canonical = json.dumps(config.to_json(), sort_keys=True, separators=(",", ":"))
    return sample_key(config=canonical)


def evaluate_configs(
    model: LoadedModel,
    configs: list[tuple[str, CompactConfig]],
    samples: list[Sample],
    *,
    num_steps: int,
    guidance_scale: float = 4.0,
    frames: int | None = None,
    out_dir: Path | None = None,
    backend: str = "auto",
    rescale: bool = False,
    compile_backend=None,
    cache: SampleCache | None = None,
    cache_fields: dict | None = None,
    on_phase: Callable[[str, int], Callable[[], None]] | None = None,
    dense_attention_fn: AttentionFn = dense_attention,
    precision: str | None = None,
) -> tuple[list[EvaluationReport], dict[str, object]]:
    """Sample every sample dense and with each (label, config) applied, with the same seeds.

    `model.run` returns videos [B, C, F, H, W] in [0, 1] or latents, which are decoded through
    the pipeline's VAE (`frames`: the pixel frame count). `cache` keeps finished samples under
    keys made of `cache_fields` (what names the model and its sampling size) and each sample's
    own settings. `on_phase(name, steps)` is called before each phase ("dense", then each
    label) with the number of denoising steps it will run and returns a callback run after
    every step (progress bars). `dense_attention_fn` is the reference's self-attention (plain
    SDPA; a benchmark pins cuDNN's). `precision` ("bf16", "fp8" or "int8") runs every config at it;
    None: each at its own. Returns one report per config and the run's notes (lpips, previews,
    cache counts).
    """
    if not configs:
        raise UserInputError("evaluate needs at least one config")
    if precision is not None:
        check_precision(precision, "--precision")
    device = _model_device(model)
    apply_options = dict(backend=backend, rescale=rescale, grid=model.grid, precision=precision)
    # Every config is applied once first, so one that does not fit fails before any sampling.
    for _label, config in configs:
        apply(model.pipeline, config, **apply_options).revert()
    if compile_backend is not None:
        _compile_transformers(model, compile_backend)
    fields = {
        **(cache_fields or {}),
        "device": device.type,
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "compiled": compile_backend is not None and str(compile_backend),
    }
    warmup: dict[str, float] = {}

    def sample_all(name: str, key_fields: dict, install, on_step) -> tuple[list, list]:
        """Every sample under one attention; cached ones are read back."""
        keys = [sample_key(**key_fields, prompts=s.prompts, seed=s.seed) for s in samples]
        found = [cache.get(k) if cache is not None else None for k in keys]
        todo = [i for i, hit in enumerate(found) if hit is None]
        outputs, timings = [None] * len(samples), [None] * len(samples)
        for i, hit in enumerate(found):
            if hit is not None:
                outputs[i], timings[i] = hit[0], {**hit[1], "cached": True}
        if not todo:
            return outputs, timings
        progress = on_phase(name, len(todo) * num_steps) if on_phase is not None else None
        timer = None if compile_backend is not None else AttentionTimer()
        handle = install(timer)
        try:
            run = dict(num_steps=num_steps, guidance_scale=guidance_scale, on_step=on_step)
            if compile_backend is not None:
                start = time.perf_counter()
                _sample_once(model, samples[todo[0]], **run, attention=None, on_progress=None)
                warmup[name] = time.perf_counter() - start
            for i in todo:
                outputs[i], timings[i] = _sample_once(
                    model, samples[i], **run, attention=timer, on_progress=progress
                )
                if cache is not None:
                    cache.put(keys[i], outputs[i], timings[i])
        finally:
            handle()
        return outputs, timings

    def install_dense(timer):
        fn = dense_attention_fn if timer is None else timer.wrap(dense_attention_fn)
        return model.install(fn).revert

    dense_out, dense_timings = sample_all("dense", {**fields, "kind": "dense"}, install_dense, None)
    compact_runs = []
    for label, config in configs:
        runtime = apply(model.pipeline, config, **apply_options)

        def install_compact(timer, runtime=runtime):
            if timer is not None:
                # Each expert's compact attention (a pipeline of two has two handles) through
                # the timer, in the transformer it serves; runtime.revert() undoes all of it.
                for handle in getattr(runtime, "handles", {"": runtime}).values():
                    handle.install_attention(wrap=timer.wrap)
            return runtime.revert

        key_fields = {
            **fields,
            "kind": "compact",
            "config": _config_fingerprint(config),
            "backend": backend,
            "rescale": rescale,
            "precision": runtime.precision,
        }
        try:
            with recorded_kernels() as kernels:
                outputs, timings = sample_all(
                    label,
                    key_fields,
                    install_compact,
                    lambda step, runtime=runtime: runtime.set_step(step, num_steps),
                )
        finally:
            runtime.revert()
        ran = (runtime.precision, tuple(sorted(set(kernels))))
        compact_runs.append((outputs, timings, list(runtime.notes), ran))

    lpips_note = lpips_status()
    preview_note = mp4_status()
    per_config = [
        {"psnr": [], "ssim": [], "psnr_f": [], "ssim_f": [], "lpips": [], "videos": [], "prev": []}
        for _ in configs
    ]
    dense_videos = []
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    def decode_time(start: float) -> float | None:
        """Seconds since `start` decoding latents; None for pipelines that return videos."""
        return None if model.output == "video" else time.perf_counter() - start

    prompt_index = 0
    for s, sample in enumerate(samples):
        start = time.perf_counter()
        dense = to_videos(model, dense_out[s], frames or 0)  # [b, 3, F, H, W]
        dense_timings[s].setdefault("decode_s", decode_time(start))
        dense_videos.append(dense)
        for c, (outputs, timings, _notes, _ran) in enumerate(compact_runs):
            start = time.perf_counter()
            compact = to_videos(model, outputs[s], frames or 0)
            timings[s].setdefault("decode_s", decode_time(start))
            result = per_config[c]
            result["psnr"].append(psnr(compact, dense))
            result["ssim"].append(ssim(compact, dense))
            result["psnr_f"].append(psnr_per_frame(compact, dense))
            result["ssim_f"].append(ssim_per_frame(compact, dense))
            if lpips_note is None:
                result["lpips"].append(lpips_per_video(compact, dense))
            result["videos"].append(compact)
            for b in range(len(sample.prompts)):
                preview = mp4 = None
                if out_dir is not None:
                    stem = f"prompt{prompt_index + b:02d}_dense_vs_{_slug(configs[c][0])}"
                    if len(configs) == 1:
                        stem = f"prompt{prompt_index + b:02d}_dense_vs_compact"
                    scale = max(1, 128 // dense.shape[-2])
                    frames_ = side_by_side(dense[b], compact[b], scale=scale)
                    preview = str(save_gif(frames_, out_dir / f"{stem}.gif"))
                    if preview_note is None:
                        mp4 = str(save_mp4(frames_, out_dir / f"{stem}.mp4"))
                result["prev"].append((preview, mp4))
        prompt_index += len(sample.prompts)

    all_prompts = [p for s in samples for p in s.prompts]
    all_seeds = [s.seed for s in samples for _ in s.prompts]
    dense_all = torch.cat(dense_videos)
    dense_score = None
    if model.score_fidelity is not None:
        dense_score = model.score_fidelity(dense_all, all_prompts)
    dense_summary = timing_summary(dense_timings, len(all_prompts))
    reports = []
    for c, (label, config) in enumerate(configs):
        result, (_outputs, timings, notes, (run_precision, kernels)) = (
            per_config[c],
            compact_runs[c],
        )
        psnrs, ssims = torch.cat(result["psnr"]), torch.cat(result["ssim"])
        psnr_f, ssim_f = torch.cat(result["psnr_f"]), torch.cat(result["ssim_f"])
        lpips_values = torch.cat(result["lpips"]) if result["lpips"] else None
        dense_hits = compact_hits = [None] * len(all_prompts)
        dense_fidelity = compact_fidelity = None
        if dense_score is not None:
            compact_score = model.score_fidelity(torch.cat(result["videos"]), all_prompts)
            if compact_score is not None:
                dense_fidelity, compact_fidelity = dense_score.scores, compact_score.scores
                dense_hits, compact_hits = dense_score.correct, compact_score.correct
        rows = [
            PromptResult(
                prompt,
                float(psnrs[i]),
                float(ssims[i]),
                dense_hits[i],
                compact_hits[i],
                result["prev"][i][0],
                seed=all_seeds[i],
                lpips=None if lpips_values is None else float(lpips_values[i]),
                psnr_per_frame_db=tuple(float(v) for v in psnr_f[i]),
                ssim_per_frame=tuple(float(v) for v in ssim_f[i]),
                preview_mp4=result["prev"][i][1],
            )
            for i, prompt in enumerate(all_prompts)
        ]
        finite = psnrs[torch.isfinite(psnrs)]
        compact_summary = timing_summary(timings, len(all_prompts))
        speedup = None
        if compact_summary["per_video_s"]:
            speedup = dense_summary["per_video_s"] / compact_summary["per_video_s"]
        extra: dict[str, object] = {"speedup": speedup}
        run_notes = list(notes) + ([CPU_NOTE] if device.type == "cpu" else [])
        if run_notes:
            extra["notes"] = run_notes
        if compile_backend is not None:
            extra |= {"compiled": str(compile_backend), "warmup_s": dict(warmup)}
        reports.append(
            EvaluationReport(
                prompts=rows,
                mean_psnr_db=float(finite.mean()) if finite.numel() else math.inf,
                mean_ssim=float(ssims.mean()),
                dense_fidelity=dense_fidelity,
                compact_fidelity=compact_fidelity,
                dense_attention_s=dense_summary["attention_s"],
                compact_attention_s=compact_summary["attention_s"],
                dense_total_s=dense_summary["total_s"],
                compact_total_s=compact_summary["total_s"],
                mean_density=config.summary()["mean_density"],
                device=str(device),
                num_steps=num_steps,
                dense_steps=config.schedule.dense_steps,
                extra=extra,
                label=label,
                mean_lpips=None if lpips_values is None else float(lpips_values.mean()),
                dense_timing=dense_summary,
                compact_timing=compact_summary,
                precision=run_precision,
                kernels=kernels,
            )
        )
    run_notes = {
        "lpips": lpips_note,
        "previews": preview_note,
        "cache": None
        if cache is None
        else {"folder": str(cache.folder), "hits": cache.hits, "misses": cache.misses},
    }
    return reports, run_notes


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)


def evaluate_config(
    model: LoadedModel,
    config: CompactConfig,
    prompts: list[str],
    *,
    seed: int = 0,
    num_steps: int | None = None,
    guidance_scale: float = 4.0,
    out_dir: Path | None = None,
    backend: str = "auto",
    rescale: bool = False,
    compile_backend=None,
    precision: str | None = None,
) -> EvaluationReport:
    """Sample `prompts` in one batch dense, then with `config` applied, from `seed`; compare.

    `model.run` returns videos [B, C, F, H, W] in [0, 1], or latents that the pipeline's VAE
    decodes (diffusers folders: the run profile's frame count is then needed, so use
    `evaluate_configs`). `rescale` adapts a config made for another token grid.
    `compile_backend` (a torch.compile backend: a name such as "inductor", or a callable)
    compiles the transformers in place and warms both runs up first; None samples eagerly.
    `precision` overrides the config's (None: the config's own).
    """
    if model.output != "video":
        raise UserInputError(
            f"evaluate compares videos; the {model.adapter.name} pipeline loaded here returns "
            f"{model.output}s (evaluate_configs decodes them, given the run profile's frames)"
        )
    reports, _notes = evaluate_configs(
        model,
        [("compact", config)],
        [Sample(tuple(prompts), seed)],
        num_steps=num_steps or config.schedule.num_steps,
        guidance_scale=guidance_scale,
        out_dir=out_dir,
        backend=backend,
        rescale=rescale,
        compile_backend=compile_backend,
        precision=precision,
    )
    return reports[0]


def plot_psnr_per_frame(reports: list[EvaluationReport], path: Path) -> Path:
    """One line per config: the PSNR of each frame against dense, averaged over the videos
    (identical frames, inf dB, are left out of the mean; a frame identical in every video is
    drawn at the top of the axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    finite_max = 0.0
    lines = []
    for report in reports:
        per_frame = torch.tensor([p.psnr_per_frame_db for p in report.prompts])  # [V, F]
        finite = torch.where(torch.isfinite(per_frame), per_frame, torch.nan)
        mean = torch.nanmean(finite, dim=0)
        if torch.isfinite(mean).any():
            finite_max = max(finite_max, float(mean[torch.isfinite(mean)].max()))
        lines.append((report.label, mean))
    top = finite_max + 5 if finite_max else 100.0
    for label, mean in lines:
        axis.plot(torch.nan_to_num(mean, nan=top).tolist(), marker="o", label=label)
    axis.set_xlabel("frame")
    axis.set_ylabel("PSNR vs dense (dB)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _compile_transformers(model: LoadedModel, backend) -> None:
    """Compile every transformer of the model in place, with no graph break allowed."""
    for transformer in model.transformers:
        if getattr(transformer, "_repeated_blocks", None):
            transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
        else:
            transformer.compile(fullgraph=True, backend=backend)


@dataclass(frozen=True)
class EvaluateOptions:
    """What `compact-search evaluate` passes on; None: the run profile's value."""

    prompt_count: int = 8
    prompts_file: Path | None = None
    seed: int = 1234
    seeds: tuple[int, ...] | None = None
    num_steps: int | None = None
    guidance_scale: float | None = None
    backend: str = "auto"
    rescale: bool = False
    compile_backend: str | None = None
    cache_dir: Path | None = None  # default: OUT/cache
    precision: str | None = None  # None: each config's own


def _labels(paths: list[Path]) -> list[str]:
    """A short label per config: its file stem, made unique with its position."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}-{i + 1}" for i, s in enumerate(stems)]


def run_evaluation(
    run_profile,
    config_paths: list[Path],
    out_dir: Path,
    device: torch.device,
    options: EvaluateOptions = EvaluateOptions(),
    *,
    on_phase: Callable[[str, int], Callable[[], None]] | None = None,
) -> EvaluationRun:
    """`compact-search evaluate`: load the run profile's model, sample dense and every config
    from the same prompts and seeds, and write `out_dir/evaluation.json`, the per-frame PSNR
    plot and the previews (docs/real-models.md, "Evaluate", lists the report's keys)."""
    from compact_search.config import load_config
    from compact_search.io import atomic_write_json
    from compact_search.models.adapters import builtin_sources, load_model, source_identity
    from compact_search.runtime.attention import BACKENDS

    if options.prompt_count < 1:
        raise UserInputError(f"--prompts must be >= 1, got {options.prompt_count}")
    if options.backend not in BACKENDS:
        raise UserInputError(
            f"--backend must be one of {', '.join(BACKENDS)}, got {options.backend!r}"
        )
    if options.precision is not None:
        check_precision(options.precision, "--precision")
    configs = [load_config(path) for path in config_paths]
    if run_profile.source not in builtin_sources() and not Path(run_profile.source).is_dir():
        raise UserInputError(
            f"profile {run_profile.name!r}: model.source {run_profile.source} does not exist "
            "(moved or deleted?)"
        )
    model = load_model(run_profile, device)
    if hasattr(model.pipeline, "set_progress_bar_config"):
        model.pipeline.set_progress_bar_config(disable=True)  # evaluate draws its own
    if options.prompts_file is not None:
        prompts = read_prompts_file(options.prompts_file)
        source = f"file {options.prompts_file}"
    else:
        prompts, source = default_prompts(
            model, run_profile.prompts, options.prompt_count, options.seed
        )
    seeds = list(options.seeds) if options.seeds is not None else None
    samples = plan_samples(prompts, seeds, options.seed)
    num_steps = options.num_steps or run_profile.num_steps
    guidance = (
        options.guidance_scale if options.guidance_scale is not None else run_profile.guidance
    )
    cache = SampleCache(options.cache_dir or out_dir / "cache")
    cache_fields = {
        "model": source_identity(run_profile.source),
        "adapter": run_profile.adapter,
        "dtype": run_profile.dtype,
        "size": [run_profile.frames, run_profile.height, run_profile.width],
        "torch": torch.__version__,
    }
    if run_profile.image is not None:  # an image-to-video sample is its picture's too
        cache_fields["image"] = image_sha256(run_profile.image, f"profile {run_profile.name!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    reports, notes = evaluate_configs(
        model,
        list(zip(_labels(config_paths), configs, strict=True)),
        samples,
        num_steps=num_steps,
        guidance_scale=guidance,
        frames=run_profile.frames,
        out_dir=out_dir / "previews",
        backend=options.backend,
        rescale=options.rescale,
        compile_backend=options.compile_backend,
        cache=cache,
        cache_fields=cache_fields,
        on_phase=on_phase,
        precision=options.precision,
    )
    for report, path in zip(reports, config_paths, strict=True):
        report.extra["config"] = str(path)
    run = EvaluationRun(
        reports=reports,
        prompts=prompts,
        prompts_source=source,
        samples=samples,
        num_steps=num_steps,
        guidance_scale=guidance,
        device=str(device),
        lpips_note=notes["lpips"],
        preview_note=notes["previews"],
        cache=notes["cache"],
        settings={
            "profile": run_profile.name,
            "model": run_profile.source,
            "adapter": run_profile.adapter,
            "size": {
                "frames": run_profile.frames,
                "height": run_profile.height,
                "width": run_profile.width,
            },
        },
        plots=[str(plot_psnr_per_frame(reports, out_dir / "psnr_per_frame.png"))],
    )
    atomic_write_json(out_dir / "evaluation.json", run.to_json())
    return run
