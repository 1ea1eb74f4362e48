"""What `evaluate` samples: decoding a pipeline's latents to videos, and the on-disk sample cache.

`to_videos(model, outputs, frames)` turns what `LoadedModel.run` returned into videos
[B, 3, F, H, W] in [0, 1]: pixel-space pipelines (the built-in model) return videos already;
the diffusers families return latents, decoded here through the pipeline's own VAE exactly as
the pipeline decodes them for `output_type="pt"` (one video at a time, to bound VAE memory).

`SampleCache(folder)` keeps every finished sample (the tensor `run` returned, exact, plus its
timings) in one safetensors file per key, written atomically, so a second config samples only
its compact half and a killed evaluate starts again after its last finished sample.
`sample_key(...)` is the sha256 of what decides a sample's numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from compact_search.io import atomic_write_bytes
from compact_search.models.plugin import LoadedModel


def _wan_decode(pipe, latents: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, C, F', H', W'] normalised latents -> [1, 3, F, H, W] in [-1, 1] (WanPipeline)."""
    config = pipe.vae.config
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(latents)
    std = torch.tensor(config.latents_std).view(shape).to(latents)
    return pipe.vae.decode(latents * std + mean, return_dict=False)[0]


def _cogvideox_decode(pipe, latents: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, F', C, H', W'] latents -> [1, 3, F, H, W] (CogVideoXPipeline): CogVideoX 1.5 pads the
    latent frames at the front up to whole temporal patches; the pipeline drops them first."""
    latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
    return pipe.decode_latents(latents[:, latents.shape[1] - latent_frames :])


def _hunyuan_decode(pipe, latents: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, C, F', H', W'] latents -> [1, 3, F, H, W] (HunyuanVideoPipeline)."""
    return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]


# adapter name -> decode(pipeline, one video's latents, pixel frames) -> [1, 3, F, H, W] in [-1, 1]
LATENT_DECODERS: dict[str, Callable[[object, torch.Tensor, int], torch.Tensor]] = {
    "wan": _wan_decode,
    "cogvideox": _cogvideox_decode,
    "hunyuanvideo": _hunyuan_decode,
    # HunyuanVideo15Pipeline divides by the VAE's scaling factor as 1.0 does; SkyReelsV2Pipeline
    # un-normalises with Wan's latents_mean / latents_std.
    "hunyuanvideo15": _hunyuan_decode,
    "skyreels-v2": _wan_decode,
}


def to_videos(model: LoadedModel, outputs: torch.Tensor, frames: int) -> torch.Tensor:
    """What `model.run` returned -> videos [B, 3, F, H, W] in [0, 1], float32 on the CPU."""
    if model.output == "video":
        return outputs.float().cpu()
    decode = LATENT_DECODERS[model.adapter.name]
    vae = model.pipeline.vae
    videos = []
    with torch.no_grad():
        for latents in outputs.split(1):
            latents = latents.to(next(vae.parameters()).device, vae.dtype)
            video = decode(model.pipeline, latents, frames)  # [1, 3, F, H, W] in [-1, 1]
            videos.append((video.float() / 2 + 0.5).clamp(0, 1).cpu())
    return torch.cat(videos)


def sample_key(**fields) -> str:
    """sha256 of the fields (JSON-able values) that decide a sample's numbers."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class SampleCache:
    """Finished samples on disk: `get(key)` -> (tensor, timings) or None; `put` writes one."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, dict] | None:
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        data = path.read_bytes()
        # The header carries the timings; a file that does not parse is sampled again.
        try:
            tensors = load_safetensors(data)
            header_length = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_length])
            timings = json.loads(header["__metadata__"]["timings"])
        except Exception:
            self.misses += 1
            return None
        self.hits += 1
        return tensors["output"], timings

    def put(self, key: str, output: torch.Tensor, timings: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = save_safetensors(
            {"output": output.detach().contiguous().cpu()}, {"timings": json.dumps(timings)}
        )
        atomic_write_bytes(self.path(key), data)
