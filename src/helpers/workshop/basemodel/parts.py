"""Which toy is in a picture? Its body colour, accent colour and pattern, read back.

Built from the project's own drawing code, like `prompt_following.detect`:

* the object is the strongly coloured part of the picture (`prompt_following.object_mask`);
* each object pixel is read as its nearest palette colour, when it is clearly nearer to it
  than to any other (`prompt_following.palette_labels`);
* the body colour is the most frequent colour; the other colours are the toy's marks, when
  they cover enough of the object to be ears and a pattern rather than a fringe;
* the accent colour is the most frequent colour of the marks in the ears, the top of the toy
  (a thin pattern blurs into the body: yellow stripes on red read as orange);
* the pattern is stripes when two or more bands off the body colour cross the middle of the
  body; otherwise the drawn template (`drawing.draw` of a toy with a belly, stripes or a
  bowtie) whose marks are most off the picture's body colour, against the template's body
  area, after both are cropped to the object's bounding box.

`tests/test_identity.py` measures the detector on drawn toys of every combination before the
identity score trusts it on generated pictures.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from helpers.workshop.basemodel.drawing import (
    COLORS,
    HELD_OUT_TOYS,
    PATTERNS,
    Scene,
    draw,
    toy_prompt,
)
from helpers.workshop.basemodel.prompt_following import (
    bounding_box,
    crop_to_box,
    draw_batch,
    object_mask,
    palette_labels,
)

_NAMES = tuple(COLORS)
#: The accent must cover this share of the object's clear pixels (ears alone are about 10%).
_MIN_ACCENT_SHARE = 0.04
_MIN_OBJECT_PIXELS = 40
#: The ears are the top 18% of a toy's bounding box; so many pixels of them read the accent.
_EAR_BAND = 0.18
_MIN_EAR_PIXELS = 4
_GRID = 48


@dataclass(frozen=True)
class ToyParts:
    """What the detector reads in one picture (`None`: not found)."""

    color: str | None
    accent: str | None
    pattern: str | None

    def describe(self) -> str:
        """In words, e.g. `"purple, yellow stripes"`; `"?"` for what was not found."""
        accent = f"{self.accent or '?'} {self.pattern or '?'}"
        return f"{self.color or '?'}, {accent}"


def _crop(mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    return crop_to_box(mask, box, _GRID).astype(np.float32) / 255.0


@functools.cache
def _pattern_templates() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each pattern's (marks, body) areas, ears included in the marks, in a toy's bounding
    box."""
    templates = {}
    for pattern in PATTERNS:
        scene = Scene("toy", "blue", (32.0, 34.0), 58.0, (255, 255, 255), "yellow", pattern)
        pixels = np.asarray(draw(scene), dtype=np.float32)
        mask = object_mask(pixels)
        labels = palette_labels(pixels, mask)
        box = bounding_box(mask)
        templates[pattern] = (
            _crop(labels == _NAMES.index("yellow"), box),
            _crop(labels == _NAMES.index("blue"), box),
        )
    return templates


def _bands(off_body: np.ndarray) -> int:
    """How many separate bands off the body colour cross the middle of the toy's body (the
    lower half of its bounding box, less the bottom edge, which blends into the background):
    three for stripes, one for a belly."""
    rows, cols = off_body.shape
    middle = off_body[rows // 2 : int(0.93 * rows), int(0.35 * cols) : int(0.65 * cols)]
    bands, inside = 0, False
    for share in middle.mean(axis=1):  # with hysteresis: a blurred edge is not a new band
        if not inside and share > 0.5:
            bands, inside = bands + 1, True
        elif inside and share < 0.25:
            inside = False
    return bands


def _pattern(off_body: np.ndarray) -> str:
    """Stripes when two or more bands cross the body; otherwise the pattern whose marks are
    most off the body colour, against its body area.

    Bands and a contrast rather than an overlap: a generated pattern is blurred into the body
    at its edges, so its marks are sparse, and thin stripes are easily misaligned by a pixel.
    """
    if _bands(off_body) >= 2:
        return "stripes"

    def contrast(pattern: str) -> float:
        marks, body = _pattern_templates()[pattern]
        return (off_body * marks).sum() / marks.sum() - (off_body * body).sum() / body.sum()

    return max(PATTERNS, key=contrast)


def detect_parts(image: Image.Image | np.ndarray) -> ToyParts:
    """The body colour, accent colour and pattern of the toy in `image` (an RGB picture)."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    mask = object_mask(pixels)
    labels = palette_labels(pixels, mask)
    counts = np.bincount(labels[labels >= 0], minlength=len(_NAMES))
    if counts.sum() < _MIN_OBJECT_PIXELS:
        return ToyParts(None, None, None)
    body = counts.argmax()
    marks = (labels >= 0) & (labels != body)
    if marks.sum() < _MIN_ACCENT_SHARE * counts.sum():
        return ToyParts(_NAMES[body], None, None)
    box = bounding_box(mask)
    # The accent is read from the ears, solid discs at the top: a thin pattern blurs into the
    # body (yellow stripes on red read as orange), the ears much less.
    ears = marks.copy()
    ears[box[0] + int(_EAR_BAND * (box[1] - box[0])) :] = False
    accent = np.bincount(labels[ears if ears.sum() >= _MIN_EAR_PIXELS else marks]).argmax()
    pattern = _pattern(_crop(mask & (labels != body), box))
    return ToyParts(_NAMES[body], _NAMES[accent], pattern)


#: The toys of the parts check (body, accent, pattern): every pattern, every colour as a body
#: and as an accent; none of the held-out demo toys.
PART_PROMPTS: tuple[tuple[str, str, str], ...] = tuple(
    toy
    for toy in (
        (body, _NAMES[(position + step) % len(_NAMES)], PATTERNS[(position + step) % len(PATTERNS)])
        for step in (1, 3)
        for position, body in enumerate(_NAMES)
    )
    if toy not in HELD_OUT_TOYS
)


@dataclass
class PartsReport:
    """Hit rates of generated toys against the parts their prompts name.

    Attributes:
        color, accent, pattern (`float`): share of pictures right on that part.
        accuracy (`float`): share right on all three.
        count (`int`): pictures scored.
    """

    color: float
    accent: float
    pattern: float
    accuracy: float
    count: int

    def summary(self) -> str:
        return (
            f"{self.count} toys: body colour {self.color:.0%} (chance 17%), accent "
            f"{self.accent:.0%} (20%), pattern {self.pattern:.0%} (33%), all three "
            f"{self.accuracy:.0%}"
        )


def evaluate_parts(
    pipe, per_prompt: int = 2, steps: int = 20, guidance: float = 5.0, seed: int = 1234
) -> PartsReport:
    """Generate `per_prompt` toys for each of `PART_PROMPTS` and score their parts."""
    hits = {"color": 0, "accent": 0, "pattern": 0, "all": 0}
    for body, accent, pattern in PART_PROMPTS:
        prompt = toy_prompt(body, accent, pattern)
        for image in draw_batch(pipe, prompt, per_prompt, steps, guidance, seed):
            found = detect_parts(image)
            hits["color"] += found.color == body
            hits["accent"] += found.accent == accent
            hits["pattern"] += found.pattern == pattern
            hits["all"] += found == ToyParts(body, accent, pattern)
    count = len(PART_PROMPTS) * per_prompt
    return PartsReport(
        hits["color"] / count,
        hits["accent"] / count,
        hits["pattern"] / count,
        hits["all"] / count,
        count,
    )
