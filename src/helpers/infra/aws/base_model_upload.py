"""A local base model as a SageMaker training job's input: uploaded once, named by its content.

A SageMaker job reads its base model from an `s3://` folder (the `base_model` channel) or a hub
id; it cannot read a directory of this machine, such as the workshop's default
`assets/tiny-sd-shapes`. `training_base_model` uploads such a directory to
`s3://<bucket>/base-models/<dirname>-<12 hex of a SHA-256 over its files>/`: the same files give
the same folder, so later jobs (and a retried upload) send only what is not there yet, and a
changed model gets a new folder instead of overwriting the one a running job reads.

Example:

    base = training_base_model(store, settings, settings.base_model)
    # "s3://workshop-artifacts/base-models/tiny-sd-shapes-3f2a9c1b0d4e/"
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from helpers.domain.archives import base_model_files, content_name
from helpers.domain.paths import base_models_prefix
from helpers.domain.uris import S3Uri

if TYPE_CHECKING:
    from helpers.ports.store import ArtifactStore
    from helpers.settings import Settings

__all__ = [
    "is_local_base_model",
    "training_base_model",
    "upload_base_model",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def upload_base_model(store: ArtifactStore, settings: Settings, directory: str | Path) -> str:
    """Upload the pipeline `directory` to the store once; return its `s3://` folder.

    The folder is `s3://<settings.bucket>/base-models/<dirname>-<sha256 12 hex>/`, the digest
    covering every file's path and content (`archives.content_name`). Files already in that
    folder are not sent again, so a second call with the same files uploads nothing.

    Raises:
        ValueError: `directory` is not a directory or holds no files.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ValueError(f"base_model {str(directory)!r} is not a directory")
    files = base_model_files(root)
    if not files:
        raise ValueError(f"base_model {str(directory)!r} holds no files to upload")
    stem = _UNSAFE.sub("-", root.resolve().name).strip("-.") or "base-model"
    prefix = S3Uri.parse_prefix(base_models_prefix(settings.bucket)).join(
        content_name(f"{stem}-", files)
    )
    folder = f"{prefix}/"
    present = set(store.list(prefix))
    for name, path in files.items():
        if folder + name not in present:
            store.put_file(folder + name, path)
    return folder


def is_local_base_model(base_model: str) -> bool:
    """Whether `base_model` names an existing directory of this machine (not an `s3://` folder
    or a hub id)."""
    return not base_model.startswith("s3://") and Path(base_model).expanduser().is_dir()


def training_base_model(store: ArtifactStore, settings: Settings, base_model: str) -> str:
    """`base_model` as a SageMaker training job reads it: an existing local directory is
    uploaded (`upload_base_model`) and its `s3://` folder returned; an `s3://` folder or a hub
    id is returned as it is."""
    if not is_local_base_model(base_model):
        return base_model
    return upload_base_model(store, settings, base_model)
