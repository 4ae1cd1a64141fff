"""The workshop's settings: one object, read from ``WORKSHOP_*`` environment variables.

Notebooks override any field from their papermill parameters with ``load_settings(**overrides)``;
services and tests use the cached ``get_settings()``. Every error names the setting and the fix.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "WORKSHOP_"

#: The repository root when the package is installed from a checkout (``pip install -e .``).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: The committed tiny base model that ``make base-model`` rebuilds.
DEFAULT_BASE_MODEL = PROJECT_ROOT / "assets" / "tiny-sd-shapes"

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION_RE = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
#: A model hub id, `org/name` (accepted as a base model on the sagemaker backend).
HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+$")
#: A folder of a bucket, `s3://<bucket>/<key>/`: a pipeline uploaded to S3 (sagemaker backend).
S3_FOLDER_RE = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/([^/]+/)*[^/]*$")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable and the fix."""


class Settings(BaseSettings):
    """Where the workshop keeps things and which backend it talks to.

    Args:
        backend (`str`, defaults to `"local"`):
            `"local"` runs everything on this machine (files, SQLite, subprocess jobs, Triton);
            `"sagemaker"` uses S3, DynamoDB, SageMaker training jobs and endpoints.
        work_dir (`Path`, defaults to `<repo>/outputs`):
            Local state: the artifact store's directory tree, the SQLite database, logs.
        bucket (`str`, defaults to `"workshop-artifacts"`):
            The bucket of every `s3://bucket/key` URI (a directory under `work_dir` locally).
        region (`str`, defaults to `"us-east-1"`): AWS region for the sagemaker backend.
        table_name (`str`, defaults to `"workshop-models"`): the metadata table.
        base_model (`str`, defaults to the committed tiny model):
            A diffusers pipeline directory, stored as an absolute path (a relative one is looked
            up in the current directory, then in the project root), or a hub model id or an
            `s3://` folder (sagemaker backend only: the training jobs read it as a channel).
        role_arn (`str`, *optional*): SageMaker execution role (sagemaker backend).
        api_port, router_port, triton_http_port, triton_grpc_port, triton_metrics_port (`int`):
            Loopback ports of the local services.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    backend: Literal["local", "sagemaker"] = "local"
    work_dir: Path = PROJECT_ROOT / "outputs"
    bucket: str = "workshop-artifacts"
    region: str = "us-east-1"
    table_name: str = Field("workshop-models", min_length=3, max_length=255)
    base_model: str = str(DEFAULT_BASE_MODEL)
    role_arn: str | None = None
    api_port: int = Field(8000, ge=1024, le=65535)
    router_port: int = Field(8080, ge=1024, le=65535)
    triton_http_port: int = Field(8100, ge=1024, le=65535)
    triton_grpc_port: int = Field(8101, ge=1024, le=65535)
    triton_metrics_port: int = Field(8102, ge=1024, le=65535)

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        if not _BUCKET_RE.match(value) or ".." in value:
            raise ValueError(
                "must be 3-63 characters of lowercase letters, digits, '.' and '-', "
                "starting and ending with a letter or digit"
            )
        return value

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        if not _REGION_RE.match(value):
            raise ValueError("must look like an AWS region, for example 'us-east-1'")
        return value

    @field_validator("work_dir")
    @classmethod
    def _absolute_work_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("base_model")
    @classmethod
    def _check_base_model(cls, value: str, info: ValidationInfo) -> str:
        candidates = base_model_candidates(value)
        for candidate in candidates:
            if candidate.is_dir():
                return os.path.normpath(candidate)
        if info.data.get("backend") == "sagemaker" and HUB_ID_RE.match(value):
            return value
        if info.data.get("backend") == "sagemaker" and S3_FOLDER_RE.match(value):
            return value if value.endswith("/") else f"{value}/"
        looked = " or ".join(str(candidate) for candidate in dict.fromkeys(candidates))
        if any(candidate.resolve() == DEFAULT_BASE_MODEL for candidate in candidates):
            fix = "run `make base-model` to rebuild the workshop's tiny model there"
        else:
            fix = (
                "point it at a diffusers pipeline directory (a relative path is looked up in "
                "the current directory, then in the project root); a hub model id such as "
                "'org/name' or an s3:// folder works only with the sagemaker backend"
            )
        raise ValueError(f"{value!r} is not a directory (looked for {looked}): {fix}")

    @model_validator(mode="after")
    def _check_combination(self) -> Settings:
        ports = {
            name: getattr(self, name)
            for name in (
                "api_port",
                "router_port",
                "triton_http_port",
                "triton_grpc_port",
                "triton_metrics_port",
            )
        }
        by_port: dict[int, list[str]] = {}
        for name, port in ports.items():
            by_port.setdefault(port, []).append(f"{ENV_PREFIX}{name.upper()}")
        clashes = [
            f"{', '.join(names[:-1])} and {names[-1]} are {'both' if len(names) == 2 else 'all'} "
            f"{port}"
            for port, names in by_port.items()
            if len(names) > 1
        ]
        if clashes:
            raise ValueError(
                f"ports must all differ: {'; '.join(clashes)}; set one of each to a free port"
            )
        return self

    @property
    def store_root(self) -> Path:
        """Directory that holds the local artifact store's buckets."""
        return self.work_dir / "store"

    @property
    def metadata_path(self) -> Path:
        """The local metadata database."""
        return self.work_dir / "metadata.sqlite"

    @property
    def quotas_path(self) -> Path:
        """The local quota counters (their own database: every hit is a write)."""
        return self.work_dir / "quotas.sqlite"

    def uri(self, key: str) -> str:
        """The `s3://` URI of `key` in the workshop's bucket."""
        return f"s3://{self.bucket}/{key.lstrip('/')}"


def base_model_candidates(value: str) -> list[Path]:
    """Where a `base_model` directory is looked for: an absolute path (after ``~``) as it
    is; a relative one in the current directory, then in the project root, so that
    ``WORKSHOP_BASE_MODEL=assets/tiny-sd-shapes`` works from ``notebooks/`` too."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return [path]
    return [Path.cwd() / path, PROJECT_ROOT / path]


def _explain(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        where = f"{ENV_PREFIX}{field.upper()}" if field else "settings"
        reason = problem["msg"].removeprefix("Value error, ")
        got = problem.get("input")
        got_text = f" (got {got!r})" if field and not isinstance(got, dict) else ""
        fix = (
            f"set the environment variable {where} or pass {field}=... to load_settings()"
            if field
            else "fix the values named above"
        )
        lines.append(f"{where}: {reason}{got_text}; {fix}")
    return "invalid workshop settings:\n  " + "\n  ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment, with `overrides` (None values ignored) on top.

    Raises:
        SettingsError: naming each invalid setting, why, and how to fix it.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    unknown = sorted(set(given) - set(Settings.model_fields))
    if unknown:
        raise SettingsError(
            f"unknown setting(s) {unknown}; known settings: {sorted(Settings.model_fields)}"
        )
    try:
        return Settings(**given)
    except ValidationError as error:
        raise SettingsError(_explain(error)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings from the environment (cached; `cache_clear()` in tests)."""
    return load_settings()
