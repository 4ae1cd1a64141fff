"""Demo subjects: distinct toys, drawn deterministically in varied scenes."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from helpers.workshop.basemodel.drawing import COLORS, PATTERNS, draw
from helpers.workshop.demo_subjects import (
    DEMO_SUBJECTS,
    DemoSubject,
    contact_sheet,
    get_demo_subject,
    subject_images,
    subject_scenes,
    write_subject_images,
)


def _foreground(image: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    """The pixels that clearly differ from the background, as an (n, 3) int array."""
    pixels = np.asarray(image).astype(int)
    return pixels[np.abs(pixels - np.array(background)).sum(-1) > 60]


def _share(pixels: np.ndarray, color: str) -> float:
    """Fraction of `pixels` within a small distance of palette colour `color`."""
    return float((np.abs(pixels - np.array(COLORS[color])).sum(-1) < 40).mean())


def _histogram(images: list[Image.Image]) -> np.ndarray:
    """A normalised 4x4x4 colour histogram over all of `images`."""
    pixels = np.concatenate([np.asarray(image).reshape(-1, 3) for image in images]) // 64
    counts = np.bincount(pixels[:, 0] * 16 + pixels[:, 1] * 4 + pixels[:, 2], minlength=64)
    return counts / counts.sum()


def test_demo_subjects_differ_in_colour_accent_and_pattern():
    assert len(DEMO_SUBJECTS) >= 2
    for field in ("user_id", "color", "accent", "pattern"):
        assert len({getattr(s, field) for s in DEMO_SUBJECTS}) == len(DEMO_SUBJECTS), field
    # none shares a colour with another, and none is the base model's colour for "sks"
    colors = [c for s in DEMO_SUBJECTS for c in (s.color, s.accent)]
    assert len(set(colors)) == len(colors) and "green" not in colors
    for subject in DEMO_SUBJECTS:
        assert subject.instance_prompt == "a photo of sks toy"
        assert subject.class_prompt == "a photo of a toy"
        assert subject.pattern in PATTERNS
        assert get_demo_subject(subject.user_id) is subject
    with pytest.raises(KeyError, match="demo-ada"):
        get_demo_subject("nobody")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"user_id": "Demo Ada"}, "user_id"),
        ({"color": "pink"}, "color"),
        ({"accent": "purple"}, "accent"),
        ({"pattern": "spots"}, "pattern"),
        ({"instance_prompt": " "}, "instance_prompt"),
    ],
)
def test_demo_subject_rejects_bad_fields(change, message):
    fields = {
        "user_id": "demo-x",
        "display_name": "X",
        "description": "a toy",
        "color": "purple",
        "accent": "yellow",
        "pattern": "stripes",
    }
    with pytest.raises(ValueError, match=message):
        DemoSubject(**{**fields, **change})


def test_images_are_deterministic_and_of_the_requested_count():
    subject = DEMO_SUBJECTS[0]
    first = subject_images(subject, count=4, seed=7)
    again = subject_images(subject, count=4, seed=7)
    other = subject_images(subject, count=4, seed=8)
    assert len(first) == 4
    assert all(image.mode == "RGB" and image.size == (64, 64) for image in first)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True)
    )
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    big = subject_images(subject, count=1, seed=7, resolution=128)[0]
    assert big.size == (128, 128)
    with pytest.raises(ValueError, match="count"):
        subject_images(subject, count=0)


def test_images_vary_in_position_size_and_background():
    scenes = subject_scenes(DEMO_SUBJECTS[1], count=5, seed=0)
    assert len({scene.background for scene in scenes}) == 5
    assert len({scene.center for scene in scenes}) == 5
    assert max(s.size for s in scenes) - min(s.size for s in scenes) > 5
    images = subject_images(DEMO_SUBJECTS[1], count=5, seed=0)
    arrays = [np.asarray(image) for image in images]
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(arrays, 2))


@pytest.mark.parametrize("subject", DEMO_SUBJECTS, ids=lambda s: s.user_id)
def test_each_photo_shows_the_subjects_body_and_accent_colours(subject):
    scenes = subject_scenes(subject, count=5, seed=0)
    for scene, image in zip(scenes, subject_images(subject, count=5, seed=0), strict=True):
        toy = _foreground(image, scene.background)
        assert len(toy) > 200
        shares = {color: _share(toy, color) for color in COLORS}
        assert max(shares, key=shares.get) == subject.color
        assert shares[subject.color] > 0.3
        assert shares[subject.accent] > 0.04
        others = set(COLORS) - {subject.color, subject.accent}
        assert all(shares[color] < 0.01 for color in others)


@pytest.mark.parametrize("subject", DEMO_SUBJECTS, ids=lambda s: s.user_id)
def test_each_subject_differs_from_a_plain_toy_of_its_colour(subject):
    for scene in subject_scenes(subject, count=3, seed=0):
        plain = replace(scene, accent=None, pattern=None)
        toy = _foreground(draw(scene), scene.background)
        plain_toy = _foreground(draw(plain), scene.background)
        assert _share(toy, subject.accent) > 0.04
        assert _share(plain_toy, subject.accent) < 0.01


def test_subjects_are_pairwise_distinct_by_colour_histogram():
    histograms = [_histogram(subject_images(s, count=5, seed=0)) for s in DEMO_SUBJECTS]
    for a, b in itertools.combinations(histograms, 2):
        assert np.abs(a - b).sum() > 0.2


def test_write_subject_images_writes_readable_pngs(tmp_path):
    subject = DEMO_SUBJECTS[-1]
    paths = write_subject_images(subject, tmp_path / "ada", count=3, seed=1)
    assert [p.name for p in paths] == ["00.png", "01.png", "02.png"]
    expected = subject_images(subject, count=3, seed=1)
    for path, image in zip(paths, expected, strict=True):
        with Image.open(path) as written:
            assert written.format == "PNG"
            assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(image))


def test_contact_sheet_has_a_row_per_subject():
    sheet = contact_sheet(count=2, scale=1)
    assert sheet.size == (2 * 66 + 2, len(DEMO_SUBJECTS) * 66 + 2)
