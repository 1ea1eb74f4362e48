"""The tiny model's offline sampler: prompt -> video tensor and animated GIF, on CPU or GPU.

Flow matching in pixel space (no VAE). A clean video ``x0`` in [-1, 1] and Gaussian noise ``e``
mix as ``x_t = (1 - t) * x0 + t * e`` for t in [0, 1]; the transformer predicts the velocity
``e - x0`` from ``x_t``, the timestep ``1000 * t`` and the prompt. Sampling integrates from t = 1
to t = 0 with Euler steps and classifier-free guidance against the empty prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from compact_search.models.tiny.data import HEIGHT, NUM_FRAMES, WIDTH
from compact_search.models.tiny.text import TextEncoderConfig, TinyTextEncoder, WordTokenizer

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = "tiny-wan.safetensors"
CONFIG_FILE = "tiny-wan.json"
CONFIG_FORMAT = "compact-search/tiny-model"
TIMESTEP_SCALE = 1000.0

# step_index, num_steps
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class TinyModelConfig:
    """Architecture of the tiny video DiT and its text encoder."""

    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 1024
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_frames: int = NUM_FRAMES
    height: int = HEIGHT
    width: int = WIDTH
    text: TextEncoderConfig = field(
        default_factory=lambda: TextEncoderConfig(vocabulary_size=len(WordTokenizer().vocabulary))
    )

    def __post_init__(self) -> None:
        if self.num_heads < 1 or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(
                f"TinyModelConfig needs num_heads >= 1 and an even head_dim (rotary pairs), got "
                f"{self.num_heads} and {self.head_dim}"
            )
        for name, size, patch in (
            ("num_frames", self.num_frames, self.patch_size[0]),
            ("height", self.height, self.patch_size[1]),
            ("width", self.width, self.patch_size[2]),
        ):
            if size % patch != 0:
                raise ValueError(f"TinyModelConfig.{name}={size} is not a multiple of {patch}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (F, H, W) after patchifying."""
        pf, ph, pw = self.patch_size
        return (self.num_frames // pf, self.height // ph, self.width // pw)

    def transformer_kwargs(self) -> dict:
        return {
            "patch_size": self.patch_size,
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": 3,
            "out_channels": 3,
            "text_dim": self.text.width,
            "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim,
            "num_layers": self.num_layers,
            "rope_max_seq_len": 64,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TinyModelConfig:
        values = dict(values)
        values["patch_size"] = tuple(values["patch_size"])
        values["text"] = TextEncoderConfig(**values["text"])
        return cls(**values)


def build_models(config: TinyModelConfig) -> tuple[WanTransformer3DModel, TinyTextEncoder]:
    """Freshly initialised transformer and text encoder (weights from torch's global RNG)."""
    return WanTransformer3DModel(**config.transformer_kwargs()), TinyTextEncoder(config.text)


def save_tiny_model(
    directory: Path,
    config: TinyModelConfig,
    transformer: WanTransformer3DModel,
    text_encoder: TinyTextEncoder,
    training_record: dict,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write ``tiny-wan.safetensors`` (weights in ``dtype``) and ``tiny-wan.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"transformer.{name}": value.detach().to("cpu", dtype).contiguous()
        for name, value in transformer.state_dict().items()
    }
    tensors |= {
        f"text_encoder.{name}": value.detach().to("cpu", dtype).contiguous()
        for name, value in text_encoder.state_dict().items()
    }
    save_file(tensors, str(directory / WEIGHTS_FILE))
    metadata = {
        "format": CONFIG_FORMAT,
        "version": 1,
        "model": config.to_dict(),
        "training": training_record,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return directory / WEIGHTS_FILE


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Move times in [0, 1] towards 1 (more noise) for ``shift`` > 1: ``s t / (1 + (s - 1) t)``.

    Training with a shift spends more samples at high noise, where the prompt decides the
    layout; sampling with one spends more Euler steps there.
    """
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class TinySample:
    """Sampler output: ``videos`` [B, 3, F, H, W] in [0, 1], float32 on the CPU."""

    videos: torch.Tensor
    prompts: list[str]


class TinyVideoPipeline:
    """Prompt -> video with the tiny Wan transformer; holds ``transformer`` and ``text_encoder``."""

    def __init__(
        self,
        config: TinyModelConfig,
        transformer: WanTransformer3DModel,
        text_encoder: TinyTextEncoder,
        metadata: dict | None = None,
    ) -> None:
        self.config = config
        self.transformer = transformer.eval()
        self.text_encoder = text_encoder.eval()
        self.tokenizer = WordTokenizer(config.text.max_length)
        self.metadata = metadata or {}
        self.timesteps: torch.Tensor | None = None  # set by each call, one value per step

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (F, H, W) = (8, 16, 16) at the default size."""
        return self.config.grid

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, L, text_dim] for ``prompts`` ("" is the unconditional prompt)."""
        token_ids = self.tokenizer.encode(prompts).to(self.device)
        return self.text_encoder(token_ids)

    def velocity(
        self, noisy: torch.Tensor, t: torch.Tensor, text_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """Predicted ``noise - clean`` for ``noisy`` [B, 3, F, H, W] at times ``t`` [B], 0..1."""
        return self.transformer(
            hidden_states=noisy,
            timestep=t * TIMESTEP_SCALE,
            encoder_hidden_states=text_embeddings,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str],
        *,
        num_steps: int = 20,
        guidance_scale: float = 4.0,
        seed: int = 0,
        callback: StepCallback | None = None,
        time_shift: float | None = None,
    ) -> TinySample:
        """Sample one video per prompt.

        The initial noise comes from a CPU generator seeded with ``seed``, so a seed gives the
        same noise on every device. ``callback(step_index, num_steps)`` runs before each
        transformer call. ``guidance_scale`` 1 disables guidance (one transformer call a step).
        ``time_shift`` (default: the value the model was trained with) spaces the steps by
        :func:`shift_times`.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        batch = len(prompts)
        generator = torch.Generator().manual_seed(seed)
        shape = (batch, 3, self.config.num_frames, self.config.height, self.config.width)
        dtype = next(self.transformer.parameters()).dtype
        video = torch.randn(shape, generator=generator).to(self.device, dtype)  # [B, 3, F, H, W]
        use_guidance = guidance_scale != 1.0
        text = self.encode_prompts(prompts + [""] * batch if use_guidance else prompts).to(dtype)
        if time_shift is None:
            time_shift = self.metadata.get("training", {}).get("time_shift", 1.0)
        times = shift_times(
            torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), time_shift
        )
        # Every step's transformer timestep, as diffusers schedulers expose theirs: a runtime
        # hooked into the transformer (compact_search.apply) maps each call to its step.
        self.timesteps = (times[:-1] * TIMESTEP_SCALE).to(dtype)
        for step in range(num_steps):
            if callback is not None:
                callback(step, num_steps)
            t_now, t_next = float(times[step]), float(times[step + 1])
            model_input = torch.cat([video, video]) if use_guidance else video
            t = torch.full((model_input.shape[0],), t_now, device=self.device, dtype=dtype)
            velocity = self.velocity(model_input, t, text)
            if use_guidance:
                conditional, unconditional = velocity.chunk(2)
                velocity = unconditional + guidance_scale * (conditional - unconditional)
            video = video + (t_next - t_now) * velocity
        frames = ((video.float().cpu() + 1) / 2).clamp(0, 1)
        return TinySample(videos=frames, prompts=prompts)


def load_tiny_pipeline(
    device: str | torch.device = "cpu",
    *,
    weights_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> TinyVideoPipeline:
    """Load the shipped tiny model (or one saved by ``train-tiny`` in ``weights_dir``)."""
    directory = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not (config_path.is_file() and weights_path.is_file()):
        raise FileNotFoundError(f"no tiny model in {directory}: need {CONFIG_FILE}, {WEIGHTS_FILE}")
    metadata = json.loads(config_path.read_text())
    if metadata.get("format") != CONFIG_FORMAT:
        raise ValueError(f"{config_path} is not a {CONFIG_FORMAT} file")
    config = TinyModelConfig.from_dict(metadata["model"])
    transformer, text_encoder = build_models(config)
    tensors = load_file(str(weights_path))
    for prefix, module in (("transformer.", transformer), ("text_encoder.", text_encoder)):
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    for module in (transformer, text_encoder):
        module.to(device)
        if dtype != torch.float32:
            module.to(dtype)
    return TinyVideoPipeline(config, transformer, text_encoder, metadata)
