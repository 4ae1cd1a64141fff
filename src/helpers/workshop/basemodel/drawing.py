"""The base model's visual world: coloured shapes and toys that the project draws itself.

Every picture is drawn with PIL from a seed, so the base model's training data needs no
download and is the same on every machine. The captions use the phrasing of Phase A's instance
prompts ("a photo of a <colour> toy"), so a rare identifier token can later bind to a user's
subject ("a photo of sks toy").

A toy has parts: a body colour, and an accent colour for its ears and its pattern (a belly,
stripes or a bowtie). The captions name the parts, fully or in part ("a photo of a purple toy
with yellow stripes", "a photo of a toy with stripes"), so the base model learns each part on
its own and can compose toys it has never seen. DreamBooth then only has to bind a rare token
to one combination. The demo subjects' combinations are never drawn for the base model
(`HELD_OUT_TOYS`): it has never seen those toys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
#: Marks in a toy's accent colour that make it a particular toy.
PATTERNS: tuple[str, ...] = ("belly", "stripes", "bowtie")
#: (body, accent, pattern) of toys the base model never sees: Phase A's demo subjects
#: (`helpers.workshop.demo_subjects`, whose tests check that each of its toys is here).
HELD_OUT_TOYS: frozenset[tuple[str, str, str]] = frozenset(
    {("purple", "yellow", "stripes"), ("orange", "blue", "bowtie")}
)
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
    Toys are drawn larger than plain shapes (they are narrower, and their parts are small).
    """
    resolution = RESOLUTION
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    color = color or list(COLORS)[rng.integers(len(COLORS))]
    low, high = (0.62, 0.92) if shape == "toy" else (0.42, 0.72)
    size = float(rng.uniform(low, high) * resolution)
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
        y, w, h = cy - r * 0.1, r * 0.4, r * 0.22
        pen.polygon([(cx, y), (cx - w, y - h), (cx - w, y + h)], fill=accent)
        pen.polygon([(cx, y), (cx + w, y - h), (cx + w, y + h)], fill=accent)
    eye_r = max(head_r * 0.14, 1.5)
    for ex in (cx - head_r * 0.38, cx + head_r * 0.38):
        ey = head_y - head_r * 0.1
        pen.ellipse((ex - eye_r, ey - eye_r, ex + eye_r, ey + eye_r), fill=(25, 25, 25))


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A training caption for `scene`, in one of the phrasings the workshop's prompts use.

    About 10% of captions are empty so that classifier-free guidance has an unconditional
    model to steer away from. A toy's caption names its parts in full about half the time,
    otherwise only some of them, so that each part is learned on its own.
    """
    roll = rng.random()
    if roll < 0.10:
        return ""
    if scene.shape == "toy" and scene.accent and scene.pattern:
        return _toy_caption(scene, rng.random())
    if roll < 0.25:
        return f"a photo of a {scene.shape}"
    if roll < 0.35:
        return f"{_article(scene.color)} {scene.color} {scene.shape}"
    return prompt_for(scene.color, scene.shape)


def _toy_caption(scene: Scene, roll: float) -> str:
    if roll < 0.50:
        return toy_prompt(scene.color, scene.accent, scene.pattern)
    if roll < 0.62:
        return prompt_for(scene.color, "toy")
    if roll < 0.74:
        return toy_prompt(None, scene.accent, scene.pattern)
    if roll < 0.84:
        return toy_prompt(scene.color, None, scene.pattern)
    if roll < 0.92:
        return f"{prompt_for(scene.color, 'toy')} with {scene.accent} ears"
    return toy_prompt(None, None, scene.pattern)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def prompt_for(color: str, shape: str) -> str:
    """The canonical prompt for one class of the base model's world."""
    return f"a photo of {_article(color)} {color} {shape}"


def _pattern_phrase(accent: str | None, pattern: str) -> str:
    noun = pattern if accent is None else f"{accent} {pattern}"
    return noun if pattern == "stripes" else f"{_article(noun)} {noun}"


def toy_prompt(color: str | None, accent: str | None, pattern: str) -> str:
    """A prompt for a toy by its parts, any of them left out but the pattern, e.g.
    `"a photo of a purple toy with yellow stripes"` or `"a photo of a toy with a bowtie"`."""
    toy = prompt_for(color, "toy") if color else "a photo of a toy"
    return f"{toy} with {_pattern_phrase(accent, pattern)}"


def caption_vocabulary() -> list[str]:
    """Every phrase the captions can contain: the tokenizer is trained on these."""
    phrases = ["a photo of a", "a photo of an", "a", "an", "with", "ears"]
    phrases += [f"{c} {s}" for c in COLORS for s in SHAPES]
    phrases += [f"{c} {p}" for c in COLORS for p in PATTERNS]
    return phrases


def random_toy(rng: np.random.Generator, color: str) -> Scene:
    """A toy of body `color` with a random accent and pattern, never one of `HELD_OUT_TOYS`."""
    scene = random_scene(rng, "toy", color)
    while True:
        accent = rng.choice([name for name in COLORS if name != color])
        pattern = PATTERNS[rng.integers(len(PATTERNS))]
        if (color, accent, pattern) not in HELD_OUT_TOYS:
            return replace(scene, accent=str(accent), pattern=pattern)


def make_dataset(
    count: int, seed: int, resolution: int = RESOLUTION
) -> tuple[np.ndarray, list[Scene]]:
    """`count` random scenes drawn as a uint8 array of shape (count, resolution, resolution, 3).

    Half the scenes are toys with parts (`random_toy`), half plain circles, squares and
    triangles; colours and shapes are balanced: scene ``i`` has colour ``(i // 2) % 6``.
    """
    rng = np.random.default_rng(seed)
    colors = list(COLORS)
    plain = [shape for shape in SHAPES if shape != "toy"]
    images = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    scenes = []
    for i in range(count):
        color = colors[(i // 2) % len(colors)]
        if i % 2 == 0:
            scene = random_toy(rng, color)
        else:
            scene = random_scene(rng, plain[(i // 12) % len(plain)], color)
        images[i] = np.asarray(draw(scene, resolution))
        scenes.append(scene)
    return images, scenes
