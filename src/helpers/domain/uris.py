"""`s3://bucket/key` URIs, the one address of every artifact on both backends.

Locally a key becomes a file path under the store's root, so `S3Uri` is the security boundary
against path traversal: a key that parses here can never name a file outside its bucket's
directory (symlinks are the local store's own check).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "s3://"
#: S3's own limit; also keeps local paths well under PATH_MAX.
MAX_KEY_BYTES = 1024

# S3's rules for new buckets; a bucket is also a directory name locally, so no '..' either.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def check_bucket(bucket: str) -> str:
    """Return `bucket` if it is a valid S3 bucket name, else raise `ValueError` naming it."""
    if not isinstance(bucket, str) or not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(
            f"bucket {bucket!r} is not a valid bucket name: use 3-63 lowercase letters, digits, "
            "'.' and '-', starting and ending with a letter or digit"
        )
    return bucket


def check_key(key: str) -> str:
    """Return `key` if it is a safe object key, else raise `ValueError` naming it.

    A safe key is 1-1024 bytes of UTF-8, its `/`-separated segments are non-empty and neither
    `.` nor `..`, and it holds no backslash and no NUL.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"key {key!r} must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise ValueError(f"key {key[:40]!r}... is longer than {MAX_KEY_BYTES} bytes")
    if "\\" in key or "\x00" in key:
        # A backslash is a separator on Windows; NUL truncates paths in C APIs.
        raise ValueError(f"key {key!r} must not contain a backslash or a NUL character")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(
                f"key {key!r} has an empty, '.' or '..' segment (leading, trailing or double "
                "'/' included)"
            )
    return key


@dataclass(frozen=True)
class S3Uri:
    """An object or folder address, `s3://<bucket>/<key>`.

    Args:
        bucket (`str`): the bucket name (checked with S3's naming rules).
        key (`str`, defaults to `""`): the object key; `""` means the whole bucket, which only
            a folder (prefix) may be.
    """

    bucket: str
    key: str = ""

    def __post_init__(self) -> None:
        check_bucket(self.bucket)
        if self.key:
            check_key(self.key)

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        """Parse the URI of one object, `s3://bucket/key`.

        Raises:
            ValueError: naming `uri` when it is not `s3://` with a bucket and a safe key.
        """
        bucket, key = _split(uri)
        if not key:
            raise ValueError(f"uri {uri!r} names no object: expected s3://bucket/key")
        try:
            return cls(bucket, key)
        except ValueError as error:
            raise ValueError(f"uri {uri!r} is invalid: {error}") from None

    @classmethod
    def parse_prefix(cls, uri: str) -> S3Uri:
        """Parse the URI of a folder: `s3://bucket`, `s3://bucket/` or `s3://bucket/a/b[/]`.

        A trailing slash is dropped, so `key` is the folder's path (`""` for the bucket).

        Raises:
            ValueError: naming `uri` when it is not `s3://` with a bucket and a safe key.
        """
        bucket, key = _split(uri)
        try:
            return cls(bucket, key.removesuffix("/"))
        except ValueError as error:
            raise ValueError(f"uri {uri!r} is invalid: {error}") from None

    def join(self, *parts: str) -> S3Uri:
        """This URI with `parts` appended as path segments, e.g. `uri.join("users", user_id)`.

        Slashes at the ends of each part are ignored; anything else unsafe raises `ValueError`.
        """
        for part in parts:
            if not isinstance(part, str):
                raise ValueError(f"parts must be strings, got {part!r}")
        segments = [self.key, *(part.strip("/") for part in parts)]
        return S3Uri(self.bucket, "/".join(segment for segment in segments if segment))

    @property
    def key_prefix(self) -> str:
        """The key as a folder prefix: `"a/b/"`, or `""` for the whole bucket.

        Folders end with `/` so that listing `users/u1` never matches `users/u10`.
        """
        return f"{self.key}/" if self.key else ""

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


def _split(uri: str) -> tuple[str, str]:
    if not isinstance(uri, str) or not uri.startswith(SCHEME):
        raise ValueError(f"uri {uri!r} must start with {SCHEME!r}: expected s3://bucket/key")
    bucket, _, key = uri[len(SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"uri {uri!r} names no bucket: expected s3://bucket/key")
    return bucket, key
