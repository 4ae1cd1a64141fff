"""The local artifact store: a bucket is a directory under the root, a key a relative path.

Keys are checked by `S3Uri` (no `..`, no empty segments, no backslash), so a key cannot climb
out of its bucket; symlinks that lead out of the root are refused here. Writes go to a temp file
in the same directory and are renamed into place, so readers never see half an object.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from helpers.domain.uris import S3Uri, check_bucket
from helpers.ports.store import (
    TEMP_PREFIX,
    ArtifactStore,
    BucketNotFound,
    ObjectNotFound,
    PresignedPost,
    PresignNotSupported,
    as_prefix,
    as_uri,
    atomic_writer,
    check_data,
    check_presign_args,
    check_presign_post_args,
)

__all__ = ["LocalArtifactStore", "PresignNotSupported"]

_NOT_A_FILE = (IsADirectoryError, NotADirectoryError, FileExistsError)


class LocalArtifactStore(ArtifactStore):
    """Objects as files under `root/<bucket>/<key>`.

    Args:
        root (`str` or `os.PathLike`): the directory holding one directory per bucket
            (`settings.store_root`); created by `create_bucket`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise ValueError(f"root must be a directory path, got {root!r}")
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    # -- writes ---------------------------------------------------------------------------

    def put_bytes(self, uri: S3Uri | str, data: bytes) -> None:
        check_data(data)
        uri = as_uri(uri)
        path = self._path(uri)
        try:
            with atomic_writer(path) as file:
                file.write(data)
        except _NOT_A_FILE:
            raise _folder_conflict(uri) from None

    def put_file(self, uri: S3Uri | str, path: str | os.PathLike) -> None:
        uri = as_uri(uri)
        target = self._path(uri)
        with open(path, "rb") as source:
            try:
                with atomic_writer(target) as file:
                    shutil.copyfileobj(source, file, length=1 << 20)
            except _NOT_A_FILE:
                raise _folder_conflict(uri) from None

    def delete(self, uri: S3Uri | str) -> None:
        uri = as_uri(uri)
        path = self._path(uri)
        if path.is_dir():
            return
        path.unlink(missing_ok=True)
        self._prune(path.parent, self.root / uri.bucket)

    def delete_prefix(self, prefix_uri: S3Uri | str) -> int:
        uris = self.list(prefix_uri)
        for uri in uris:
            self.delete(uri)
        return len(uris)

    def create_bucket(self, bucket: str) -> None:
        (self.root / check_bucket(bucket)).mkdir(parents=True, exist_ok=True)

    def serving_location(self, prefix_uri: S3Uri | str) -> str:
        # The local endpoint's models read this machine's folder directly; it must exist.
        prefix = as_prefix(prefix_uri)
        folder = self.root / prefix.bucket / prefix.key
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    # -- reads ----------------------------------------------------------------------------

    def get_bytes(self, uri: S3Uri | str) -> bytes:
        uri = as_uri(uri)
        path = self._path(uri)
        try:
            return path.read_bytes()
        except (FileNotFoundError, *_NOT_A_FILE):
            raise ObjectNotFound(uri) from None

    def get_file(self, uri: S3Uri | str, path: str | os.PathLike) -> None:
        uri = as_uri(uri)
        source_path = self._path(uri)
        try:
            source = open(source_path, "rb")  # noqa: SIM115 (closed below; open errors mapped)
        except (FileNotFoundError, *_NOT_A_FILE):
            raise ObjectNotFound(uri) from None
        with source, atomic_writer(path) as file:
            shutil.copyfileobj(source, file, length=1 << 20)

    def exists(self, uri: S3Uri | str) -> bool:
        uri = as_uri(uri)
        try:
            return self._path(uri).is_file()
        except BucketNotFound:
            return False

    def size(self, uri: S3Uri | str) -> int:
        uri = as_uri(uri)
        path = self._path(uri)
        if not path.is_file():
            raise ObjectNotFound(uri)
        return path.stat().st_size

    def list(self, prefix_uri: S3Uri | str) -> list[str]:
        prefix = as_prefix(prefix_uri)
        base = self._path(prefix)
        bucket_dir = self.root / prefix.bucket
        found = []
        # followlinks=False: a symlinked directory is not walked into, wherever it points.
        for directory, _, names in os.walk(base):
            for name in names:
                path = Path(directory, name)
                if name.startswith(TEMP_PREFIX) or path.is_symlink():
                    continue
                key = path.relative_to(bucket_dir).as_posix()
                try:
                    found.append(str(S3Uri(prefix.bucket, key)))
                except ValueError:
                    continue  # a file put there by hand under a name no key can have
        return sorted(found)

    def presign(self, uri: S3Uri | str, method: str = "get_object", expires_in: int = 3600) -> str:
        check_presign_args(method, expires_in)
        as_uri(uri)
        raise PresignNotSupported(
            "the local backend has no presigned URLs: clients upload and download through the "
            "workshop API (or store.put_file / store.get_file) instead"
        )

    def presign_post(
        self, uri: S3Uri | str, max_bytes: int, content_type: str, expires_in: int = 900
    ) -> PresignedPost:
        check_presign_post_args(max_bytes, content_type, expires_in)
        as_uri(uri)
        raise PresignNotSupported(
            "the local backend has no presigned uploads: clients upload through the workshop "
            "API (POST /v1/photos) or store.put_file instead"
        )

    # -- paths ----------------------------------------------------------------------------

    def _path(self, uri: S3Uri) -> Path:
        bucket_dir = self.root / uri.bucket
        if not bucket_dir.is_dir():
            raise BucketNotFound(uri)
        segments = uri.key.split("/") if uri.key else []
        if any(segment.startswith(TEMP_PREFIX) for segment in segments):
            raise ValueError(f"uri {str(uri)!r} is invalid: no segment may start {TEMP_PREFIX!r}")
        path = bucket_dir.joinpath(*segments)
        # The key cannot hold '..', but a symlink inside the tree could still point outside it.
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"uri {str(uri)!r} leads outside the store root through a symlink")
        return path

    @staticmethod
    def _prune(directory: Path, bucket_dir: Path) -> None:
        # Drop folders left empty, so a key can later be an object where a folder was.
        while directory != bucket_dir and bucket_dir in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent


def _folder_conflict(uri: S3Uri) -> ValueError:
    return ValueError(
        f"uri {str(uri)!r} cannot be stored locally: the key or one of its parents is already "
        "a folder or an object (a local key cannot be both)"
    )
