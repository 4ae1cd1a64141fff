"""The artifact store port: objects addressed by `s3://bucket/key` on either backend.

`helpers.backend.open_backend(settings).store` gives a directory tree locally and Amazon S3
on the sagemaker backend; callers never branch on which. Importing this module never imports
boto3.
"""

from __future__ import annotations

import abc
import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from helpers.domain.uris import S3Uri

#: Temporary files of atomic writes start with this; listings skip them.
TEMP_PREFIX = ".artifact-tmp-"
#: Presigned URLs only read: a presigned PUT cannot bound the size or type of what is written,
#: so writes are handed out as presigned POST forms (`presign_post`).
PRESIGN_METHODS = ("get_object",)
#: SigV4's longest allowed expiry, 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600


class ObjectNotFound(KeyError):
    """No object at `uri`."""

    def __init__(self, uri: S3Uri | str, message: str | None = None) -> None:
        super().__init__(str(uri))
        self.uri = str(uri)
        self.message = message or f"no object at {self.uri}"

    def __str__(self) -> str:
        # KeyError would quote the message; this one is meant to be read.
        return self.message


class BucketNotFound(ObjectNotFound):
    """The bucket of `uri` does not exist; `create_bucket` (provisioning) makes it."""

    def __init__(self, uri: S3Uri | str) -> None:
        bucket = (uri if isinstance(uri, S3Uri) else S3Uri.parse_prefix(str(uri))).bucket
        super().__init__(
            uri,
            f"bucket {bucket!r} of {uri} does not exist: run provisioning "
            "(helpers.backend.Backend.provision) or store.create_bucket() first",
        )


class PresignNotSupported(NotImplementedError):
    """The backend cannot hand out presigned URLs (the local one uploads through the API)."""


@dataclass(frozen=True)
class PresignedPost:
    """A form that lets a client without credentials upload one object with an HTTP POST.

    Args:
        url (`str`): where to POST the `multipart/form-data` body.
        fields (`dict[str, str]`): form fields to send as given, before the `file` field
            (the key, the content type, the signed policy and its signature).
    """

    url: str
    fields: dict[str, str]


class ArtifactStore(abc.ABC):
    """Objects under `s3://bucket/key` URIs. Every write is atomic: a reader sees the old
    object or the new one, never part of one, and a failed write leaves nothing behind.

    URIs may be given as strings or `S3Uri`; invalid ones raise `ValueError` naming them.
    A *prefix* URI names a folder (a trailing `/` is optional; `s3://bucket` is the whole
    bucket), so `users/u1` never matches `users/u10/...`.
    """

    @abc.abstractmethod
    def put_bytes(self, uri: S3Uri | str, data: bytes) -> None:
        """Store `data` (bytes-like) as the object `uri`, replacing any previous one."""

    @abc.abstractmethod
    def put_file(self, uri: S3Uri | str, path: str | os.PathLike) -> None:
        """Upload the local file `path` as the object `uri`, replacing any previous one."""

    @abc.abstractmethod
    def get_bytes(self, uri: S3Uri | str) -> bytes:
        """The content of the object `uri`.

        Raises:
            ObjectNotFound: when there is no such object (`BucketNotFound` for the bucket).
        """

    @abc.abstractmethod
    def get_file(self, uri: S3Uri | str, path: str | os.PathLike) -> None:
        """Download the object `uri` to the local file `path`, atomically (parents created).

        Raises:
            ObjectNotFound: when there is no such object; `path` is then left untouched.
        """

    @abc.abstractmethod
    def exists(self, uri: S3Uri | str) -> bool:
        """Whether the object `uri` exists."""

    @abc.abstractmethod
    def size(self, uri: S3Uri | str) -> int:
        """The object's size in bytes, without reading it.

        Raises:
            ObjectNotFound: when there is no object `uri`.
        """

    @abc.abstractmethod
    def list(self, prefix_uri: S3Uri | str) -> list[str]:
        """The sorted URIs of all objects under the folder `prefix_uri`, recursively."""

    @abc.abstractmethod
    def delete(self, uri: S3Uri | str) -> None:
        """Delete the object `uri`; a missing object is fine."""

    @abc.abstractmethod
    def delete_prefix(self, prefix_uri: S3Uri | str) -> int:
        """Delete every object under the folder `prefix_uri`; return how many were deleted."""

    @abc.abstractmethod
    def presign(self, uri: S3Uri | str, method: str = "get_object", expires_in: int = 3600) -> str:
        """A URL that lets a client without credentials read or write the object `uri`.

        Args:
            uri (`S3Uri` or `str`): the object.
            method (`str`, defaults to `"get_object"`): `"get_object"` (writes go through
                `presign_post`, which bounds what is written).
            expires_in (`int`, defaults to 3600): seconds the URL stays valid, 1 to 604800.

        Raises:
            PresignNotSupported: on the local backend.
        """

    @abc.abstractmethod
    def presign_post(
        self, uri: S3Uri | str, max_bytes: int, content_type: str, expires_in: int = 900
    ) -> PresignedPost:
        """A POST form that uploads the object `uri` once its conditions hold: 1 to
        `max_bytes` bytes, exactly `content_type`, before `expires_in` seconds have passed.
        The store itself refuses anything else (S3 checks the signed policy), so nothing
        larger is ever stored.

        Args:
            uri (`S3Uri` or `str`): the object to write.
            max_bytes (`int`): the largest object accepted, in bytes (at least 1).
            content_type (`str`): the object's `Content-Type`, e.g. `"image/png"` (an S3 policy
                matches one value exactly or a prefix; a list of choices it cannot express).
            expires_in (`int`, defaults to 900): seconds the form stays valid, 1 to 604800.

        Raises:
            PresignNotSupported: on the local backend.
        """

    @abc.abstractmethod
    def create_bucket(self, bucket: str) -> None:
        """Create `bucket` (private and encrypted where the backend has such settings); an
        existing bucket of ours is fine."""

    def serving_location(self, prefix_uri: S3Uri | str) -> str:
        """Where a model on this backend's endpoint reads the folder `prefix_uri` from: the
        `s3://` prefix itself (read with boto3); a local store gives its folder instead."""
        prefix = as_prefix(prefix_uri)
        return f"s3://{prefix.bucket}/{prefix.key_prefix}"


def as_uri(uri: S3Uri | str) -> S3Uri:
    """`uri` as the `S3Uri` of one object (`ValueError` naming it when invalid)."""
    return uri if isinstance(uri, S3Uri) and uri.key else S3Uri.parse(str(uri))


def as_prefix(prefix_uri: S3Uri | str) -> S3Uri:
    """`prefix_uri` as the `S3Uri` of a folder (`ValueError` naming it when invalid)."""
    return prefix_uri if isinstance(prefix_uri, S3Uri) else S3Uri.parse_prefix(str(prefix_uri))


def check_presign_args(method: str, expires_in: int) -> None:
    """Raise `ValueError` naming `method` or `expires_in` when it is out of range."""
    if method not in PRESIGN_METHODS:
        raise ValueError(f"method must be one of {PRESIGN_METHODS}, got {method!r}")
    if (
        not isinstance(expires_in, int)
        or isinstance(expires_in, bool)
        or not 1 <= expires_in <= MAX_PRESIGN_SECONDS
    ):
        raise ValueError(
            f"expires_in must be whole seconds from 1 to {MAX_PRESIGN_SECONDS}, got {expires_in!r}"
        )


def check_presign_post_args(max_bytes: int, content_type: str, expires_in: int) -> None:
    """Raise `ValueError` naming `max_bytes`, `content_type` or `expires_in` when invalid."""
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
    if not isinstance(content_type, str) or content_type.count("/") != 1 or " " in content_type:
        raise ValueError(
            f"content_type must be a media type such as 'image/png', got {content_type!r}"
        )
    check_presign_args("get_object", expires_in)


def check_data(data: object) -> None:
    """Raise `ValueError` naming `data` unless it is bytes-like."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes-like, got {type(data).__name__}")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a temporary file beside `path` for writing; on a clean exit fsync it and rename it
    over `path`, on an error delete it. Readers see the old file or the new one, never half.

    The parent directory is created. `get_file` of both adapters and local puts use this.
    """
    target = Path(path)
    handle, temp_name = _make_temp(target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_directory(target.parent)


def _make_temp(directory: Path) -> tuple[int, str]:
    # A concurrent delete may prune the empty directory between mkdir and mkstemp: retry.
    for attempt in range(5):
        directory.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX)
        except FileNotFoundError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, and not needed there.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
