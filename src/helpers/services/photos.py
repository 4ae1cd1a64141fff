"""A user's photos of their subject: listed, added (validated, stored as PNG), deleted, and
collected from presigned uploads.

Photos live in the store under `users/<user_id>/`: `photos/` holds validated, normalized PNG
files; `uploads/` holds files a client posted with presigned POST forms, validated and moved
into `photos/` when fine-tuning starts; `training/<model_id>/` is the snapshot a model trains on.

What one user can make this process hold is bounded: a request decodes at most
`UPLOAD_RULES.max_total_pixels`, at most `DECODE_SLOTS` requests decode at once, and uploads
are collected one at a time, each checked for size before it is read.
"""

from __future__ import annotations

import hashlib
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from helpers.domain.paths import photos_prefix, uploads_prefix
from helpers.services.errors import OnboardingError
from helpers.services.instance_images import (
    DEFAULT_MAX_PIXELS,
    ImageRules,
    InstanceImageError,
    Problem,
    normalize,
    validate_images,
)

if TYPE_CHECKING:
    from helpers.ports.store import ArtifactStore
    from helpers.settings import Settings

#: Photos a user may keep (stored and pending uploads together); fewest a model trains on.
MAX_PHOTOS = 20
MIN_TRAINING_PHOTOS = 3
#: Each upload request: 1-10 files, at most 67 MP in all (about 200 MB decoded); the
#: instance-image rules otherwise.
UPLOAD_RULES = ImageRules(min_images=1, max_images=10, max_total_pixels=4 * DEFAULT_MAX_PIXELS)
#: Media types a presigned upload may declare (S3 refuses any other).
UPLOAD_CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp")
#: A stored photo's name (its content's hash), and a pending upload's id (one key segment;
#: `reserve_uploads` makes them of hex digits): anything else names nothing.
PHOTO_NAME = r"^[0-9a-f]{16}\.png$"
UPLOAD_ID = r"^[A-Za-z0-9_-]{1,64}$"
#: Requests of this process that decode photos at once: each holds up to
#: `UPLOAD_RULES.max_total_pixels` decoded, so more would multiply the memory.
DECODE_SLOTS = 2
_decoding = threading.BoundedSemaphore(DECODE_SLOTS)


@dataclass(frozen=True)
class Photo:
    """One of a user's stored photos."""

    name: str
    uri: str


@dataclass(frozen=True)
class PendingUpload:
    """A file posted with a presigned form, not yet checked: its id, where it is, its size."""

    id: str
    uri: str
    size: int


def list_photos(store: ArtifactStore, settings: Settings, user_id: str) -> list[Photo]:
    uris = store.list(photos_prefix(settings.bucket, user_id))
    return [Photo(uri.rsplit("/", 1)[-1], uri) for uri in sorted(uris)]


def add_photos(
    store: ArtifactStore,
    settings: Settings,
    user_id: str,
    files: Sequence[tuple[str, bytes]],
) -> list[Photo]:
    """Validate `files` (all or none), store them as PNG; return the photos added.

    A photo is named after its content's hash, so uploading the same photo twice keeps one.
    Blocks while `DECODE_SLOTS` other calls decode; call it from a worker thread.

    Raises:
        InstanceImageError: every problem with every file; nothing is stored.
        OnboardingError: when the user would hold more than `MAX_PHOTOS`.
    """
    with _decoding:
        validated = validate_images(list(files), UPLOAD_RULES)
        pngs = [data for _, data in normalize(validated)]
    existing = {photo.name for photo in list_photos(store, settings, user_id)}
    names = [f"{hashlib.sha256(data).hexdigest()[:16]}.png" for data in pngs]
    new = {name: data for name, data in zip(names, pngs, strict=True) if name not in existing}
    if len(existing) + len(new) > MAX_PHOTOS:
        raise OnboardingError(
            f"a user keeps at most {MAX_PHOTOS} photos; {len(existing)} are stored and "
            f"{len(new)} would be added: delete some first (DELETE /v1/photos/{{name}})",
            field="files",
            allowed=f"at most {MAX_PHOTOS - len(existing)} more photos",
        )
    prefix = photos_prefix(settings.bucket, user_id)
    for name, data in new.items():
        store.put_bytes(prefix + name, data)
    return [Photo(name, prefix + name) for name in dict.fromkeys(names)]


def delete_photo(store: ArtifactStore, settings: Settings, user_id: str, name: str) -> bool:
    """Delete the user's photo `name`; `False` when they have none of that name (models
    already requested keep their own snapshot)."""
    return _delete_named(store, photos_prefix(settings.bucket, user_id), name, PHOTO_NAME)


# ---------------------------------------------------------------------------- presigned uploads


def list_uploads(store: ArtifactStore, settings: Settings, user_id: str) -> list[PendingUpload]:
    """The user's uploads not yet collected, by id, with their sizes (nothing is read)."""
    prefix = uploads_prefix(settings.bucket, user_id)
    return [
        PendingUpload(uri[len(prefix) :], uri, store.size(uri))
        for uri in sorted(store.list(prefix))
    ]


def reserve_uploads(
    store: ArtifactStore, settings: Settings, user_id: str, count: int
) -> list[str]:
    """URIs for `count` new uploads, when the user has room for them: stored photos, pending
    uploads and these together stay within `MAX_PHOTOS`.

    Raises:
        OnboardingError: no room (field `count`).
    """
    stored = len(list_photos(store, settings, user_id))
    pending = len(store.list(uploads_prefix(settings.bucket, user_id)))
    room = max(0, MAX_PHOTOS - stored - pending)
    if count > room:
        raise OnboardingError(
            f"a user keeps at most {MAX_PHOTOS} photos; {stored} are stored and {pending} "
            f"uploads are pending, so {count} more would be too many: delete some first "
            "(DELETE /v1/photos/{name}, DELETE /v1/photos/uploads/{upload_id})",
            field="count",
            allowed=f"at most {room} more uploads",
        )
    prefix = uploads_prefix(settings.bucket, user_id)
    return [f"{prefix}{uuid.uuid4().hex}" for _ in range(count)]


def delete_upload(store: ArtifactStore, settings: Settings, user_id: str, upload_id: str) -> bool:
    """Delete the user's pending upload `upload_id`; `False` when they have none of that id."""
    return _delete_named(store, uploads_prefix(settings.bucket, user_id), upload_id, UPLOAD_ID)


def _delete_named(store: ArtifactStore, prefix: str, name: str, pattern: str) -> bool:
    """Delete `prefix + name` when `name` matches `pattern` (so it cannot leave the prefix)
    and the object exists; return whether it did."""
    if not re.fullmatch(pattern, name) or not store.exists(prefix + name):
        return False
    store.delete(prefix + name)
    return True


def collect_uploads(store: ArtifactStore, settings: Settings, user_id: str) -> list[Photo]:
    """Validate what the user posted with presigned forms and move it into their photos.

    Uploads are taken one at a time, each sized before it is read, so this holds one upload's
    bytes and pixels at most. An upload over `UPLOAD_RULES.max_bytes` is deleted unread. Good
    uploads become photos; refused ones stay pending (`delete_upload` removes them).

    Raises:
        OnboardingError: more uploads pending than the user has room for (field `uploads`);
            nothing is read.
        InstanceImageError: every refused upload, named by id, once the good ones are moved.
    """
    pending = list_uploads(store, settings, user_id)
    if not pending:
        return []
    stored = len(list_photos(store, settings, user_id))
    if stored + len(pending) > MAX_PHOTOS:
        raise OnboardingError(
            f"a user keeps at most {MAX_PHOTOS} photos; {stored} are stored and "
            f"{len(pending)} uploads are pending: delete some first "
            "(GET /v1/photos/uploads, DELETE /v1/photos/uploads/{upload_id})",
            field="uploads",
            allowed=f"at most {max(0, MAX_PHOTOS - stored)} pending uploads",
        )
    added: list[Photo] = []
    problems: list[Problem] = []
    for upload in pending:
        if upload.size > UPLOAD_RULES.max_bytes:
            store.delete(upload.uri)
            problems.append(_too_large(upload))
            continue
        try:
            added += add_photos(
                store, settings, user_id, [(upload.id, store.get_bytes(upload.uri))]
            )
        except InstanceImageError as error:
            problems += error.problems
            continue
        store.delete(upload.uri)
    if problems:
        raise InstanceImageError(problems)
    return added


def _too_large(upload: PendingUpload) -> Problem:
    limit = UPLOAD_RULES.max_bytes
    return Problem(
        upload.id,
        "bytes",
        f"{upload.size:,} bytes is too large; the upload was deleted without being read",
        f"1 byte to {limit:,} bytes per file",
    )
