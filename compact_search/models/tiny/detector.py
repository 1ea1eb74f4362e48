"""A hand-written detector that reads colour, shape and motion direction off a video's pixels.

It needs no learned judge, so it can score the tiny model's samples (and later, samples made with
sparse attention). It uses the rules that :mod:`compact_search.models.tiny.data` guarantees:
object pixels are bright and saturated, the background is dim, the occluding bar is grey.

- colour: the palette colour nearest to the mean colour of object pixels;
- shape: how much of its bounding box the object fills (square ~1, circle ~pi/4, triangle ~1/2),
  taken on the frames where the object is least hidden;
- direction: the sign of the largest component of the object's centroid velocity, fitted by
  least squares over those same frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compact_search.models.tiny.data import (
    DIRECTIONS,
    OBJECT_COLOURS,
    PromptAttributes,
    SceneSpec,
    sample_scene_specs,
)

# A pixel belongs to the object when its largest channel and its channel spread exceed these.
MIN_BRIGHTNESS = 0.6
MIN_SATURATION = 0.35
# Frames whose object area is at least this share of the largest area count as unoccluded.
VISIBLE_AREA_SHARE = 0.85
# Bounding-box fill ratios that separate triangles (~0.5), circles (~0.79) and squares (~1).
TRIANGLE_MAX_FILL = 0.64
CIRCLE_MAX_FILL = 0.9
MIN_OBJECT_PIXELS = 6


@dataclass(frozen=True)
class Detection:
    """What the detector read from one video; ``None`` where it found no object."""

    colour: str | None
    shape: str | None
    direction: str | None


def detect(video: torch.Tensor) -> Detection:
    """Read one video ``[3, F, H, W]`` with values in [0, 1]."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, F, H, W], got {list(video.shape)}")
    video = video.detach().float().cpu().clamp(0, 1)
    brightest = video.max(dim=0).values  # [F, H, W]
    spread = brightest - video.min(dim=0).values
    mask = (brightest >= MIN_BRIGHTNESS) & (spread >= MIN_SATURATION)  # [F, H, W]
    area = mask.flatten(1).sum(dim=1).float()  # [F]
    if float(area.max()) < MIN_OBJECT_PIXELS:
        return Detection(colour=None, shape=None, direction=None)

    visible = area >= VISIBLE_AREA_SHARE * area.max()  # [F]
    object_pixels = video.permute(1, 2, 3, 0)[mask]  # [P, 3]
    return Detection(
        colour=_nearest_colour(object_pixels.mean(dim=0)),
        shape=_shape_from_fill(mask[visible]),
        direction=_direction_from_centroids(mask, visible),
    )


def detect_batch(videos: torch.Tensor) -> list[Detection]:
    """Read a batch ``[B, 3, F, H, W]``."""
    return [detect(video) for video in videos]


def _nearest_colour(mean_rgb: torch.Tensor) -> str:
    names = list(OBJECT_COLOURS)
    palette = torch.tensor([OBJECT_COLOURS[name] for name in names])  # [C, 3]
    return names[int(((palette - mean_rgb) ** 2).sum(dim=1).argmin())]


def _shape_from_fill(masks: torch.Tensor) -> str:
    """Median bounding-box fill over frames ``masks`` [F', H, W]."""
    fills = []
    for mask in masks:
        rows = mask.any(dim=1).nonzero().flatten()
        cols = mask.any(dim=0).nonzero().flatten()
        box_area = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        fills.append(float(mask.sum()) / float(box_area))
    fill = float(torch.tensor(fills).median())
    if fill < TRIANGLE_MAX_FILL:
        return "triangle"
    if fill < CIRCLE_MAX_FILL:
        return "circle"
    return "square"


def _direction_from_centroids(mask: torch.Tensor, visible: torch.Tensor) -> str | None:
    """Least-squares centroid velocity over the visible frames of ``mask`` [F, H, W]."""
    frames = visible.nonzero().flatten()
    if len(frames) < 2:
        return None
    _, height, width = mask.shape
    ys = torch.arange(height, dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, -1)
    weights = mask[frames].float()  # [F', H, W]
    total = weights.flatten(1).sum(dim=1)
    centre_x = (weights * xs).flatten(1).sum(dim=1) / total  # [F']
    centre_y = (weights * ys).flatten(1).sum(dim=1) / total
    time = frames.float() - frames.float().mean()
    velocity_x = float((time * (centre_x - centre_x.mean())).sum() / (time**2).sum())
    velocity_y = float((time * (centre_y - centre_y.mean())).sum() / (time**2).sum())
    if abs(velocity_x) >= abs(velocity_y):
        step = (1 if velocity_x > 0 else -1, 0)
    else:
        step = (0, 1 if velocity_y > 0 else -1)
    return next(name for name, unit in DIRECTIONS.items() if unit == step)


@dataclass(frozen=True)
class FidelityScore:
    """Share of videos whose detected attribute matches the prompt, per attribute and jointly."""

    count: int
    colour: float
    shape: float
    direction: float
    all_three: float

    def as_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "colour": self.colour,
            "shape": self.shape,
            "direction": self.direction,
            "all_three": self.all_three,
        }


def score_detections(
    detections: list[Detection], specs: list[SceneSpec] | list[PromptAttributes]
) -> FidelityScore:
    """Compare detections with the scenes (or the prompts' attributes) they should show."""
    if len(detections) != len(specs) or not specs:
        raise ValueError(
            f"need as many detections as specs (>0), got {len(detections)}, {len(specs)}"
        )
    hits = {
        name: [getattr(d, name) == getattr(s, name) for d, s in zip(detections, specs, strict=True)]
        for name in ("colour", "shape", "direction")
    }
    everything = [all(row) for row in zip(*hits.values(), strict=True)]
    count = len(specs)
    return FidelityScore(
        count=count,
        colour=sum(hits["colour"]) / count,
        shape=sum(hits["shape"]) / count,
        direction=sum(hits["direction"]) / count,
        all_three=sum(everything) / count,
    )


def evaluate_fidelity(
    pipeline,
    *,
    split: str = "held_out",
    count: int = 64,
    seed: int = 1234,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    time_shift: float | None = None,
    batch_size: int = 32,
) -> FidelityScore:
    """Sample one video per random prompt of ``split`` with ``pipeline`` and score the detector."""
    specs = sample_scene_specs(count, torch.Generator().manual_seed(seed), split=split)
    detections: list[Detection] = []
    for start in range(0, count, batch_size):
        batch = specs[start : start + batch_size]
        sample = pipeline(
            [s.prompt for s in batch],
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            seed=seed + start,
            time_shift=time_shift,
        )
        detections += detect_batch(sample.videos)
    return score_detections(detections, specs)
