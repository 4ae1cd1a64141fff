"""The base model's visual world: coloured shapes and toys that the project draws itself.

Every picture is drawn with PIL from a seed, so the base model's training data needs no
download and is the same on every machine. The captions use the phrasing of Phase A's instance
prompts ("a photo of a <colour> toy"), so a rare identifier token can later bind to a user's
subject ("a photo of sks toy").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 185),
    "orange": (245, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "toy")
#: Marks that make one toy a particular toy (Phase A's demo subjects).
PATTERNS: tuple[str, ...] = ("belly", "stripes", "bowtie")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (246, 246, 246),
    (226, 226, 226),
    (240, 230, 208),
    (214, 228, 244),
    (220, 240, 220),
)
RESOLUTION = 64
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One picture: an object of `shape` and `color` at `center` (pixels) with `size` (pixels).

    `accent` and `pattern` mark a particular toy (Phase A's demo subjects); plain shapes have
    neither.
    """

    shape: str
    color: str
    center: tuple[float, float]
    size: float
    background: tuple[int, int, int]
    accent: str | None = None
    pattern: str | None = None


def random_scene(
    rng: np.random.Generator, shape: str | None = None, color: str | None = None
) -> Scene:
    """A scene with a random position, size and background (and shape/colour unless given).

    Positions and sizes are in units of a 64-pixel picture; `draw` scales them to any size.
    """
    resolution = RESOLUTION
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    color = color or list(COLORS)[rng.integers(len(COLORS))]
    size = float(rng.uniform(0.42, 0.72) * resolution)
    margin = size / 2 + 1
    center = (
        float(rng.uniform(margin, resolution - margin)),
        float(rng.uniform(margin, resolution - margin)),
    )
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return Scene(shape, color, center, size, background)


def draw(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """Draw `scene` as an RGB image of `resolution` pixels (antialiased by supersampling)."""
    if scene.shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {scene.shape!r}")
    for name in ("color", "accent"):
        value = getattr(scene, name)
        if value is not None and value not in COLORS:
            raise ValueError(f"{name} must be one of {sorted(COLORS)}, got {value!r}")
    if scene.pattern is not None and scene.pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {scene.pattern!r}")
    scale = _SUPERSAMPLE * resolution / RESOLUTION
    canvas = Image.new("RGB", (resolution * _SUPERSAMPLE,) * 2, scene.background)
    pen = ImageDraw.Draw(canvas)
    cx, cy = scene.center[0] * scale, scene.center[1] * scale
    r = scene.size * scale / 2
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        s = r * 0.9
        pen.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif scene.shape == "triangle":
        pen.polygon([(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)], fill=fill)
    else:
        _draw_toy(pen, cx, cy, r, fill, scene)
    return canvas.resize((resolution, resolution), Image.Resampling.LANCZOS)


def _draw_toy(
    pen: ImageDraw.ImageDraw,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, int, int],
    scene: Scene,
) -> None:
    """A teddy: round ears, head, body; dark eyes. Accent and pattern make one toy unique."""
    accent = COLORS[scene.accent] if scene.accent else fill
    head_r, head_y = r * 0.42, cy - r * 0.45
    body = (cx - r * 0.62, cy - r * 0.15, cx + r * 0.62, cy + r)
    for ex in (cx - head_r * 0.85, cx + head_r * 0.85):
        ey, er = head_y - head_r * 0.8, head_r * 0.42
        pen.ellipse((ex - er, ey - er, ex + er, ey + er), fill=accent)
    pen.ellipse(body, fill=fill)
    pen.ellipse((cx - head_r, head_y - head_r, cx + head_r, head_y + head_r), fill=fill)
    if scene.pattern == "belly":
        pen.ellipse((cx - r * 0.35, cy + r * 0.1, cx + r * 0.35, cy + r * 0.8), fill=accent)
    elif scene.pattern == "stripes":
        for k in range(3):
            y = cy + r * (0.1 + 0.28 * k)
            pen.rectangle((body[0] + r * 0.1, y, body[2] - r * 0.1, y + r * 0.12), fill=accent)
    elif scene.pattern == "bowtie":
        y = cy - r * 0.12
        pen.polygon(
            [(cx, y), (cx - r * 0.3, y - r * 0.16), (cx - r * 0.3, y + r * 0.16)], fill=accent
        )
        pen.polygon(
            [(cx, y), (cx + r * 0.3, y - r * 0.16), (cx + r * 0.3, y + r * 0.16)], fill=accent
        )
    eye_r = max(head_r * 0.14, 1.5)
    for ex in (cx - head_r * 0.38, cx + head_r * 0.38):
        ey = head_y - head_r * 0.1
        pen.ellipse((ex - eye_r, ey - eye_r, ex + eye_r, ey + eye_r), fill=(25, 25, 25))


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A training caption for `scene`, in one of the phrasings the workshop's prompts use.

    About 10% of captions are empty so that classifier-free guidance has an unconditional
    model to steer away from.
    """
    roll = rng.random()
    if roll < 0.10:
        return ""
    if roll < 0.25:
        return f"a photo of a {scene.shape}"
    if roll < 0.35:
        return f"{_article(scene.color)} {scene.color} {scene.shape}"
    return prompt_for(scene.color, scene.shape)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def prompt_for(color: str, shape: str) -> str:
    """The canonical prompt for one class of the base model's world."""
    return f"a photo of {_article(color)} {color} {shape}"


def caption_vocabulary() -> list[str]:
    """Every phrase the captions can contain: the tokenizer is trained on these."""
    phrases = ["a photo of a", "a photo of an", "a", "an"]
    phrases += [f"{c} {s}" for c in COLORS for s in SHAPES]
    return phrases


def make_dataset(
    count: int, seed: int, resolution: int = RESOLUTION
) -> tuple[np.ndarray, list[Scene]]:
    """`count` random scenes drawn as a uint8 array of shape (count, resolution, resolution, 3).

    Classes are balanced: scene ``i`` has shape ``i % 4`` and colour ``(i // 4) % 6``.
    """
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    images = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    scenes = []
    for i in range(count):
        scene = random_scene(rng, SHAPES[i % len(SHAPES)], colors[(i // len(SHAPES)) % len(colors)])
        images[i] = np.asarray(draw(scene, resolution))
        scenes.append(scene)
    return images, scenes
