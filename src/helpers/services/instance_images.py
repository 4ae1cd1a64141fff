"""Checks on a user's uploaded instance photos, made before any training job starts.

A DreamBooth job that fails on its third photo has already cost a queue slot and a GPU start,
and its error sits in a training log the user never sees. So the upload is checked up front:
every file is opened, its header checked against `ImageRules` and then fully decoded, and
*every* problem is reported at once in an `InstanceImageError`, naming the file, what is wrong
and what is allowed. Nothing is written; a rejected upload leaves no trace.

Untrusted bytes are handled with care:

- Files over `max_bytes` are never decoded.
- Only the allowed formats' parsers see the bytes (`Image.open(..., formats=...)`).
- The pixel count is read from the header and checked against `max_pixels` *before* decoding,
  so a decompression bomb (a few KB declaring 30000 x 30000 pixels) is never expanded. Every
  header is read before any file is decoded, and the files' pixels together must stay within
  `max_total_pixels`: ten 16.7 MP PNGs of 50 KB each would otherwise decode to about 1 GB.
- Pillow's process-wide guard, `Image.MAX_IMAGE_PIXELS`, is lowered to `DEFAULT_MAX_PIXELS`
  on import (never raised), so any other code in the process that opens an untrusted image is
  protected too; nothing here needs more (generated images are at most 1024 x 1024). Should
  Pillow's guard fire first (`DecompressionBombError`), it is reported as the same problem.
- A file is decoded in full (`verify()` on one open, `load()` on a fresh one), so truncated or
  corrupt files are caught here, not in the training job. (This relies on Pillow's default
  `ImageFile.LOAD_TRUNCATED_IMAGES = False`; code that sets it to `True` lets truncated JPEGs
  through with grey bottoms.)
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from helpers.domain.uris import S3Uri

if TYPE_CHECKING:
    from helpers.ports.store import ArtifactStore

MiB = 1024 * 1024
#: The most pixels one photo may have by default: 4096 x 4096 (16.7 MP).
DEFAULT_MAX_PIXELS = 4096 * 4096

# Lowered, never raised: another part of the process may already have asked for less.
if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > DEFAULT_MAX_PIXELS:
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS

#: The `file` of a problem that concerns the upload as a whole (how many files, total size).
ALL_FILES = "(all files)"

#: Cameras' multi-picture JPEGs open as "MPO"; they are JPEG files and are reported as such.
_FORMAT_ALIASES = {"MPO": "JPEG"}

#: First bytes of formats that users upload, to name a format that cannot be opened.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (8, b"WEBP", "WEBP"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"%PDF", "PDF"),
)

#: Why a mode is refused, for the modes that photos come in.
_MODE_REASONS = {
    "CMYK": "CMYK colours shift when converted without the print profile; save it as RGB",
    "I;16": "16-bit pixels; save it with 8 bits per channel",
    "I": "32-bit integer pixels; save it with 8 bits per channel",
    "F": "floating-point pixels; save it with 8 bits per channel",
}


@dataclass(frozen=True)
class ImageRules:
    """What an upload of instance photos must satisfy.

    Args:
        min_images (`int`, *optional*, defaults to 3):
            Fewest photos; DreamBooth needs a few views of the subject.
        max_images (`int`, *optional*, defaults to 10):
            Most photos; more add little and cost upload and training time.
        max_bytes (`int`, *optional*, defaults to 10 MiB):
            Largest file in bytes; larger files are not decoded at all.
        max_total_bytes (`int`, *optional*, defaults to 50 MiB):
            Largest upload in bytes, all files together.
        min_side (`int`, *optional*, defaults to 64):
            Shortest allowed width or height in pixels (the local base model's resolution).
        max_pixels (`int`, *optional*, defaults to 4096 * 4096):
            Most pixels (width x height) a file may declare; checked from the header before
            decoding, so decompression bombs are never expanded. (Above twice Pillow's
            `Image.MAX_IMAGE_PIXELS`, Pillow refuses the file first; it is reported the same.)
        max_total_pixels (`int`, *optional*, defaults to 8 * 4096 * 4096):
            Most pixels of all files together (134 MP: ten 12 MP phone photos), checked from
            the headers before any file is decoded. Decoded RGB takes 3 bytes a pixel, so this
            bounds the memory one validation holds (about 400 MB by default).
        formats (`tuple[str, ...]`, *optional*, defaults to `("PNG", "JPEG", "WEBP")`):
            Pillow format names allowed; only their parsers see the bytes.
        modes (`tuple[str, ...]`, *optional*, defaults to `("RGB", "RGBA", "L", "P")`):
            Pillow modes allowed: 8-bit colour, colour with alpha, grayscale, palette. All are
            converted to RGB (transparency onto white). CMYK (colours would shift), 16-bit,
            32-bit and float pixels are refused with a hint to re-save the file.
    """

    min_images: int = 3
    max_images: int = 10
    max_bytes: int = 10 * MiB
    max_total_bytes: int = 50 * MiB
    min_side: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_total_pixels: int = 8 * DEFAULT_MAX_PIXELS
    formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    modes: tuple[str, ...] = ("RGB", "RGBA", "L", "P")

    def __post_init__(self) -> None:
        for name in ("min_images", "max_images", "max_bytes", "max_total_bytes", "min_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_images < self.min_images:
            raise ValueError(
                f"max_images ({self.max_images}) must be at least min_images ({self.min_images})"
            )
        if not isinstance(self.max_pixels, int) or self.max_pixels < self.min_side**2:
            raise ValueError(
                f"max_pixels must be an integer of at least min_side**2 ({self.min_side**2}), "
                f"got {self.max_pixels!r}"
            )
        total = self.max_total_pixels
        if not isinstance(total, int) or isinstance(total, bool) or total < self.min_side**2:
            raise ValueError(
                "max_total_pixels must be an integer of at least min_side**2 "
                f"({self.min_side**2}), got {total!r}"
            )
        for name in ("formats", "modes"):
            value = getattr(self, name)
            if isinstance(value, str) or not value or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a non-empty tuple of strings, got {value!r}")
        object.__setattr__(self, "formats", tuple(f.upper() for f in self.formats))
        object.__setattr__(self, "modes", tuple(self.modes))


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an upload.

    Args:
        file (`str`):
            The file's name, or `ALL_FILES` for the upload as a whole.
        field (`str`):
            What was checked: `count`, `total_bytes`, `total_pixels`, `name`, `file`,
            `bytes`, `format`, `content`, `pixels`, `size`, `mode` or `duplicate`.
        reason (`str`):
            What is wrong, with the file's actual value.
        allowed (`str`):
            What would be accepted.
    """

    file: str
    field: str
    reason: str
    allowed: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.reason} (allowed: {self.allowed})"


class InstanceImageError(ValueError):
    """An upload of instance photos was refused; `problems` lists every reason, per file."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        count = len(self.problems)
        lines = [f"{count} problem{'s' if count != 1 else ''} with the instance images:"]
        lines += [f"  - {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return (type(self), (self.problems,))

    def details(self) -> list[dict[str, str]]:
        """The problems as plain dicts, e.g. for an API's 422 response body."""
        return [vars(problem).copy() for problem in self.problems]


@dataclass(frozen=True)
class ValidatedImage:
    """An instance photo that passed every check.

    Args:
        name (`str`):
            The name it was uploaded under.
        image (`PIL.Image.Image`):
            The decoded photo, upright (EXIF orientation applied), RGB, without metadata.
        format (`str`):
            The file's format (`"PNG"`, `"JPEG"`, `"WEBP"`).
        mode (`str`):
            The file's Pillow mode before conversion to RGB.
        size (`tuple[int, int]`):
            The file's width and height as stored (before any EXIF rotation).
        sha256 (`str`):
            Hex digest of the file's bytes.
    """

    name: str
    image: Image.Image = field(repr=False)
    format: str
    mode: str
    size: tuple[int, int]
    sha256: str


@dataclass(frozen=True)
class _Upload:
    """A file to check: its bytes, or `None` when it was too large to read."""

    name: str
    nbytes: int
    data: bytes | None


def validate_images(
    items: Sequence[tuple[str, bytes]] | Mapping[str, bytes], rules: ImageRules | None = None
) -> list[ValidatedImage]:
    """Check a user's uploaded instance photos and decode them, or refuse them all.

    Args:
        items (`Sequence[tuple[str, bytes]]` or `Mapping[str, bytes]`):
            The uploaded files as `(name, content)` pairs, in upload order. Names only label
            the files in messages; nothing is written under them.
        rules (`ImageRules`, *optional*, defaults to `ImageRules()`):
            What to accept.

    Returns:
        `list[ValidatedImage]`: the photos, decoded to RGB, in the order given.

    Raises:
        InstanceImageError: listing every problem with every file (and with the upload as a
            whole), when there is any.
        ValueError: when `items` is not made of `(str, bytes)` pairs.
    """
    rules = rules if rules is not None else ImageRules()
    if isinstance(items, Mapping):
        items = list(items.items())
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise ValueError(f"items must be a sequence of (name, bytes) pairs, got {type(items)}")
    uploads = []
    for index, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"items[{index}] must be a (name, bytes) pair, got {item!r:.80}")
        name, data = item
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"items[{index}] ({name!r}) content must be bytes, got {type(data)}")
        data = bytes(data)
        uploads.append(_Upload(name, len(data), data))
    return _validate(uploads, rules, [])


def validate_directory(path: str | Path, rules: ImageRules | None = None) -> list[ValidatedImage]:
    """Check the instance photos in a directory, as `validate_images` does.

    Files are taken in name order. Hidden entries (names starting with a dot, such as
    `.DS_Store` or Jupyter's `.ipynb_checkpoints`) are skipped; symbolic links, subdirectories
    and other non-regular entries are reported as problems. Files over `rules.max_bytes` are
    not read past that size.

    Args:
        path (`str` or `Path`):
            The directory.
        rules (`ImageRules`, *optional*, defaults to `ImageRules()`):
            What to accept.

    Returns:
        `list[ValidatedImage]`: the photos in name order.

    Raises:
        InstanceImageError: listing every problem, when there is any.
        FileNotFoundError, NotADirectoryError: when `path` is not an existing directory.
    """
    rules = rules if rules is not None else ImageRules()
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"path {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"path {str(directory)!r} is not a directory")
    uploads, problems = [], []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        refusal = _entry_refusal(entry)
        if refusal:
            problems.append(Problem(entry.name, "file", refusal, "regular image files only"))
            continue
        with entry.open("rb") as stream:
            data = stream.read(rules.max_bytes + 1)
        nbytes = max(len(data), entry.stat().st_size)
        uploads.append(_Upload(entry.name, nbytes, data if nbytes <= rules.max_bytes else None))
    return _validate(uploads, rules, problems)


def validate_prefix(
    store: ArtifactStore, prefix_uri: str, rules: ImageRules | None = None
) -> list[ValidatedImage]:
    """Check the instance photos in a store folder (an `s3://` prefix), as `validate_directory`
    does for a directory.

    Objects are taken in key order and named by their key below the folder. Hidden names
    (starting with a dot) are skipped; objects in subfolders are reported as problems; objects
    over `rules.max_bytes` are not downloaded.

    Args:
        store (`ArtifactStore`):
            The store that holds the folder (S3, or the local store).
        prefix_uri (`str`):
            The folder, `s3://bucket/key` (a trailing `/` is optional).
        rules (`ImageRules`, *optional*, defaults to `ImageRules()`):
            What to accept.

    Returns:
        `list[ValidatedImage]`: the photos in key order.

    Raises:
        InstanceImageError: listing every problem, when there is any.
        FileNotFoundError: when nothing is stored under `prefix_uri`.
        ValueError: when `prefix_uri` is not an `s3://` folder URI.
    """
    rules = rules if rules is not None else ImageRules()
    prefix = S3Uri.parse_prefix(prefix_uri)
    uris = store.list(prefix)
    if not uris:
        raise FileNotFoundError(f"nothing is stored under {prefix_uri!r}")
    uploads, problems, folders = [], [], []
    for uri in uris:
        name = S3Uri.parse(uri).key[len(prefix.key_prefix) :]
        parts = name.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        if len(parts) > 1:
            if parts[0] not in folders:
                folders.append(parts[0])
                problems.append(Problem(parts[0], "file", "is a folder", "image files only"))
            continue
        nbytes = store.size(uri)
        data = store.get_bytes(uri) if nbytes <= rules.max_bytes else None
        uploads.append(_Upload(name, nbytes, data))
    return _validate(uploads, rules, problems)


def normalize(
    images: Sequence[ValidatedImage], resolution: int | None = None
) -> list[tuple[str, bytes]]:
    """Encode validated photos as RGB PNG files ready to store as a training channel.

    The files are named `00.png`, `01.png`, ... in order, never after the user's names, and
    carry no metadata (EXIF, GPS, colour profile).

    Args:
        images (`Sequence[ValidatedImage]`):
            What `validate_images` returned.
        resolution (`int`, *optional*, defaults to `None`):
            When given, each photo is centre-cropped to a square and resized to `resolution`
            pixels (LANCZOS); by default sizes are kept.

    Returns:
        `list[tuple[str, bytes]]`: `(file name, PNG bytes)` pairs.
    """
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"resolution must be a positive integer or None, got {resolution!r}")
    files = []
    for index, validated in enumerate(images):
        if not isinstance(validated, ValidatedImage):
            raise ValueError(f"images[{index}] must be a ValidatedImage, got {type(validated)}")
        image = validated.image
        if resolution is not None:
            image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        _without_metadata(image).save(buffer, format="PNG")
        files.append((f"{index:02d}.png", buffer.getvalue()))
    return files


def _validate(
    uploads: Sequence[_Upload], rules: ImageRules, problems: list[Problem]
) -> list[ValidatedImage]:
    """Check `uploads` one by one and as a whole; raise with `problems` plus any found.

    Every header is read first; nothing is decoded unless the files' pixels together fit in
    `rules.max_total_pixels`.
    """
    problems = [*problems, *_upload_problems(uploads, rules)]
    headers = []
    for upload in uploads:
        header, found = _check_header(upload, rules)
        problems += found
        if header is not None:
            headers.append((upload, header))
    total = sum(header.size[0] * header.size[1] for _, header in headers)
    if total > rules.max_total_pixels:
        problems.append(
            Problem(
                ALL_FILES,
                "total_pixels",
                f"{total:,} pixels in all",
                f"at most {rules.max_total_pixels:,} pixels (width x height) in all; "
                "send the rest in another upload",
            )
        )
        raise InstanceImageError(problems)
    images = []
    for upload, header in headers:
        image, found = _decode(upload, header, rules)
        problems += found
        if image is not None:
            images.append(image)
    problems += _duplicate_problems(images)
    if problems:
        raise InstanceImageError(problems)
    return images


def _upload_problems(uploads: Sequence[_Upload], rules: ImageRules) -> list[Problem]:
    """Problems of the upload as a whole: how many files, how many bytes, repeated names."""
    problems = []
    count = len(uploads)
    if not rules.min_images <= count <= rules.max_images:
        problems.append(
            Problem(
                ALL_FILES,
                "count",
                f"{count} image{'s' if count != 1 else ''}",
                f"{rules.min_images} to {rules.max_images} images",
            )
        )
    total = sum(upload.nbytes for upload in uploads)
    if total > rules.max_total_bytes:
        problems.append(
            Problem(
                ALL_FILES,
                "total_bytes",
                f"{_size_text(total)} in all",
                f"at most {_size_text(rules.max_total_bytes)} in all",
            )
        )
    seen: set[str] = set()
    for upload in uploads:
        if not upload.name.strip():
            problems.append(Problem(repr(upload.name), "name", "empty name", "a file name"))
        elif upload.name in seen:
            problems.append(
                Problem(upload.name, "name", "the name is used twice", "one file per name")
            )
        seen.add(upload.name)
    return problems


@dataclass(frozen=True)
class _Header:
    """What a file's header declares."""

    format: str
    mode: str
    size: tuple[int, int]


def _check_header(upload: _Upload, rules: ImageRules) -> tuple[_Header | None, list[Problem]]:
    """One file's checks before decoding: size in bytes, then its header (format, pixels,
    mode); the header when they pass."""
    name, data = upload.name, upload.data
    if upload.nbytes == 0:
        return None, [Problem(name, "bytes", "the file is empty", _bytes_allowed(rules))]
    if data is None or upload.nbytes > rules.max_bytes:
        reason = f"{_size_text(upload.nbytes)} is too large"
        return None, [Problem(name, "bytes", reason, _bytes_allowed(rules))]
    opened = _open_header(name, data, rules)
    if isinstance(opened, Problem):
        return None, [opened]
    with opened:
        image_format = _FORMAT_ALIASES.get(opened.format or "", opened.format or "?")
        header = _Header(image_format, opened.mode, opened.size)
    problems = _header_problems(name, header.mode, header.size, rules)
    return (None if problems else header), problems


def _decode(
    upload: _Upload, header: _Header, rules: ImageRules
) -> tuple[ValidatedImage | None, list[Problem]]:
    """Decode a file whose header passed, in full, so damaged files are caught here."""
    name, data = upload.name, upload.data
    assert data is not None  # _check_header passes only files that were read
    try:
        with Image.open(io.BytesIO(data), formats=rules.formats) as probe:
            probe.verify()
        with Image.open(io.BytesIO(data), formats=rules.formats) as decoded:
            decoded.load()
            rgb = _to_rgb(ImageOps.exif_transpose(decoded))
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, EOFError...
        reason = f"the file is damaged or truncated ({_error_text(error)})"
        return None, [Problem(name, "content", reason, f"a complete {header.format} file")]
    digest = hashlib.sha256(data).hexdigest()
    return ValidatedImage(name, rgb, header.format, header.mode, header.size, digest), []


def _open_header(name: str, data: bytes, rules: ImageRules) -> Image.Image | Problem:
    """Open `data` lazily (header only), or the problem that prevents it."""
    formats_text = ", ".join(rules.formats)
    try:
        return Image.open(io.BytesIO(data), formats=rules.formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # the warning arrives as an exception where warnings are turned into errors
        reason = f"the header declares too many pixels ({_error_text(error)})"
        return Problem(name, "pixels", reason, _pixels_allowed(rules))
    except UnidentifiedImageError:
        sniffed = _sniff(data)
        if sniffed is None:
            reason = "not an image, or of a kind that cannot be read"
            return Problem(name, "format", reason, formats_text)
        if sniffed not in rules.formats:
            return Problem(name, "format", f"{sniffed} is not accepted", formats_text)
        reason = f"looks like {sniffed} but its header is corrupt"
        return Problem(name, "content", reason, f"a complete {sniffed} file")
    except Exception as error:  # corrupt headers raise OSError, ValueError, EOFError...
        reason = f"the header cannot be read ({_error_text(error)})"
        kind = _sniff(data) or formats_text
        return Problem(name, "content", reason, f"a complete {kind} file")


def _header_problems(
    name: str, mode: str, size: tuple[int, int], rules: ImageRules
) -> list[Problem]:
    """Problems visible in the header: pixel count, smallest side, mode."""
    width, height = size
    problems = []
    if width * height > rules.max_pixels:
        reason = f"{width}x{height} is {width * height:,} pixels"
        problems.append(Problem(name, "pixels", reason, _pixels_allowed(rules)))
    if min(width, height) < rules.min_side:
        reason = f"{width}x{height} pixels is too small"
        allowed = f"width and height of at least {rules.min_side} pixels"
        problems.append(Problem(name, "size", reason, allowed))
    if mode not in rules.modes:
        reason = f"{mode} ({_MODE_REASONS.get(mode, 'a pixel format that is not accepted')})"
        problems.append(Problem(name, "mode", reason, ", ".join(rules.modes)))
    return problems


def _duplicate_problems(images: Sequence[ValidatedImage]) -> list[Problem]:
    """A problem for each photo whose bytes repeat an earlier one's."""
    first: dict[str, str] = {}
    problems = []
    for image in images:
        if image.sha256 in first:
            reason = f"same content as {first[image.sha256]}"
            problems.append(Problem(image.name, "duplicate", reason, "each photo once"))
        else:
            first[image.sha256] = image.name
    return problems


def _entry_refusal(entry: Path) -> str | None:
    """Why a directory entry cannot be an uploaded photo, or `None` when it is a plain file."""
    if entry.is_symlink():
        return "is a symbolic link"
    if entry.is_dir():
        return "is a directory"
    if not entry.is_file():
        return "is not a regular file"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """`image` as RGB without metadata; transparent parts become white."""
    if image.mode != "RGB" and image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return _without_metadata(image.convert("RGB"))


def _without_metadata(image: Image.Image) -> Image.Image:
    """A copy of an RGB `image` with no `info` (EXIF, ICC profile, text chunks)."""
    return Image.frombytes("RGB", image.size, image.tobytes())


def _sniff(data: bytes) -> str | None:
    """The format that `data`'s first bytes announce, if a common one."""
    for offset, signature, name in _SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            if name == "WEBP" and not data.startswith(b"RIFF"):
                continue
            return name
    return None


def _size_text(nbytes: int) -> str:
    if nbytes >= MiB:
        return f"{nbytes / MiB:.1f} MiB ({nbytes:,} bytes)"
    return f"{nbytes:,} bytes"


def _bytes_allowed(rules: ImageRules) -> str:
    return f"1 byte to {_size_text(rules.max_bytes)} per file"


def _pixels_allowed(rules: ImageRules) -> str:
    return f"at most {rules.max_pixels:,} pixels (width x height)"


def _error_text(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text if len(text) <= 120 else text[:117] + "..."
