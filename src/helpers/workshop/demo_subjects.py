"""Demo users for Phase A: two distinct toys drawn in the base model's world, no download.

Each demo subject is a teddy of one body colour with ears and a pattern (belly, stripes or a
bowtie) in an accent colour, so it is a *particular* toy: the base model knows "a purple toy"
and "yellow stripes", but has never seen this purple toy with yellow stripes. A user's instance
photos are the same toy drawn in varied positions, sizes and backgrounds, like 3-10 snapshots
of one subject.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.domain.records import check_id
from helpers.workshop.basemodel import drawing


@dataclass(frozen=True)
class DemoSubject:
    """One demo user and the toy they photograph.

    Args:
        user_id (`str`):
            The user's id (1-64 of `a-z`, `0-9`, `-`, `_`), e.g. `"demo-ada"`.
        display_name (`str`):
            A name to show in notebooks.
        description (`str`):
            What the toy looks like, in words.
        color (`str`):
            The toy's body colour, one of `drawing.COLORS`.
        accent (`str`):
            The colour of its ears and pattern, one of `drawing.COLORS`, not `color`.
        pattern (`str`):
            What the accent colour draws on the body, one of `drawing.PATTERNS`.
        instance_prompt (`str`, *optional*, defaults to `"a photo of sks toy"`):
            The DreamBooth prompt with the rare identifier that binds to this toy.
        class_prompt (`str`, *optional*, defaults to `"a photo of a toy"`):
            The prompt for the toy's class (prior preservation, before/after samples).
    """

    user_id: str
    display_name: str
    description: str
    color: str
    accent: str
    pattern: str
    instance_prompt: str = "a photo of sks toy"
    class_prompt: str = "a photo of a toy"

    def __post_init__(self) -> None:
        check_id("user_id", self.user_id)
        for name in ("color", "accent"):
            if getattr(self, name) not in drawing.COLORS:
                raise ValueError(
                    f"{name} must be one of {sorted(drawing.COLORS)}, got {getattr(self, name)!r}"
                )
        if self.accent == self.color:
            raise ValueError(f"accent must differ from color, both are {self.color!r}")
        if self.pattern not in drawing.PATTERNS:
            raise ValueError(f"pattern must be one of {drawing.PATTERNS}, got {self.pattern!r}")
        for name in ("display_name", "instance_prompt", "class_prompt"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name} must be a non-empty string")


#: Two toys that differ in body colour, accent colour and pattern. The base model knows every
#: part but never saw either toy (`drawing.HELD_OUT_TOYS`), so five photos only have to bind
#: "sks" to one combination of parts. Their body colours, purple and orange, are far apart in
#: hue, so the two stay tellable where fine-tuning pulls neighbouring hues together.
DEMO_SUBJECTS: tuple[DemoSubject, ...] = (
    DemoSubject(
        user_id="demo-ada",
        display_name="Ada",
        description="a purple teddy with yellow ears and yellow stripes across its body",
        color="purple",
        accent="yellow",
        pattern="stripes",
    ),
    DemoSubject(
        user_id="demo-bo",
        display_name="Bo",
        description="an orange teddy with blue ears and a blue bowtie",
        color="orange",
        accent="blue",
        pattern="bowtie",
    ),
)


def get_demo_subject(user_id: str) -> DemoSubject:
    """The demo subject whose `user_id` is given.

    Raises:
        KeyError: when no demo subject has that id (the message lists those that exist).
    """
    for subject in DEMO_SUBJECTS:
        if subject.user_id == user_id:
            return subject
    raise KeyError(f"no demo subject {user_id!r}; known: {[s.user_id for s in DEMO_SUBJECTS]}")


def subject_scenes(subject: DemoSubject, count: int = 5, seed: int = 0) -> list[drawing.Scene]:
    """The scenes of `subject`'s photos: its toy at random positions and sizes.

    Backgrounds take turns (from a random start), so any five photos have five backgrounds.
    Scenes are in `drawing.RESOLUTION` pixel units, which `drawing.draw` scales to any size.

    Args:
        subject (`DemoSubject`):
            Whose toy to place.
        count (`int`, *optional*, defaults to 5):
            How many scenes, at least 1.
        seed (`int`, *optional*, defaults to 0):
            The random seed; the same seed gives the same scenes.
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    rng = np.random.default_rng(seed)
    backgrounds = drawing.BACKGROUNDS
    start = int(rng.integers(len(backgrounds)))
    scenes = []
    for index in range(count):
        scene = drawing.random_scene(rng, shape="toy", color=subject.color)
        scenes.append(
            replace(
                scene,
                background=backgrounds[(start + index) % len(backgrounds)],
                accent=subject.accent,
                pattern=subject.pattern,
            )
        )
    return scenes


def subject_images(
    subject: DemoSubject, count: int = 5, seed: int = 0, resolution: int = drawing.RESOLUTION
) -> list[Image.Image]:
    """Draw `count` instance photos of `subject`: the same toy, varied layout and background.

    Args:
        subject (`DemoSubject`):
            Whose toy to draw.
        count (`int`, *optional*, defaults to 5):
            How many pictures, at least 1 (DreamBooth wants 3-10).
        seed (`int`, *optional*, defaults to 0):
            The random seed; the same seed gives the same pictures.
        resolution (`int`, *optional*, defaults to 64):
            Width and height of each RGB picture in pixels.

    Returns:
        `list[PIL.Image.Image]`: `count` RGB images of `resolution` x `resolution` pixels.
    """
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer of at least 8, got {resolution!r}")
    return [drawing.draw(scene, resolution) for scene in subject_scenes(subject, count, seed)]


def write_subject_images(
    subject: DemoSubject,
    directory: str | Path,
    count: int = 5,
    seed: int = 0,
    resolution: int = drawing.RESOLUTION,
) -> list[Path]:
    """Write `subject_images(...)` as `00.png`, `01.png`, ... into `directory` (created if
    missing), as a user would upload them.

    Args:
        subject (`DemoSubject`):
            Whose toy to draw.
        directory (`str` or `Path`):
            Where to write; existing files of the same names are replaced.
        count (`int`, *optional*, defaults to 5):
            How many pictures.
        seed (`int`, *optional*, defaults to 0):
            The random seed.
        resolution (`int`, *optional*, defaults to 64):
            Width and height of each picture in pixels.

    Returns:
        `list[Path]`: the written files, in order.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(subject_images(subject, count, seed, resolution)):
        path = directory / f"{index:02d}.png"
        image.save(path, format="PNG")
        paths.append(path)
    return paths


def contact_sheet(
    subjects: Sequence[DemoSubject] = DEMO_SUBJECTS,
    count: int = 5,
    seed: int = 0,
    resolution: int = drawing.RESOLUTION,
    scale: int = 2,
) -> Image.Image:
    """One RGB picture with a row of `count` photos per subject, for a quick look without
    matplotlib (pixels are enlarged `scale` times with nearest-neighbour scaling).

    Args:
        subjects (`Sequence[DemoSubject]`, *optional*, defaults to `DEMO_SUBJECTS`):
            One row each.
        count (`int`, *optional*, defaults to 5):
            Photos per row.
        seed (`int`, *optional*, defaults to 0):
            The random seed.
        resolution (`int`, *optional*, defaults to 64):
            Size of each photo before scaling.
        scale (`int`, *optional*, defaults to 2):
            Nearest-neighbour enlargement, at least 1.
    """
    if not subjects:
        raise ValueError("subjects must not be empty")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    cell, gap = resolution * scale, 2
    sheet = Image.new(
        "RGB", (count * (cell + gap) + gap, len(subjects) * (cell + gap) + gap), (255, 255, 255)
    )
    for row, subject in enumerate(subjects):
        for column, image in enumerate(subject_images(subject, count, seed, resolution)):
            enlarged = image.resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(enlarged, (gap + column * (cell + gap), gap + row * (cell + gap)))
    return sheet
