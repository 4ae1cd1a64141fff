"""Validation of uploaded instance photos: every bad input is refused with a clear problem."""

from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from helpers.services.instance_images import (
    ALL_FILES,
    DEFAULT_MAX_PIXELS,
    ImageRules,
    InstanceImageError,
    Problem,
    ValidatedImage,
    normalize,
    validate_directory,
    validate_images,
)

ONE = ImageRules(min_images=1)


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noise(size: int = 96, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Random pixels: they compress badly, so files are big enough to truncate."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def photos(count: int, fmt: str = "PNG") -> list[tuple[str, bytes]]:
    return [(f"{i:02d}.{fmt.lower()}", encode(noise(seed=i), fmt)) for i in range(count)]


def with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """`png` with its IHDR declaring `width` x `height` (CRC fixed), pixel data unchanged."""
    start = png.index(b"IHDR")
    chunk = bytearray(png[start : start + 17])
    chunk[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(chunk)))
    return png[:start] + bytes(chunk) + crc + png[start + 21 :]


def bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A 100-byte PNG declaring `width` x `height` grayscale pixels; nothing large is built."""
    return with_ihdr_size(encode(Image.new("L", (64, 64))), width, height)


def problems_of(items, rules: ImageRules = ONE) -> list[Problem]:
    with pytest.raises(InstanceImageError) as caught:
        validate_images(items, rules)
    return caught.value.problems


def fields_by_file(problems: list[Problem]) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for problem in problems:
        result.setdefault(problem.file, set()).add(problem.field)
    return result


# --- the happy path ---------------------------------------------------------------------------


def test_valid_photos_of_every_format_and_mode_become_rgb():
    rgba = noise(seed=1, mode="RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent: becomes white
    items = [
        ("rgb.png", encode(noise(seed=0))),
        ("rgba.png", encode(rgba)),
        ("palette.png", encode(noise(seed=2, mode="P"))),
        ("gray.jpg", encode(noise(seed=3, mode="L"), "JPEG")),
        ("photo.jpeg", encode(noise(seed=4), "JPEG", quality=90)),
        ("photo.webp", encode(noise(seed=5), "WEBP")),
    ]
    images = validate_images(items)
    assert [i.name for i in images] == [name for name, _ in items]
    assert [i.format for i in images] == ["PNG", "PNG", "PNG", "JPEG", "JPEG", "WEBP"]
    assert [i.mode for i in images] == ["RGB", "RGBA", "P", "L", "RGB", "RGB"]
    assert all(i.image.mode == "RGB" and i.image.size == (96, 96) for i in images)
    assert all(i.size == (96, 96) and len(i.sha256) == 64 for i in images)
    assert images[1].image.getpixel((0, 0)) == (255, 255, 255)
    assert images[1].image.getpixel((1, 1)) == rgba.getpixel((1, 1))[:3]
    assert np.array_equal(np.asarray(images[0].image), np.asarray(noise(seed=0)))


def test_a_mapping_of_names_to_bytes_is_accepted():
    images = validate_images(dict(photos(3)))
    assert [i.name for i in images] == ["00.png", "01.png", "02.png"]


def test_exif_orientation_is_applied_and_metadata_dropped():
    wide = noise(size=96).crop((0, 0, 96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    (image,) = validate_images([("phone.jpg", encode(wide, "JPEG", exif=exif))], ONE)
    assert image.size == (96, 64)
    assert image.image.size == (64, 96)
    assert "exif" not in image.image.info


def test_camera_multi_picture_jpeg_counts_as_jpeg():
    frames = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    data = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    (image,) = validate_images([("camera.jpg", data)], ONE)
    assert image.format == "JPEG"


# --- one bad input at a time ------------------------------------------------------------------


def test_a_text_file_named_png_is_not_an_image():
    (problem,) = problems_of([("notes.png", b"these are not pixels\n" * 10)])
    assert (problem.file, problem.field) == ("notes.png", "format")
    assert "not an image" in problem.reason
    assert problem.allowed == "PNG, JPEG, WEBP"


def test_an_empty_file_is_refused():
    (problem,) = problems_of([("empty.png", b"")])
    assert (problem.field, problem.reason) == ("bytes", "the file is empty")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_a_truncated_file_is_caught_by_decoding(fmt, keep):
    data = encode(noise(), fmt)
    (problem,) = problems_of([("cut", data[: int(len(data) * keep)])])
    assert problem.field == "content"
    assert "truncated" in problem.reason.lower()
    assert problem.allowed == f"a complete {fmt} file"


def test_a_jpeg_missing_only_its_end_marker_is_refused():
    data = encode(noise(), "JPEG")
    (problem,) = problems_of([("no-eoi.jpg", data[:-2])])
    assert problem.field == "content"


def test_a_png_with_a_corrupt_header_is_named_as_such():
    data = bytearray(encode(noise()))
    data[19] ^= 0xFF  # a byte of the width: the IHDR checksum no longer matches
    (problem,) = problems_of([("broken.png", bytes(data))])
    assert problem.field == "content"
    assert problem.reason == "looks like PNG but its header is corrupt"


def test_a_jpeg_with_a_corrupt_header_is_refused():
    data = encode(noise(), "JPEG")
    (problem,) = problems_of([("broken.jpg", data[:4] + b"\xff" * 30)])
    assert problem.field == "content"
    assert problem.allowed == "a complete JPEG file"


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (encode(noise(), "GIF"), "GIF"),
        (encode(noise(), "BMP"), "BMP"),
        (b"\x00\x00\x00\x18ftypheic" + bytes(64), "HEIC"),
    ],
)
def test_other_formats_are_named_and_refused(data, name):
    (problem,) = problems_of([("photo", data)])
    assert (problem.field, problem.reason) == ("format", f"{name} is not accepted")


def test_an_image_with_a_short_side_is_too_small():
    (problem,) = problems_of([("thumb.png", encode(noise(size=96).crop((0, 0, 96, 40))))])
    assert (problem.field, problem.reason) == ("size", "96x40 pixels is too small")
    assert "at least 64 pixels" in problem.allowed


def test_a_decompression_bomb_is_refused_by_pillows_guard():
    data = bomb(30000, 30000)
    assert len(data) < 200
    (problem,) = problems_of([("bomb.png", data)])
    assert problem.field == "pixels"
    assert "16,777,216" in problem.allowed


def test_pillows_guard_is_lowered_to_the_photo_limit_for_the_whole_process():
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS == ImageRules().max_pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb(6000, 6000)))  # any code in the process, not only ours


def test_a_bomb_in_pillows_warning_zone_is_refused_with_or_without_the_warning():
    data = bomb(5000, 5000)  # between MAX_IMAGE_PIXELS and twice that: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning):
        (problem,) = problems_of([("bomb.png", data)])
    assert (problem.field, problem.reason) == ("pixels", "5000x5000 is 25,000,000 pixels")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (problem,) = problems_of([("bomb.png", data)])
    assert problem.field == "pixels"


def test_a_bomb_is_never_decoded_even_without_pillows_guard(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    problems = problems_of([("bomb.png", bomb(30000, 30000)), ("big.png", bomb(5000, 5000))])
    assert [(p.file, p.field) for p in problems] == [("bomb.png", "pixels"), ("big.png", "pixels")]
    assert problems[0].reason == "30000x30000 is 900,000,000 pixels"
    assert decoded == []


def test_files_over_the_total_pixel_budget_are_refused_before_any_is_decoded(monkeypatch):
    """Ten 16.7 MP PNGs of a few hundred bytes each would decode to about 1 GB."""
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    items = [(f"{i}.png", bomb(4096, 4096 - i)) for i in range(10)]
    assert sum(len(data) for _, data in items) < 5000
    (problem,) = problems_of(items, ImageRules(max_images=10))
    assert (problem.file, problem.field) == (ALL_FILES, "total_pixels")
    assert problem.reason == f"{sum(4096 * (4096 - i) for i in range(10)):,} pixels in all"
    assert problem.allowed.startswith(f"at most {8 * 4096 * 4096:,} pixels")
    assert decoded == []


def test_files_within_the_total_pixel_budget_are_decoded():
    items = photos(3)  # 96 x 96 each
    assert len(validate_images(items, ImageRules(max_total_pixels=3 * 96 * 96))) == 3
    (problem,) = problems_of(items, ImageRules(max_total_pixels=3 * 96 * 96 - 1))
    assert problem.field == "total_pixels"


def test_a_file_over_max_bytes_is_refused_before_decoding():
    rules = ImageRules(min_images=1, max_bytes=1000)
    (problem,) = problems_of([("large.png", encode(noise()))], rules)
    assert problem.field == "bytes"
    assert "too large" in problem.reason
    assert problem.allowed == "1 byte to 1,000 bytes per file"


def test_an_upload_over_max_total_bytes_is_refused():
    items = photos(3)
    rules = ImageRules(max_total_bytes=sum(len(data) for _, data in items) - 1)
    (problem,) = problems_of(items, rules)
    assert (problem.file, problem.field) == (ALL_FILES, "total_bytes")


@pytest.mark.parametrize(("count", "reason"), [(0, "0 images"), (2, "2 images"), (11, "11 images")])
def test_too_few_or_too_many_images(count, reason):
    (problem,) = problems_of(photos(count), ImageRules())
    assert (problem.file, problem.field, problem.reason) == (ALL_FILES, "count", reason)
    assert problem.allowed == "3 to 10 images"


@pytest.mark.parametrize(
    ("image", "fmt", "mode"),
    [
        (Image.new("CMYK", (64, 64), (0, 50, 100, 0)), "JPEG", "CMYK"),
        (Image.new("I;16", (64, 64), 1000), "PNG", "I;16"),
        (Image.new("1", (64, 64), 1), "PNG", "1"),
    ],
)
def test_unsupported_modes_are_refused(image, fmt, mode):
    (problem,) = problems_of([("odd", encode(image, fmt))])
    assert problem.field == "mode"
    assert problem.reason.startswith(f"{mode} (")
    assert problem.allowed == "RGB, RGBA, L, P"


def test_allowing_another_mode_converts_it():
    rules = ImageRules(min_images=1, modes=("RGB", "1"))
    (image,) = validate_images([("bw.png", encode(Image.new("1", (64, 64), 1)))], rules)
    assert image.image.getpixel((0, 0)) == (255, 255, 255)


def test_duplicate_content_and_names_are_refused():
    items = photos(3)
    items += [("copy.png", items[0][1]), ("01.png", encode(noise(seed=9)))]
    problems = problems_of(items)
    assert [(p.file, p.field) for p in problems] == [("01.png", "name"), ("copy.png", "duplicate")]
    assert problems[1].reason == "same content as 00.png"


# --- all problems at once ---------------------------------------------------------------------


def test_the_error_lists_every_problem_with_every_file():
    items = [
        ("good.png", encode(noise(seed=1))),
        ("notes.png", b"hello"),
        ("cut.jpg", encode(noise(), "JPEG")[:1500]),
        ("thumb.png", encode(noise(size=32))),
        ("bomb.png", bomb()),
        ("cmyk.jpg", encode(Image.new("CMYK", (64, 64)), "JPEG")),
        ("small-cmyk.jpg", encode(Image.new("CMYK", (16, 16)), "JPEG")),
        ("again.png", encode(noise(seed=1))),
        ("empty.webp", b""),
        ("a.gif", encode(noise(), "GIF")),
        ("big.png", encode(noise(size=200))),
    ]
    rules = ImageRules(max_images=10, max_bytes=60_000)
    with pytest.raises(InstanceImageError) as caught:
        validate_images(items, rules)
    error = caught.value
    assert isinstance(error, ValueError)
    assert fields_by_file(error.problems) == {
        ALL_FILES: {"count"},
        "notes.png": {"format"},
        "cut.jpg": {"content"},
        "thumb.png": {"size"},
        "bomb.png": {"pixels"},
        "cmyk.jpg": {"mode"},
        "small-cmyk.jpg": {"size", "mode"},
        "again.png": {"duplicate"},
        "empty.webp": {"bytes"},
        "a.gif": {"format"},
        "big.png": {"bytes"},
    }
    message = str(error)
    assert message.startswith(f"{len(error.problems)} problems with the instance images:")
    for problem in error.problems:
        assert (
            f"{problem.file}: {problem.field}: {problem.reason} (allowed: {problem.allowed})"
            in (message)
        )
    assert all(problem.reason and problem.allowed for problem in error.problems)
    assert error.details()[0] == {
        "file": ALL_FILES,
        "field": "count",
        "reason": "11 images",
        "allowed": "3 to 10 images",
    }
    assert pickle.loads(pickle.dumps(error)).problems == error.problems


# --- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (b"abc", "items"),
        ([("a.png", "not bytes")], r"items\[0\]"),
        ([("a.png",)], r"items\[0\]"),
        ([(1, b"x")], r"items\[0\]"),
    ],
)
def test_malformed_items_raise_value_error_naming_them(items, message):
    with pytest.raises(ValueError, match=message) as caught:
        validate_images(items)
    assert not isinstance(caught.value, InstanceImageError)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"min_images": 0}, "min_images"),
        ({"min_images": 5, "max_images": 4}, "max_images"),
        ({"max_bytes": -1}, "max_bytes"),
        ({"max_pixels": 100}, "max_pixels"),
        ({"max_total_pixels": 100}, "max_total_pixels"),
        ({"max_total_pixels": True}, "max_total_pixels"),
        ({"formats": ()}, "formats"),
        ({"modes": "RGB"}, "modes"),
    ],
)
def test_rules_check_their_values(change, name):
    with pytest.raises(ValueError, match=name):
        ImageRules(**change)


def test_rules_formats_are_upper_cased():
    assert ImageRules(formats=("png",)).formats == ("PNG",)


# --- directories ------------------------------------------------------------------------------


def test_validate_directory_reads_files_in_name_order_and_skips_hidden(tmp_path):
    for name, data in reversed(photos(3)):
        (tmp_path / name).write_bytes(data)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    images = validate_directory(tmp_path)
    assert [i.name for i in images] == ["00.png", "01.png", "02.png"]


def test_validate_directory_refuses_links_folders_and_large_files(tmp_path):
    items = photos(3)
    for name, data in items:
        (tmp_path / name).write_bytes(data)
    (tmp_path / "link.png").symlink_to(tmp_path / "00.png")
    (tmp_path / "more").mkdir()
    limit = max(len(data) for _, data in items)
    (tmp_path / "huge.png").write_bytes(b"\x89PNG" + bytes(limit + 1000))
    with pytest.raises(InstanceImageError) as caught:
        validate_directory(tmp_path, ImageRules(max_bytes=limit))
    problems = caught.value.problems
    assert fields_by_file(problems) == {
        "link.png": {"file"},
        "more": {"file"},
        "huge.png": {"bytes"},
    }
    by_file = {p.file: p for p in problems}
    assert by_file["link.png"].reason == "is a symbolic link"
    assert by_file["more"].reason == "is a directory"
    assert f"{limit + 1004:,} bytes" in by_file["huge.png"].reason


def test_validate_directory_needs_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        validate_directory(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="path"):
        validate_directory(tmp_path / "file")


def test_validation_writes_nothing(tmp_path):
    for name, data in photos(3):
        (tmp_path / name).write_bytes(data)
    before = sorted(p.name for p in tmp_path.iterdir())
    validate_directory(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --- normalize --------------------------------------------------------------------------------


def test_normalize_gives_numbered_rgb_pngs_of_the_same_pixels():
    images = validate_images([*photos(3, "WEBP"), ("gray.png", encode(noise(seed=7, mode="L")))])
    files = normalize(images)
    assert [name for name, _ in files] == ["00.png", "01.png", "02.png", "03.png"]
    for (_, data), validated in zip(files, images, strict=True):
        with Image.open(io.BytesIO(data)) as stored:
            assert (stored.format, stored.mode, stored.size) == ("PNG", "RGB", (96, 96))
            assert np.array_equal(np.asarray(stored), np.asarray(validated.image))
            assert not {"exif", "icc_profile"} & set(stored.info)


def test_normalize_centre_crops_and_resizes_when_asked():
    wide = encode(noise(size=128).crop((0, 0, 128, 80)))
    (image,) = validate_images([("wide.png", wide)], ONE)
    ((_, data),) = normalize([image], resolution=64)
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.size == (64, 64)
    with pytest.raises(ValueError, match="resolution"):
        normalize([image], resolution=0)
    with pytest.raises(ValueError, match=r"images\[0\]"):
        normalize([image.image])  # type: ignore[list-item]


def test_validated_image_repr_leaves_out_pixels():
    (image,) = validate_images(photos(1), ONE)
    assert isinstance(image, ValidatedImage)
    assert "image=" not in repr(image)


def test_validate_prefix_reads_a_store_folder_like_a_directory(tmp_path):
    from helpers.infra.local.store import LocalArtifactStore
    from helpers.services.instance_images import validate_prefix

    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket("photos")
    items = photos(3)
    for name, data in reversed(items):
        store.put_bytes(f"s3://photos/ada/{name}", data)
    store.put_bytes("s3://photos/ada/.DS_Store", b"\x00\x01")
    store.put_bytes("s3://photos/ada-other/99.png", items[0][1])  # a neighbour, not inside
    images = validate_prefix(store, "s3://photos/ada/")
    assert [i.name for i in images] == ["00.png", "01.png", "02.png"]
    assert [i.sha256 for i in images] == [i.sha256 for i in validate_images(items)]

    limit = max(len(data) for _, data in items)
    store.put_bytes("s3://photos/ada/huge.png", b"\x89PNG" + bytes(limit + 1000))
    store.put_bytes("s3://photos/ada/more/03.png", items[0][1])
    store.put_bytes("s3://photos/ada/more/04.png", items[1][1])
    store.put_bytes("s3://photos/ada/notes.txt", b"not a photo")
    with pytest.raises(InstanceImageError) as caught:
        validate_prefix(store, "s3://photos/ada", ImageRules(max_bytes=limit))
    assert fields_by_file(caught.value.problems) == {
        "more": {"file"},
        "huge.png": {"bytes"},
        "notes.txt": {"format"},
    }


def test_validate_prefix_needs_something_stored_and_an_s3_uri(tmp_path):
    from helpers.infra.local.store import LocalArtifactStore
    from helpers.services.instance_images import validate_prefix

    store = LocalArtifactStore(tmp_path / "store")
    store.create_bucket("photos")
    with pytest.raises(FileNotFoundError, match="nothing is stored under 's3://photos/none'"):
        validate_prefix(store, "s3://photos/none")
    with pytest.raises(ValueError, match="must start with 's3://'"):
        validate_prefix(store, "/home/ada/photos")
