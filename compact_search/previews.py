"""Video previews: a video tensor [3, F, H, W] in [0, 1] as a looping animated GIF."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def save_gif(video: torch.Tensor, path: Path | str, *, scale: int = 4, frame_ms: int = 125) -> Path:
    """Write one video [3, F, H, W] in [0, 1] as a looping GIF, enlarged ``scale`` times."""
    path = Path(path)
    frames = (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0)  # [F, H, W, 3]
    images = [
        Image.fromarray(frame.numpy()).resize(
            (frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST
        )
        for frame in frames
    ]
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path
