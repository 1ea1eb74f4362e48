"""`compact-search evaluate`: the same prompts and seeds, dense vs compact, side by side.

The model comes from the adapter registry (`models.adapters.load_model`) as a `LoadedModel`
whose pipeline returns videos. Quality: PSNR and SSIM of the compact videos against the dense
ones, and, where the model's plug-in scores fidelity, that score on both. Speed: self-attention
time and end-to-end sampling time on this device. Previews: one GIF per prompt, dense left,
compact right.

With a compile backend (`compact-search evaluate --compile`) the transformers are compiled in
place (`compile_repeated_blocks(fullgraph=True)` where the model names its repeated blocks, else
the whole transformer), both runs sample the same prompts once untimed first, so that every
graph is compiled (for these shapes) before the timed run (reported as warm-up seconds), and
self-attention is not timed (a timer would synchronise inside the compiled graph).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from compact_search.config import CompactConfig
from compact_search.errors import UserInputError
from compact_search.models.plugin import LoadedModel
from compact_search.models.wan import dense_attention
from compact_search.previews import save_gif
from compact_search.runtime.apply import apply


def psnr(test: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-video PSNR in dB for videos [B, C, F, H, W] in [0, 1]; inf where identical."""
    mse = (test.float() - reference.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()  # [size, size]


def ssim(test: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-video SSIM (Gaussian 7x7 window, sigma 1.5, per frame and channel, then averaged).

    Videos [B, C, F, H, W] in [0, 1]; constants C1 = 0.01^2, C2 = 0.03^2 for dynamic range 1.
    """
    b, c, f, h, w = test.shape
    x = test.float().permute(0, 2, 1, 3, 4).reshape(b * f * c, 1, h, w)
    y = reference.float().permute(0, 2, 1, 3, 4).reshape(b * f * c, 1, h, w)
    window = _gaussian_window().to(x.device)[None, None]  # [1, 1, 7, 7]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)  # valid convolution: no padding artefacts at borders

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return index.reshape(b, f * c, -1).mean(dim=(1, 2))


class AttentionTimer:
    """Accumulates wall time spent inside self-attention (synchronising CUDA around it)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, attention_fn):
        def timed(layer, q, k, v):
            if q.is_cuda:
                torch.cuda.synchronize(q.device)
            start = time.perf_counter()
            out = attention_fn(layer, q, k, v)
            if q.is_cuda:
                torch.cuda.synchronize(q.device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        return timed


@dataclass(frozen=True)
class PromptResult:
    prompt: str
    psnr_db: float
    ssim: float
    dense_correct: bool | None
    compact_correct: bool | None
    preview: str | None


@dataclass
class EvaluationReport:
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

    def to_json(self) -> dict:
        out = asdict(self)
        out["prompts"] = [asdict(p) for p in self.prompts]
        return out


def evaluation_prompts(model: LoadedModel, run_profile_prompts, count: int, seed: int) -> list[str]:
    """`count` prompts to evaluate on: the model's held-out prompts drawn from `seed` where its
    plug-in offers them, else the first `count` of the run profile's."""
    if model.heldout_prompts is not None:
        return model.heldout_prompts(count, seed)
    return list(run_profile_prompts)[:count]


def _timed_run(model: LoadedModel, prompts, *, seed, num_steps, guidance_scale, on_step):
    cuda = next(model.transformers[0].parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    videos = model.run(
        prompts, seed=seed, num_steps=num_steps, guidance_scale=guidance_scale, on_step=on_step
    )
    if cuda:
        torch.cuda.synchronize()
    return videos, time.perf_counter() - start


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
) -> EvaluationReport:
    """Sample `prompts` dense, then with `config` applied, with the same seed; compare.

    `model.run` must return videos [B, C, F, H, W] in [0, 1] (`model.output == "video"`). Where
    the model scores fidelity (`model.score_fidelity`), both runs are scored. `rescale` adapts a
    config made for another token grid (`compact_search.apply(..., rescale=True)`).
    `compile_backend` (a torch.compile backend: a name such as "inductor", or a callable)
    compiles the transformers in place and warms both runs up first (see the module doc); None
    samples eagerly.
    """
    if model.output != "video":
        raise UserInputError(
            f"evaluate compares videos; the {model.adapter.name} pipeline loaded here returns "
            f"{model.output}s"
        )
    num_steps = num_steps or config.schedule.num_steps
    sampling = {"seed": seed, "num_steps": num_steps, "guidance_scale": guidance_scale}

    # Applied first, so a config that does not fit fails before any sampling; its attention
    # is swapped for timed dense attention, then for its own under a timer (compiled: untimed,
    # and its own processors, whose per-layer tables keep one graph per step bucket).
    runtime = apply(model.pipeline, config, backend=backend, rescale=rescale)
    dense_timer, compact_timer = AttentionTimer(), AttentionTimer()
    warmup: dict[str, float] = {}

    def run(name: str, on_step):
        if compile_backend is not None:
            start = time.perf_counter()
            _timed_run(model, prompts, **sampling, on_step=on_step)  # same shapes: no recompile
            warmup[name] = time.perf_counter() - start
        return _timed_run(model, prompts, **sampling, on_step=on_step)

    try:
        if compile_backend is not None:
            _compile_transformers(model, compile_backend)
        runtime._attention_handle.revert()
        dense_fn = dense_attention if compile_backend else dense_timer.wrap(dense_attention)
        runtime._attention_handle = model.install(dense_fn)
        dense, dense_total = run("dense", None)
        runtime._attention_handle.revert()
        if compile_backend is not None:
            runtime.install_attention()
        else:
            runtime._attention_handle = model.install(compact_timer.wrap(runtime.attention))
        compact, compact_total = run("compact", lambda step: runtime.set_step(step, num_steps))
    finally:
        runtime.revert()

    psnrs, ssims = psnr(compact, dense), ssim(compact, dense)
    dense_hits = compact_hits = [None] * len(prompts)
    dense_fidelity = compact_fidelity = None
    if model.score_fidelity is not None:
        dense_score = model.score_fidelity(dense, prompts)
        compact_score = model.score_fidelity(compact, prompts)
        if dense_score is not None and compact_score is not None:
            dense_fidelity, compact_fidelity = dense_score.scores, compact_score.scores
            dense_hits, compact_hits = dense_score.correct, compact_score.correct

    previews = [None] * len(prompts)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        gap = torch.ones_like(dense[0][..., :2])  # a white 2-pixel divider
        for i in range(len(prompts)):
            pair = torch.cat([dense[i], gap, compact[i]], dim=-1)  # [C, F, H, 2W + 2]
            previews[i] = str(save_gif(pair, out_dir / f"prompt{i:02d}_dense_vs_compact.gif"))

    rows = [
        PromptResult(
            p, float(psnrs[i]), float(ssims[i]), dense_hits[i], compact_hits[i], previews[i]
        )
        for i, p in enumerate(prompts)
    ]
    finite = psnrs[torch.isfinite(psnrs)]
    return EvaluationReport(
        prompts=rows,
        mean_psnr_db=float(finite.mean()) if finite.numel() else math.inf,
        mean_ssim=float(ssims.mean()),
        dense_fidelity=dense_fidelity,
        compact_fidelity=compact_fidelity,
        dense_attention_s=None if compile_backend else dense_timer.seconds,
        compact_attention_s=None if compile_backend else compact_timer.seconds,
        dense_total_s=dense_total,
        compact_total_s=compact_total,
        mean_density=config.summary()["mean_density"],
        device=str(next(model.transformers[0].parameters()).device),
        num_steps=num_steps,
        dense_steps=config.schedule.dense_steps,
        extra={
            **({"notes": list(runtime.notes)} if runtime.notes else {}),
            **({"compiled": compile_backend, "warmup_s": warmup} if compile_backend else {}),
        },
    )


def _compile_transformers(model: LoadedModel, backend: str) -> None:
    """Compile every transformer of the model in place, with no graph break allowed."""
    for transformer in model.transformers:
        if getattr(transformer, "_repeated_blocks", None):
            transformer.compile_repeated_blocks(fullgraph=True, backend=backend)
        else:
            transformer.compile(fullgraph=True, backend=backend)
