"""Does the base model draw what the prompt says? A measurable answer.

Each generated picture is read back by a small detector built from the project's own drawing
code: the object is the strongly coloured part of the picture (backgrounds are pale); its
colour is the palette colour most of the object's pixels are nearest to; its shape is the
drawn template (circle, square, triangle, toy) whose silhouette overlaps the object's
silhouette best, after both are cropped to their bounding box. On the training pictures
themselves the detector is right nearly every time, so on generated pictures its hit rate
measures prompt following: chance is 1/6 for colour and 1/4 for shape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from helpers.workshop.basemodel.drawing import COLORS, SHAPES, Scene, draw, prompt_for

_TEMPLATE_SIZE = 24
_MIN_OBJECT_PIXELS = 16
_MIN_SATURATION = 70.0
_FRAME = 2
#: A pixel counts for a colour only when it is this much nearer to it than to the next one.
_CLEAR_RATIO = 0.6


@dataclass(frozen=True)
class Detection:
    """What the detector sees in one picture (`None` fields: no object found)."""

    color: str | None
    shape: str | None


@dataclass
class PromptFollowingReport:
    """Hit rates of generated pictures against their prompts.

    Attributes:
        color_accuracy (`float`): share of pictures whose object has the prompt's colour.
        shape_accuracy (`float`): share of pictures whose object has the prompt's shape.
        accuracy (`float`): share right on both.
        per_prompt (`dict[str, float]`): share right on both, per prompt.
        count (`int`): pictures scored.
    """

    color_accuracy: float
    shape_accuracy: float
    accuracy: float
    count: int
    per_prompt: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.count} pictures: colour {self.color_accuracy:.0%} (chance 17%), "
            f"shape {self.shape_accuracy:.0%} (chance 25%), both {self.accuracy:.0%}"
        )


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a non-empty mask's pixels, ends exclusive."""
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def crop_to_box(mask: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """`mask` within `box` (`bounding_box`), resized bilinearly to `size` x `size`: 0-255."""
    top, bottom, left, right = box
    crop = mask[top:bottom, left:right].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR))


def _silhouette(mask: np.ndarray) -> np.ndarray | None:
    """The mask cropped to its bounding box and resized to the template size."""
    if np.count_nonzero(mask) < _MIN_OBJECT_PIXELS:
        return None
    return crop_to_box(mask, bounding_box(mask), _TEMPLATE_SIZE) > 127


def object_mask(pixels: np.ndarray) -> np.ndarray:
    """Pixels of strong colour: the objects are saturated, the backgrounds pale. A thin frame
    is left out, because the VAE leaves faint coloured fringes along the picture's edges."""
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    mask = saturation > _MIN_SATURATION
    mask[:_FRAME] = mask[-_FRAME:] = False
    mask[:, :_FRAME] = mask[:, -_FRAME:] = False
    return mask


@functools.cache
def _templates() -> dict[str, np.ndarray]:
    out = {}
    for shape in SHAPES:
        picture = draw(Scene(shape, "blue", (32.0, 32.0), 56.0, (255, 255, 255)))
        out[shape] = _silhouette(object_mask(np.asarray(picture, dtype=np.float32)))
    return out


def palette_labels(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per pixel: the index (in `COLORS`) of its nearest palette colour, or -1.

    Only pixels of `mask` that are clearly nearer to one colour than to the next count: the
    blended pixels along the edge between two colours (purple against yellow reads as
    orange) are left out.
    """
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    distances = np.linalg.norm(pixels[..., None, :] - palette, axis=-1)
    nearest = np.sort(distances, axis=-1)
    clear = mask & (nearest[..., 0] < _CLEAR_RATIO * nearest[..., 1])
    return np.where(clear, distances.argmin(axis=-1), -1)


def detect(image: Image.Image | np.ndarray) -> Detection:
    """The colour and shape of the object in `image` (an RGB picture of the base's world).

    The colour is the most frequent one among the object's pixels: a toy's body, not its
    ears and pattern.
    """
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    mask = object_mask(pixels)
    silhouette = _silhouette(mask)
    labels = palette_labels(pixels, mask)
    if silhouette is None or not (labels >= 0).any():
        return Detection(None, None)
    color = list(COLORS)[np.bincount(labels[labels >= 0]).argmax()]
    templates = _templates()

    def iou(shape: str) -> float:
        template = templates[shape]
        return (silhouette & template).sum() / max((silhouette | template).sum(), 1)

    return Detection(color, max(SHAPES, key=iou))


def score(images_by_class: dict[tuple[str, str], list[Image.Image]]) -> PromptFollowingReport:
    """Score pictures generated for each `(color, shape)` prompt."""
    color_hits = shape_hits = both = total = 0
    per_prompt = {}
    for (color, shape), images in images_by_class.items():
        hits = 0
        for image in images:
            found = detect(image)
            color_hits += found.color == color
            shape_hits += found.shape == shape
            hits += found.color == color and found.shape == shape
        both += hits
        total += len(images)
        per_prompt[prompt_for(color, shape)] = hits / max(len(images), 1)
    return PromptFollowingReport(
        color_accuracy=color_hits / total,
        shape_accuracy=shape_hits / total,
        accuracy=both / total,
        count=total,
        per_prompt=per_prompt,
    )


def evaluate_pipeline(
    pipe, per_prompt: int = 4, steps: int = 20, guidance: float = 5.0, seed: int = 1234
) -> PromptFollowingReport:
    """Generate `per_prompt` pictures for every (colour, shape) prompt and score them.

    Args:
        pipe (`StableDiffusionPipeline`): the base pipeline (64x64).
        per_prompt (`int`, defaults to 4): pictures per prompt (one batch per prompt).
        steps (`int`, defaults to 20): denoising steps.
        guidance (`float`, defaults to 5.0): classifier-free guidance scale.
        seed (`int`, defaults to 1234): the generator seed, so scores are repeatable.
    """
    images = {
        (color, shape): draw_batch(
            pipe, prompt_for(color, shape), per_prompt, steps, guidance, seed
        )
        for color in COLORS
        for shape in SHAPES
    }
    return score(images)


def draw_batch(
    pipe, prompt: str, count: int, steps: int, guidance: float, seed: int
) -> list[Image.Image]:
    """`count` 64x64 pictures of `prompt` in one batch, from one CPU generator seeded `seed`."""
    import torch

    return pipe(
        prompt,
        num_images_per_prompt=count,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
    ).images
