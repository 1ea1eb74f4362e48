"""Flow-matching training of the tiny video DiT and its text encoder, from a fixed seed.

Every step draws a fresh batch of procedural videos (:mod:`.data`, training split only), mixes
them with noise at logit-normal times, and regresses the velocity ``noise - clean`` with MSE.
One prompt in ten is replaced by the empty prompt so the sampler can use classifier-free
guidance. An exponential moving average (EMA) of the weights is what gets saved.

A run can stop on a step count or a wall-clock budget and write an fp32 EMA checkpoint in
shards of under 16 MB (the device tool returns files up to that size); ``resume_from`` starts a
new run from such a checkpoint, with the EMA weights as the starting weights and a fresh
optimizer.

Data-parallel training: launched by ``torchrun`` (``WORLD_SIZE`` > 1), every rank draws its own
batches (seeded by seed, step and rank), gradients are averaged across ranks each step, and rank
0 alone logs and writes files; ``batch_size`` is per rank.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from compact_search.models.tiny.data import render_scenes, sample_scene_specs
from compact_search.models.tiny.pipeline import (
    TinyModelConfig,
    TinyVideoPipeline,
    build_models,
    save_tiny_model,
    shift_times,
)

CHECKPOINT_SHARD_BYTES = 14 * 1024 * 1024
CHECKPOINT_STATE_FILE = "checkpoint.json"
DATA_RECIPE = (
    "procedural 8x32x32 RGB videos from compact_search.models.tiny.data.sample_scene_specs "
    "(training split: held-out colour/shape/direction triples never shown), fresh every step"
)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    seed: int = 0
    steps: int = 8000
    batch_size: int = 64
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1
    # Shift of the logit-normal training times towards t = 1 (see pipeline.shift_times).
    time_shift: float = 3.0  # the shipped recipe; 1 = plain logit-normal
    max_seconds: float | None = None
    log_every: int = 100
    # torch.compile the transformer (CUDA only; the first steps pay the compile time).
    compile: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"TrainConfig.steps must be >= 1, got {self.steps}")
        if self.learning_rate <= 0.0:
            raise ValueError(
                f"TrainConfig.learning_rate must be positive, got {self.learning_rate}"
            )
        if self.batch_size < 1:
            raise ValueError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.time_shift <= 0.0:
            raise ValueError(f"TrainConfig.time_shift must be positive, got {self.time_shift}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(
                f"TrainConfig.prompt_dropout must be in [0, 1), got {self.prompt_dropout}"
            )


@dataclass(frozen=True)
class TrainResult:
    """What a run did; ``record`` is what goes into the model's JSON and docs."""

    pipeline: TinyVideoPipeline
    steps_done: int
    final_loss: float
    seconds: float
    record: dict


def train_tiny(
    config: TrainConfig,
    *,
    model_config: TinyModelConfig | None = None,
    device: str | torch.device = "cpu",
    resume_from: Path | None = None,
    checkpoint_dir: Path | None = None,
    log=print,
) -> TrainResult:
    """Train (or continue training) the tiny model; returns the EMA pipeline and a record.

    A resumed run takes its architecture from the checkpoint (``model_config`` must match it if
    given).
    """
    rank, world_size = _distributed_rank_and_size()
    if world_size > 1 and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    device = torch.device(device)
    if rank != 0:
        log = _silent
    if resume_from is not None:
        saved_config = checkpoint_model_config(Path(resume_from))
        if model_config is not None and saved_config is not None and model_config != saved_config:
            raise ValueError(f"{resume_from} holds another architecture than the one asked for")
        model_config = saved_config or model_config
    model_config = model_config or TinyModelConfig()
    torch.manual_seed(config.seed)
    transformer, text_encoder = build_models(model_config)
    start_step, previous = 0, {}
    if resume_from is not None:
        start_step, previous = load_checkpoint(Path(resume_from), transformer, text_encoder)
        log(f"resumed from {resume_from} at step {start_step}")
    transformer.to(device).train()
    text_encoder.to(device).train()
    ema_transformer = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_text_encoder = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    if config.compile:
        transformer.compile()
    pipeline = TinyVideoPipeline(model_config, transformer, text_encoder)
    pipeline.transformer.train()
    pipeline.text_encoder.train()

    parameters = [*transformer.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.0
    )
    # Data and noise streams are seeded by the seed, the global step a run starts at and the
    # rank, so a rerun with the same chunk boundaries and ranks draws the same batches.
    stream = config.seed * 1_000_003 + start_step + rank * 10_007
    data_generator = torch.Generator().manual_seed(stream)
    noise_generator = torch.Generator(device).manual_seed(stream * 7_919)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    started = time.perf_counter()
    running_loss, steps_done = math.nan, 0
    for local_step in range(config.steps - start_step):
        step = start_step + local_step
        out_of_time = (
            config.max_seconds is not None and time.perf_counter() - started > config.max_seconds
        )
        # Ranks agree on stopping every 10th step (one all-reduce) so they stop together.
        if (world_size == 1 or local_step % 10 == 0) and _any_rank(out_of_time, device, world_size):
            break
        specs = sample_scene_specs(config.batch_size, data_generator, split="train")
        clean = render_scenes(specs, device) * 2 - 1  # [B, 3, F, H, W] in [-1, 1]
        prompts = [
            ""
            if float(torch.rand((), generator=data_generator)) < config.prompt_dropout
            else s.prompt
            for s in specs
        ]
        noise = torch.randn(clean.shape, generator=noise_generator, device=device)
        t = shift_times(
            torch.sigmoid(torch.randn(config.batch_size, generator=noise_generator, device=device)),
            config.time_shift,
        )  # [B], shifted logit-normal
        t_video = t.view(-1, 1, 1, 1, 1)
        noisy = (1 - t_video) * clean + t_video * noise
        with autocast:
            predicted = pipeline.velocity(noisy, t, pipeline.encode_prompts(prompts))
        loss = F.mse_loss(predicted.float(), noise - clean)

        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * min(1.0, (local_step + 1) / config.warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world_size > 1:
            _average_gradients(parameters, world_size)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        # Short warm-up of the average: early weights are noise.
        decay = min(config.ema_decay, (1 + local_step) / (10 + local_step))
        with torch.no_grad():
            for ema, live in (
                (ema_transformer, transformer),
                (ema_text_encoder, text_encoder),
            ):
                for ema_param, param in zip(ema.parameters(), live.parameters(), strict=True):
                    ema_param.lerp_(param, 1 - decay)

        steps_done = local_step + 1
        value = (
            _mean_over_ranks(loss.detach(), world_size)
            if steps_done % 10 == 0 or steps_done == 1
            else None
        )
        if value is not None:
            running_loss = value if math.isnan(running_loss) else 0.9 * running_loss + 0.1 * value
        if steps_done % config.log_every == 0:
            elapsed = time.perf_counter() - started
            log(f"step {step + 1} loss {running_loss:.4f} ({elapsed:.0f} s)")

    seconds = time.perf_counter() - started
    total_steps = start_step + steps_done
    log(f"stopped at step {total_steps} after {seconds:.0f} s, loss {running_loss:.4f}")
    record = {
        "seed": config.seed,
        "time_shift": config.time_shift,
        "train_config": asdict(config),
        "world_size": world_size,
        "model": model_config.to_dict(),
        "steps": total_steps,
        "final_loss": round(running_loss, 5),
        "final_loss_definition": "running mean (0.9 decay, every 10th step) of the velocity MSE",
        "seconds": round(seconds + previous.get("seconds", 0.0), 1),
        "chunks": [
            *previous.get("chunks", []),
            {
                "steps": steps_done,
                "seconds": round(seconds),
                "time_shift": config.time_shift,
                "learning_rate": config.learning_rate,
                "batch_size": config.batch_size * world_size,
            },
        ],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "data_recipe": DATA_RECIPE,
    }
    if checkpoint_dir is not None and rank == 0:
        save_checkpoint(Path(checkpoint_dir), ema_transformer, ema_text_encoder, record)
    ema_pipeline = TinyVideoPipeline(
        model_config, ema_transformer, ema_text_encoder, {"training": record}
    )
    return TrainResult(ema_pipeline, total_steps, running_loss, seconds, record)


def save_checkpoint(
    directory: Path,
    transformer: torch.nn.Module,
    text_encoder: torch.nn.Module,
    record: dict,
) -> list[Path]:
    """fp32 weights in safetensors shards of at most CHECKPOINT_SHARD_BYTES, plus a JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v for k, v in transformer.state_dict().items()} | {
        f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, value in tensors.items():
        size = value.numel() * 4
        if shard_bytes + size > CHECKPOINT_SHARD_BYTES and shards[-1]:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = value.detach().float().cpu().contiguous()
        shard_bytes += size
    paths = []
    for index, shard in enumerate(shards):
        paths.append(directory / f"checkpoint-{index:02d}.safetensors")
        save_file(shard, str(paths[-1]))
    (directory / CHECKPOINT_STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return paths


def _silent(*args, **kwargs) -> None:
    pass


def _distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _average_gradients(parameters: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce every gradient as one flat buffer and divide by the number of ranks."""
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # [total parameters]
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def _any_rank(flag: bool, device: torch.device, world_size: int) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop at the same step)."""
    if world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size
    return float(value)


def checkpoint_model_config(directory: Path) -> TinyModelConfig | None:
    """The architecture a checkpoint records (None for checkpoints written before it did)."""
    record = json.loads((directory / CHECKPOINT_STATE_FILE).read_text())
    return TinyModelConfig.from_dict(record["model"]) if "model" in record else None


def load_checkpoint(
    directory: Path, transformer: torch.nn.Module, text_encoder: torch.nn.Module
) -> tuple[int, dict]:
    """Load a checkpoint into the two modules; returns (global step, its record)."""
    record = json.loads((directory / CHECKPOINT_STATE_FILE).read_text())
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("checkpoint-*.safetensors")):
        tensors |= load_file(str(path))
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    return int(record["steps"]), record


def train_and_save(
    config: TrainConfig,
    output_dir: Path,
    *,
    model_config: TinyModelConfig | None = None,
    device: str | torch.device = "cpu",
    resume_from: Path | None = None,
    checkpoint_dir: Path | None = None,
    command: str = "",
    log=print,
) -> TrainResult:
    """Train, then write the fp16 model files (``tiny-wan.safetensors`` / ``.json``)."""
    result = train_tiny(
        config,
        model_config=model_config,
        device=device,
        resume_from=resume_from,
        checkpoint_dir=checkpoint_dir,
        log=log,
    )
    record = {**result.record, "command": command}
    if _distributed_rank_and_size()[0] != 0:
        return result
    save_tiny_model(
        Path(output_dir),
        result.pipeline.config,
        result.pipeline.transformer,
        result.pipeline.text_encoder,
        record,
    )
    return result
