"""Model archives (`model.tar.gz`): unpacked safely, written atomically and reproducibly.

Every archive the project opens came from somewhere it does not control (a training job's
output, an upload to the endpoint's model prefix), so `safe_extract` checks every member before
it writes anything. `write_tar_gz` makes the archives the project ships: plain files only,
fixed owner and times (the same inputs give the same bytes), never half-written.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path

#: The most an archive may unpack to, in bytes, and the most members it may hold.
MAX_UNPACKED_BYTES = 512 * 1024 * 1024
MAX_MEMBERS = 1000


def safe_extract(
    tar_path: str | Path,
    destination: str | Path,
    max_bytes: int = MAX_UNPACKED_BYTES,
    max_members: int = MAX_MEMBERS,
) -> Path:
    """Unpack `tar_path` into `destination`, refusing anything but plain files and folders.

    Every member is checked before anything is written: no absolute names, no `..`, no links
    or devices, at most `max_members` members and `max_bytes` in all; extraction then uses
    tarfile's `"data"` filter as a second guard.

    Raises:
        ValueError: naming the first refused member, or the count or size over the limit.
    """
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "r:*") as archive:
        members = archive.getmembers()
        if len(members) > max_members:
            raise ValueError(f"refusing {tar_path}: {len(members)} members, at most {max_members}")
        total = 0
        for member in members:
            name = member.name
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts:
                raise ValueError(f"refusing tar member {name!r}: absolute or '..' path")
            if not (member.isfile() or member.isdir()):
                raise ValueError(f"refusing tar member {name!r}: not a regular file or folder")
            total += member.size
            if total > max_bytes:
                raise ValueError(f"refusing {tar_path}: more than {max_bytes} bytes unpacked")
        archive.extractall(destination, members=members, filter="data")
    return destination


def write_tar_gz(destination: str | Path, files: Mapping[str, bytes | str | Path]) -> Path:
    """Write a gzipped tar of `files` (archive name -> bytes, text, or a file to copy).

    Members are plain files (mode 0644, owner 0, time 0) in the order given, so the same
    inputs give the same archive; the file appears whole or not at all (temp file + rename).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    try:
        with (
            os.fdopen(handle, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped,
        ):
            with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as archive:
                for name, content in files.items():
                    info = tarfile.TarInfo(name)
                    info.mode, info.mtime = 0o644, 0
                    if isinstance(content, Path):  # streamed: a file may be larger than memory
                        info.size = content.stat().st_size
                        with content.open("rb") as source:
                            archive.addfile(info, source)
                        continue
                    if isinstance(content, str):
                        content = content.encode()
                    info.size = len(content)
                    archive.addfile(info, io.BytesIO(content))
            zipped.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(temp, destination)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return destination


def content_name(prefix: str, files: Mapping[str, bytes | str | Path]) -> str:
    """`<prefix><first 12 hex of a SHA-256 over the files' names and contents>`: a model name
    that changes whenever a file does (MME model names are never reused for new content)."""
    digest = hashlib.sha256()
    for name, content in sorted(files.items()):
        if isinstance(content, Path):
            file_digest = hashlib.sha256()
            with content.open("rb") as source:
                for chunk in iter(lambda: source.read(1 << 20), b""):
                    file_digest.update(chunk)
            data_digest = file_digest.digest()
        else:
            data = content.encode() if isinstance(content, str) else content
            data_digest = hashlib.sha256(data).digest()
        digest.update(name.encode() + b"\0" + data_digest)
    return prefix + digest.hexdigest()[:12]


def base_model_files(directory: str | Path) -> dict[str, Path]:
    """The files of the pipeline `directory`, by their `/`-separated path inside it, sorted.

    Hidden entries (a name starting with a dot, such as `.DS_Store` or a `.cache` folder) are
    left out; a symbolic link to a file counts as that file (the hub cache's snapshots).
    """
    root = Path(directory)
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        files[relative.as_posix()] = path
    return files
