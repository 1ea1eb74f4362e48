"""Procedural training videos for the tiny model, and the prompt grammar that describes them.

A video shows one coloured shape moving in a straight line at constant speed over a dim textured
background. The background may scroll (camera pan) and a grey bar may cross the object's path
(occlusion). Every video is drawn from a :class:`SceneSpec`, and every spec has exactly one
prompt, e.g. "a red circle moves left quickly over a striped blue background while the camera
pans up, passing behind a grey bar".

Rendering is vectorised over a batch in torch, so the same code feeds training on a GPU and the
tests on a CPU. Pixel values lie in [0, 1]; :func:`render_scenes` returns ``[B, 3, F, H, W]``.

Colours are chosen so that a simple pixel rule separates object from scene: object colours are
bright and saturated (largest channel >= 0.85, spread >= 0.6), backgrounds are dim (largest
channel <= 0.35) and the bar is an unsaturated mid grey. The detector relies on this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OBJECT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.20, 0.35, 1.00),
    "yellow": (0.95, 0.90, 0.15),
    "magenta": (0.90, 0.20, 0.90),
    "cyan": (0.15, 0.90, 0.95),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Unit screen displacement per direction, as (dx, dy); y grows downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
# Pixels per frame.
SPEEDS: dict[str, float] = {"slowly": 1.0, "quickly": 2.0}
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered")
BACKGROUND_TINTS: dict[str, tuple[float, float, float]] = {
    "grey": (0.30, 0.30, 0.30),
    "blue": (0.10, 0.15, 0.35),
    "green": (0.10, 0.30, 0.12),
    "brown": (0.32, 0.20, 0.10),
}
# Camera pan: "still" or a direction; the background moves opposite to the pan on screen.
PANS: tuple[str, ...] = ("still", "left", "right", "up", "down")
PAN_SPEED = 1.0  # pixels per frame
BAR_COLOUR = (0.55, 0.55, 0.55)
BAR_HALF_WIDTH = 2.0

NUM_FRAMES = 8
HEIGHT = 32
WIDTH = 32

# Of the 72 (colour, shape, direction) triples, those never shown in training: they make the
# held-out prompts on which the fidelity metric is measured.
HELD_OUT_TRIPLES: frozenset[tuple[str, str, str]] = frozenset(
    (colour, shape, direction)
    for ci, colour in enumerate(OBJECT_COLOURS)
    for si, shape in enumerate(SHAPES)
    for di, direction in enumerate(DIRECTIONS)
    if (ci + 2 * si + 3 * di) % 9 == 4
)


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to draw one video; positions in pixels, sizes as half-extents."""

    colour: str
    shape: str
    direction: str
    speed: str
    texture: str
    tint: str
    pan: str
    occluded: bool
    size: float
    start_x: float
    start_y: float
    texture_period: float
    stripes_vertical: bool
    bar_position: float

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("colour", self.colour, OBJECT_COLOURS),
            ("shape", self.shape, SHAPES),
            ("direction", self.direction, DIRECTIONS),
            ("speed", self.speed, SPEEDS),
            ("texture", self.texture, TEXTURES),
            ("tint", self.tint, BACKGROUND_TINTS),
            ("pan", self.pan, PANS),
        ):
            if value not in allowed:
                raise ValueError(f"SceneSpec.{field}={value!r} is not one of {list(allowed)}")
        if self.size <= 0:
            raise ValueError(f"SceneSpec.size must be positive, got {self.size}")

    @property
    def prompt(self) -> str:
        return scene_prompt(self)


def scene_prompt(spec: SceneSpec) -> str:
    """The one prompt of the grammar that describes ``spec``."""
    words = [f"a {spec.colour} {spec.shape} moves {spec.direction} {spec.speed}"]
    words.append(f"over a {spec.texture} {spec.tint} background")
    if spec.pan != "still":
        words.append(f"while the camera pans {spec.pan}")
    prompt = " ".join(words)
    if spec.occluded:
        prompt += ", passing behind a grey bar"
    return prompt


@dataclass(frozen=True)
class PromptAttributes:
    """What the detector checks a video against: the prompt's colour, shape and direction."""

    colour: str
    shape: str
    direction: str


def prompt_attributes(prompt: str) -> PromptAttributes | None:
    """The attributes a grammar prompt names ("a {colour} {shape} moves {direction} ..."); None
    for a prompt the grammar does not produce."""
    words = prompt.split()
    if (
        len(words) < 5
        or (words[0], words[3]) != ("a", "moves")
        or words[1] not in OBJECT_COLOURS
        or words[2] not in SHAPES
        or words[4] not in DIRECTIONS
    ):
        return None
    return PromptAttributes(words[1], words[2], words[4])


def grammar_words() -> list[str]:
    """Every word the prompt grammar can produce, in a fixed order."""
    fixed = [
        "a",
        "moves",
        "over",
        "background",
        "while",
        "the",
        "camera",
        "pans",
        "passing",
        "behind",
        "grey",
        "bar",
    ]
    vocabulary = (
        fixed
        + list(OBJECT_COLOURS)
        + list(SHAPES)
        + list(DIRECTIONS)
        + list(SPEEDS)
        + list(TEXTURES)
        + list(BACKGROUND_TINTS)
    )
    return list(dict.fromkeys(vocabulary))


def sample_scene_specs(
    count: int, generator: torch.Generator, *, split: str = "train"
) -> list[SceneSpec]:
    """Draw ``count`` random scenes.

    ``split="train"`` never yields a held-out (colour, shape, direction) triple; ``"held_out"``
    yields only those; ``"all"`` yields anything.
    """
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    triples = [
        (c, s, d)
        for c in OBJECT_COLOURS
        for s in SHAPES
        for d in DIRECTIONS
        if split == "all" or ((c, s, d) in HELD_OUT_TRIPLES) == (split == "held_out")
    ]

    def pick(options: list | tuple) -> object:
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    specs = []
    for _ in range(count):
        colour, shape, direction = pick(triples)
        speed = pick(list(SPEEDS))
        size = uniform(5.0, 6.5)
        travel = SPEEDS[speed] * (NUM_FRAMES - 1)
        dx, dy = DIRECTIONS[direction]
        margin = size + 1.0
        # Start so the whole path stays inside the frame.
        start_x = _start_coordinate(dx, travel, margin, WIDTH, uniform)
        start_y = _start_coordinate(dy, travel, margin, HEIGHT, uniform)
        pan = pick(PANS)
        wants_bar = bool(torch.rand((), generator=generator) < 0.3)
        bar_position = _bar_position(direction, speed, pan, size, start_x, start_y, uniform)
        occluded = wants_bar and bar_position is not None
        specs.append(
            SceneSpec(
                colour=colour,
                shape=shape,
                direction=direction,
                speed=speed,
                texture=pick(TEXTURES),
                tint=pick(list(BACKGROUND_TINTS)),
                pan=pan,
                occluded=occluded,
                size=size,
                start_x=start_x,
                start_y=start_y,
                texture_period=uniform(4.0, 8.0),
                stripes_vertical=bool(torch.rand((), generator=generator) < 0.5),
                bar_position=bar_position if occluded else 0.0,
            )
        )
    return specs


def _start_coordinate(step: int, travel: float, margin: float, extent: int, uniform) -> float:
    if step > 0:
        return uniform(margin, extent - margin - travel)
    if step < 0:
        return uniform(margin + travel, extent - margin)
    return uniform(margin, extent - margin)


def _bar_position(
    direction: str, speed: str, pan: str, size: float, start_x: float, start_y: float, uniform
) -> float | None:
    """World coordinate of a bar across the path that the object passes behind, or None.

    The object must be fully clear of the bar in at least three frames (so its shape and
    motion stay readable) and substantially behind it in at least one.
    """
    dx, dy = DIRECTIONS[direction]
    along = 0 if dx != 0 else 1
    step = (dx, dy)[along] * SPEEDS[speed]
    pan_step = DIRECTIONS[pan][along] * PAN_SPEED if pan != "still" else 0.0
    start = (start_x, start_y)[along]
    extent = (WIDTH, HEIGHT)[along]
    clear_distance = size + BAR_HALF_WIDTH + 0.5
    for _ in range(20):
        candidate = uniform(BAR_HALF_WIDTH, extent - BAR_HALF_WIDTH)
        # Object minus bar, along the motion axis, in screen pixels, for every frame.
        gaps = [abs(start + step * f - (candidate - pan_step * f)) for f in range(NUM_FRAMES)]
        clear_frames = sum(gap >= clear_distance for gap in gaps)
        if clear_frames >= 3 and min(gaps) < size:
            return candidate
    return None


def render_scenes(specs: list[SceneSpec], device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw the videos of ``specs``; returns ``[B, 3, F, H, W]`` float32 in [0, 1]."""

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).view(
            -1, 1, 1, 1
        )  # [B,1,1,1]

    frame = torch.arange(NUM_FRAMES, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    y = torch.arange(HEIGHT, dtype=torch.float32, device=device).view(1, 1, -1, 1) + 0.5
    x = torch.arange(WIDTH, dtype=torch.float32, device=device).view(1, 1, 1, -1) + 0.5

    velocity_x = column([DIRECTIONS[s.direction][0] * SPEEDS[s.speed] for s in specs])
    velocity_y = column([DIRECTIONS[s.direction][1] * SPEEDS[s.speed] for s in specs])
    centre_x = column([s.start_x for s in specs]) + velocity_x * frame  # [B, F, 1, 1]
    centre_y = column([s.start_y for s in specs]) + velocity_y * frame
    offset_x = x - centre_x  # [B, F, 1, W]
    offset_y = y - centre_y  # [B, F, H, 1]
    size = column([s.size for s in specs])

    circle = torch.sqrt(offset_x**2 + offset_y**2) - size
    square = torch.maximum(offset_x.abs(), offset_y.abs()) - size
    # Apex-up isosceles triangle with base and height 2 * size.
    triangle = torch.maximum(
        offset_y - size, (2 * offset_x.abs() - offset_y - size) / math.sqrt(5.0)
    )
    shape_index = column([SHAPES.index(s.shape) for s in specs])
    signed_distance = torch.where(
        shape_index == 0, circle, torch.where(shape_index == 1, square, triangle)
    )  # [B, F, H, W]
    object_alpha = (0.5 - signed_distance).clamp(0.0, 1.0)

    # Screen pixel (x, y) shows the world point (x + pan_x * f, y + pan_y * f).
    pan_x = column([DIRECTIONS[s.pan][0] * PAN_SPEED if s.pan != "still" else 0.0 for s in specs])
    pan_y = column([DIRECTIONS[s.pan][1] * PAN_SPEED if s.pan != "still" else 0.0 for s in specs])
    world_x = x + pan_x * frame
    world_y = y + pan_y * frame
    period = column([s.texture_period for s in specs])
    wave_x = torch.sin(2 * math.pi * world_x / period)  # [B, F, 1, W]
    wave_y = torch.sin(2 * math.pi * world_y / period)  # [B, F, H, 1]
    vertical = column([float(s.stripes_vertical) for s in specs])
    stripes = torch.tanh(3 * (vertical * wave_x + (1 - vertical) * wave_y))
    checks = torch.tanh(3 * wave_x * wave_y)
    texture_index = column([TEXTURES.index(s.texture) for s in specs])
    pattern = torch.where(
        texture_index == 0,
        torch.ones_like(stripes * checks),
        torch.where(texture_index == 1, stripes, checks),
    )  # [B, F, H, W], in [-1, 1]
    brightness = 0.75 + 0.25 * pattern

    tint = torch.tensor(
        [BACKGROUND_TINTS[s.tint] for s in specs], dtype=torch.float32, device=device
    ).view(-1, 3, 1, 1, 1)  # [B, 3, 1, 1, 1]
    colour = torch.tensor(
        [OBJECT_COLOURS[s.colour] for s in specs], dtype=torch.float32, device=device
    ).view(-1, 3, 1, 1, 1)
    background = tint * brightness.unsqueeze(1)  # [B, 3, F, H, W]
    alpha = object_alpha.unsqueeze(1)  # [B, 1, F, H, W]
    video = background * (1 - alpha) + colour * alpha

    # The bar belongs to the scene, so it moves with the background when the camera pans.
    bar_is_vertical = column([float(DIRECTIONS[s.direction][0] != 0) for s in specs])
    bar_screen_x = column([s.bar_position for s in specs]) - pan_x * frame  # [B, F, 1, 1]
    bar_screen_y = column([s.bar_position for s in specs]) - pan_y * frame
    distance_to_bar = (
        bar_is_vertical * (x - bar_screen_x).abs()
        + (1 - bar_is_vertical) * (y - bar_screen_y).abs()
    )  # [B, F, H, W]
    occluded = column([float(s.occluded) for s in specs])
    bar_alpha = (occluded * (BAR_HALF_WIDTH + 0.5 - distance_to_bar).clamp(0.0, 1.0)).unsqueeze(1)
    bar_colour = torch.tensor(BAR_COLOUR, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)
    video = video * (1 - bar_alpha) + bar_colour * bar_alpha
    return video.clamp(0.0, 1.0)
