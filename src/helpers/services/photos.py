"""A user's photos of their subject: listed, added (validated, stored as PNG) and collected
from presigned uploads.

Photos live in the store under `users/<user_id>/`: `photos/` holds validated, normalized PNG
files; `uploads/` holds files a client put with presigned URLs, validated and moved into
`photos/` when fine-tuning starts; `training/<model_id>/` is the snapshot a model trains on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from helpers.domain.paths import photos_prefix, uploads_prefix
from helpers.services.errors import OnboardingError
from helpers.services.instance_images import ImageRules, normalize, validate_images

if TYPE_CHECKING:
    from helpers.ports.store import ArtifactStore
    from helpers.settings import Settings

#: Photos a user may keep; fewest a model trains on (DreamBooth wants a few views).
MAX_PHOTOS = 20
MIN_TRAINING_PHOTOS = 3
#: Each upload request: 1-10 files, the instance-image rules otherwise.
UPLOAD_RULES = ImageRules(min_images=1, max_images=10)


@dataclass(frozen=True)
class Photo:
    """One of a user's stored photos."""

    name: str
    uri: str


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

    Raises:
        InstanceImageError: every problem with every file; nothing is stored.
        OnboardingError: when the user would hold more than `MAX_PHOTOS`.
    """
    validated = validate_images(list(files), UPLOAD_RULES)
    pngs = [data for _, data in normalize(validated)]
    existing = {photo.name for photo in list_photos(store, settings, user_id)}
    names = [f"{hashlib.sha256(data).hexdigest()[:16]}.png" for data in pngs]
    new = {name: data for name, data in zip(names, pngs, strict=True) if name not in existing}
    if len(existing) + len(new) > MAX_PHOTOS:
        raise OnboardingError(
            f"a user keeps at most {MAX_PHOTOS} photos; {len(existing)} are stored and "
            f"{len(new)} would be added",
            field="files",
            allowed=f"at most {MAX_PHOTOS - len(existing)} more photos",
        )
    prefix = photos_prefix(settings.bucket, user_id)
    for name, data in new.items():
        store.put_bytes(prefix + name, data)
    return [Photo(name, prefix + name) for name in dict.fromkeys(names)]


def collect_uploads(store: ArtifactStore, settings: Settings, user_id: str) -> list[Photo]:
    """Validate what the user put with presigned URLs and move it into their photos."""
    uploaded = sorted(store.list(uploads_prefix(settings.bucket, user_id)))
    if not uploaded:
        return []
    files = [(uri.rsplit("/", 1)[-1], store.get_bytes(uri)) for uri in uploaded]
    added = add_photos(store, settings, user_id, files)
    for uri in uploaded:
        store.delete(uri)
    return added
