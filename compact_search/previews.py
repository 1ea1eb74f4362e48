"""Video previews: videos [3, F, H, W] in [0, 1] as looping GIFs and as MP4 files.

`side_by_side(dense, compact)` puts two videos next to each other (dense left, compact right, a
white divider) with "dense" and "compact" written on the frames; `save_gif` writes any video,
`save_mp4` too where imageio-ffmpeg (which ships its own ffmpeg) is installed
(`mp4_status()` says so otherwise).
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _frames(video: torch.Tensor, scale: int) -> list[Image.Image]:
    """[3, F, H, W] in [0, 1] -> F RGB images, enlarged `scale` times."""
    frames = (video.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0)  # [F, H, W, 3]
    return [
        Image.fromarray(frame.cpu().numpy()).resize(
            (frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST
        )
        for frame in frames
    ]


def _label(images: list[Image.Image], text: str, left: int) -> None:
    """Write `text` at the top-left corner of the half starting at column `left` (white on a dark
    box, readable on any content); the font grows with the frame height."""
    height = images[0].height
    font = ImageFont.load_default(size=max(10, height // 12))
    for image in images:
        draw = ImageDraw.Draw(image)
        x0, y0, x1, y1 = draw.textbbox((left + 3, 2), text, font=font)
        draw.rectangle((x0 - 2, y0 - 1, x1 + 2, y1 + 1), fill=(0, 0, 0))
        draw.text((left + 3, 2), text, fill=(255, 255, 255), font=font)


def side_by_side(
    dense: torch.Tensor, compact: torch.Tensor, *, scale: int = 1, labels=("dense", "compact")
) -> list[Image.Image]:
    """Two videos [3, F, H, W] as F frames: dense left, compact right, a 2-pixel white divider
    between them (before enlarging), each half labelled."""
    gap = torch.ones_like(dense[..., :2])
    pair = torch.cat([dense, gap, compact], dim=-1)  # [3, F, H, 2W + 2]
    images = _frames(pair, scale)
    _label(images, labels[0], 0)
    _label(images, labels[1], (dense.shape[-1] + 2) * scale)
    return images


def save_gif(video, path: Path | str, *, scale: int = 4, frame_ms: int = 125) -> Path:
    """Write one video [3, F, H, W] in [0, 1] (or ready frames) as a looping GIF, enlarged
    ``scale`` times."""
    path = Path(path)
    images = video if isinstance(video, list) else _frames(video, scale)
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
    return path


def mp4_status() -> str | None:
    """None when MP4 previews can be written here; else one line saying what is missing."""
    if find_spec("imageio_ffmpeg") is None:
        return "no MP4 previews: imageio-ffmpeg is not installed (pip install imageio-ffmpeg)"
    return None


def save_mp4(images: list[Image.Image], path: Path | str, *, fps: int = 8) -> Path:
    """Write frames as an H.264 MP4 (yuv420p, which needs even sizes: odd ones get a black
    border column or row); needs imageio-ffmpeg (`mp4_status()`)."""
    import imageio_ffmpeg

    path = Path(path)
    width, height = images[0].size
    even = (width + width % 2, height + height % 2)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        even,
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    writer.send(None)  # start ffmpeg
    try:
        for image in images:
            frame = np.zeros((even[1], even[0], 3), dtype=np.uint8)
            frame[:height, :width] = np.asarray(image.convert("RGB"))
            writer.send(frame)
    finally:
        writer.close()
    return path
