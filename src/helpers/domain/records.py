"""The domain's records: users, their models, a model's lifecycle and training jobs.

Both metadata backends keep the same item shape, the one of the DynamoDB table: partition key
`user_id`, sort key `sk` (`"USER"` for the user, `"MODEL#<model_id>"` for each model,
`"JOB#<job_name>"` for each training job), and an `entity` attribute. All of a user's items
share a partition, so one query finds them all and deleting a user is a delete of one
partition.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from types import MappingProxyType
from typing import Any

from helpers.domain.uris import S3Uri

USER_SK = "USER"
MODEL_SK_PREFIX = "MODEL#"
JOB_SK_PREFIX = "JOB#"

_ID_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
# SageMaker allows upper case too; lower case keeps job names valid as paths and S3 keys.
_JOB_NAME_RE = re.compile(r"^[a-z0-9](-?[a-z0-9])*$")
MAX_JOB_NAME = 63


class ModelStatus(str, Enum):
    """Where a user's model is in onboarding."""

    REQUESTED = "REQUESTED"
    TRAINING = "TRAINING"
    PACKAGING = "PACKAGING"
    AVAILABLE = "AVAILABLE"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value


#: The allowed moves of the onboarding state machine. Any step may fail; a failed model may be
#: requested again; an available model is final (retraining makes a new model id).
TRANSITIONS: Mapping[ModelStatus, frozenset[ModelStatus]] = MappingProxyType(
    {
        ModelStatus.REQUESTED: frozenset({ModelStatus.TRAINING, ModelStatus.FAILED}),
        ModelStatus.TRAINING: frozenset({ModelStatus.PACKAGING, ModelStatus.FAILED}),
        ModelStatus.PACKAGING: frozenset({ModelStatus.AVAILABLE, ModelStatus.FAILED}),
        ModelStatus.AVAILABLE: frozenset(),
        ModelStatus.FAILED: frozenset({ModelStatus.REQUESTED}),
    }
)


class InvalidTransition(ValueError):
    """A status change that the onboarding state machine does not allow."""


def can_move(current: ModelStatus | str, new: ModelStatus | str) -> bool:
    """Whether a model may go from status `current` to status `new` (staying put is no move).

    Raises:
        ValueError: when either value is not a `ModelStatus`.
    """
    return ModelStatus(new) in TRANSITIONS[ModelStatus(current)]


def check_id(name: str, value: str) -> str:
    """Return `value` if it is a valid id (1-64 of `a-z`, `0-9`, `-`, `_`), else raise
    `ValueError` naming the field `name`. Ids appear in keys and paths, so they stay plain."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ValueError(f"{name} {value!r} must be 1-64 characters of a-z, 0-9, '-' and '_'")
    return value


def check_job_name(value: str) -> str:
    """Return `value` if it is a valid training job name (1-63 of `a-z`, `0-9` and `-`, not
    starting or ending with `-`, no `--`), else raise `ValueError` naming `job_name`."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_JOB_NAME
        or not _JOB_NAME_RE.match(value)
    ):
        raise ValueError(
            f"job_name {value!r} must be 1-{MAX_JOB_NAME} characters of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string of fixed width, so strings sort by time."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _check_timestamp(name: str, value: str) -> None:
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not an ISO-8601 timestamp") from None
    if parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:
        raise ValueError(f"{name} {value!r} must be in UTC (+00:00)")


def _check_optional_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or None, got {value!r}")


def _check_version(value: Any) -> None:
    # bool is an int subclass; True as a version is a bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"version must be an integer >= 1, got {value!r}")


def _check_entity(item: Mapping[str, Any], entity: str, sk: str | None = None) -> None:
    if item.get("entity") != entity or (sk is not None and item.get("sk") != sk):
        raise ValueError(
            f"item is not a {entity} item (entity={item.get('entity')!r}, sk={item.get('sk')!r})"
        )


@dataclass(frozen=True)
class UserRecord:
    """A tenant of the SaaS.

    Args:
        user_id (`str`): 1-64 of `a-z0-9-_`.
        created_at (`str`, defaults to now): ISO-8601 UTC.
        updated_at (`str`, defaults to `created_at`): ISO-8601 UTC.
        api_key_hash (`str`, *optional*): hash of the user's API key; never the key itself.
        display_name (`str`, *optional*): a name to show.
        deleting_since (`str`, *optional*): ISO-8601 UTC, when the deletion of the user's
            data began; set once, it stays until the user's records go.
        version (`int`, defaults to 1): bumped on every write.
    """

    user_id: str
    created_at: str = field(default_factory=utc_now)
    updated_at: str = ""
    api_key_hash: str | None = None
    display_name: str | None = None
    deleting_since: str | None = None
    version: int = 1

    def __post_init__(self) -> None:
        check_id("user_id", self.user_id)
        if not self.updated_at:
            object.__setattr__(self, "updated_at", self.created_at)
        _check_timestamp("created_at", self.created_at)
        _check_timestamp("updated_at", self.updated_at)
        _check_optional_str("api_key_hash", self.api_key_hash)
        _check_optional_str("display_name", self.display_name)
        if self.deleting_since is not None:
            _check_timestamp("deleting_since", self.deleting_since)
        _check_version(self.version)

    def to_item(self) -> dict[str, Any]:
        """The DynamoDB item (plain Python values); attributes that are None are left out."""
        item = {"user_id": self.user_id, "sk": USER_SK, "entity": "USER"}
        item.update(_present(self, exclude={"user_id"}))
        return item

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> UserRecord:
        """Build a record from an item of `to_item`'s shape (numbers may be `Decimal`).

        Raises:
            ValueError: when the item is not a user item or a value is invalid.
        """
        _check_entity(item, "USER", USER_SK)
        values = {f.name: item[f.name] for f in fields(cls) if f.name in item}
        values["version"] = _as_int(values.get("version", 1))
        return cls(**values)


@dataclass(frozen=True)
class ModelRecord:
    """One personal model of a user and its onboarding state.

    Args:
        user_id (`str`): the owner, 1-64 of `a-z0-9-_`.
        model_id (`str`): 1-64 of `a-z0-9-_`, unique per user.
        status (`ModelStatus`, defaults to `REQUESTED`): where onboarding is.
        created_at (`str`, defaults to now): ISO-8601 UTC.
        updated_at (`str`, defaults to `created_at`): ISO-8601 UTC.
        instance_data_uri (`str`, *optional*): `s3://` folder of the user's training photos.
        training_job_name (`str`, *optional*): the training job that builds the model.
        model_artifact_uri (`str`, *optional*): `s3://` URI of the packaged model.
        endpoint_model_name (`str`, *optional*): the model's name on the endpoint.
        failure_reason (`str`, *optional*): why onboarding failed, for the user to read: a
            phrase of `helpers.domain.failures` and a reference, never internal details.
        params (`dict`, defaults to `{}`): JSON-serialisable training parameters and notes.
        version (`int`, defaults to 1): bumped on every write, for optimistic concurrency.
    """

    user_id: str
    model_id: str
    status: ModelStatus = ModelStatus.REQUESTED
    created_at: str = field(default_factory=utc_now)
    updated_at: str = ""
    instance_data_uri: str | None = None
    training_job_name: str | None = None
    model_artifact_uri: str | None = None
    endpoint_model_name: str | None = None
    failure_reason: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    version: int = 1

    def __post_init__(self) -> None:
        check_id("user_id", self.user_id)
        check_id("model_id", self.model_id)
        try:
            object.__setattr__(self, "status", ModelStatus(self.status))
        except ValueError:
            raise ValueError(
                f"status {self.status!r} must be one of {[s.value for s in ModelStatus]}"
            ) from None
        if not self.updated_at:
            object.__setattr__(self, "updated_at", self.created_at)
        _check_timestamp("created_at", self.created_at)
        _check_timestamp("updated_at", self.updated_at)
        for name in ("training_job_name", "endpoint_model_name", "failure_reason"):
            _check_optional_str(name, getattr(self, name))
        if self.instance_data_uri is not None:
            _check_uri("instance_data_uri", self.instance_data_uri, S3Uri.parse_prefix)
        if self.model_artifact_uri is not None:
            _check_uri("model_artifact_uri", self.model_artifact_uri, S3Uri.parse)
        if not isinstance(self.params, dict):
            raise ValueError(f"params must be a dict, got {type(self.params).__name__}")
        try:
            json.dumps(self.params, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"params must be JSON-serialisable: {error}") from None
        _check_version(self.version)

    @property
    def sk(self) -> str:
        """The item's sort key, `MODEL#<model_id>`."""
        return f"{MODEL_SK_PREFIX}{self.model_id}"

    def to_item(self) -> dict[str, Any]:
        """The DynamoDB item (plain Python values); attributes that are None are left out.

        `params` is stored as a JSON string: DynamoDB numbers refuse Python floats and come
        back as `Decimal`, while a string round-trips exactly and is never queried into.
        """
        item = {"user_id": self.user_id, "sk": self.sk, "entity": "MODEL"}
        item.update(_present(self, exclude={"user_id", "params"}))
        item["status"] = self.status.value
        item["params"] = json.dumps(self.params, sort_keys=True)
        return item

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> ModelRecord:
        """Build a record from an item of `to_item`'s shape (numbers may be `Decimal`).

        Raises:
            ValueError: when the item is not a model item or a value is invalid.
        """
        _check_entity(item, "MODEL")
        values = {f.name: item[f.name] for f in fields(cls) if f.name in item}
        values["version"] = _as_int(values.get("version", 1))
        params = values.get("params", "{}")
        values["params"] = json.loads(params) if isinstance(params, str) else dict(params)
        record = cls(**values)
        if item.get("sk") != record.sk:
            raise ValueError(f"item sk {item.get('sk')!r} does not match model_id {record.sk!r}")
        return record


def _check_uri(name: str, value: Any, parse) -> None:
    try:
        parse(value)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _present(record: Any, exclude: set[str]) -> dict[str, Any]:
    return {
        f.name: getattr(record, f.name)
        for f in fields(record)
        if f.name not in exclude and getattr(record, f.name) is not None
    }


def _as_int(value: Any) -> Any:
    # DynamoDB returns numbers as Decimal; anything that is not a whole number fails validation.
    if not isinstance(value, (int, bool)) and hasattr(value, "as_integer_ratio"):
        numerator, denominator = value.as_integer_ratio()
        if denominator == 1:
            return numerator
    return value


class JobStatus(str, Enum):
    """Where a training job is; the names follow SageMaker's (InProgress is RUNNING)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        """Whether the job has ended (COMPLETED, FAILED or STOPPED)."""
        return self in FINAL_JOB_STATUSES


FINAL_JOB_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED})

#: The allowed moves of a job: a pending job may start or never start; an ended job is final.
JOB_TRANSITIONS: Mapping[JobStatus, frozenset[JobStatus]] = MappingProxyType(
    {
        JobStatus.PENDING: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.STOPPED}),
        JobStatus.RUNNING: frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.STOPPED}),
        JobStatus.COMPLETED: frozenset(),
        JobStatus.FAILED: frozenset(),
        JobStatus.STOPPED: frozenset(),
    }
)


def can_move_job(current: JobStatus | str, new: JobStatus | str) -> bool:
    """Whether a job may go from status `current` to status `new` (staying put is no move)."""
    return JobStatus(new) in JOB_TRANSITIONS[JobStatus(current)]


@dataclass(frozen=True)
class JobRecord:
    """One training job of a user's model, as the training jobs port keeps it.

    Args:
        job_name (`str`): 1-63 of `a-z0-9-` (see `check_job_name`).
        user_id (`str`): the owner, 1-64 of `a-z0-9-_`.
        model_id (`str`): the model the job trains, 1-64 of `a-z0-9-_`.
        status (`JobStatus`, defaults to `PENDING`): where the job is.
        created_at (`str`, defaults to now): ISO-8601 UTC, when it was submitted.
        started_at (`str`, *optional*): ISO-8601 UTC, when its process started.
        ended_at (`str`, *optional*): ISO-8601 UTC, when it ended.
        hyperparameters (`dict`, defaults to `{}`): JSON-serialisable `--name value` pairs.
        instance_data_uri (`str`, *optional*): `s3://` folder of the training photos.
        base_model (`str`, *optional*): the base pipeline (directory, `s3://` or hub id).
        output_uri (`str`, *optional*): `s3://.../<job_name>/output/model.tar.gz`.
        failure_reason (`str`, *optional*): why it failed, for operators (it may hold log
            lines and paths; users read their model's reason).
        last_step (`int`, *optional*): the last training step logged.
        last_loss (`float`, *optional*): the loss logged at `last_step`.
        version (`int`, defaults to 1): bumped on every write.
    """

    job_name: str
    user_id: str
    model_id: str
    status: JobStatus = JobStatus.PENDING
    created_at: str = field(default_factory=utc_now)
    started_at: str | None = None
    ended_at: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    instance_data_uri: str | None = None
    base_model: str | None = None
    output_uri: str | None = None
    failure_reason: str | None = None
    last_step: int | None = None
    last_loss: float | None = None
    version: int = 1

    def __post_init__(self) -> None:
        check_job_name(self.job_name)
        check_id("user_id", self.user_id)
        check_id("model_id", self.model_id)
        try:
            object.__setattr__(self, "status", JobStatus(self.status))
        except ValueError:
            raise ValueError(
                f"status {self.status!r} must be one of {[s.value for s in JobStatus]}"
            ) from None
        _check_timestamp("created_at", self.created_at)
        for name in ("started_at", "ended_at"):
            if getattr(self, name) is not None:
                _check_timestamp(name, getattr(self, name))
        for name in ("failure_reason", "base_model"):
            _check_optional_str(name, getattr(self, name))
        if self.instance_data_uri is not None:
            _check_uri("instance_data_uri", self.instance_data_uri, S3Uri.parse_prefix)
        if self.output_uri is not None:
            _check_uri("output_uri", self.output_uri, S3Uri.parse)
        if not isinstance(self.hyperparameters, dict):
            raise ValueError(
                f"hyperparameters must be a dict, got {type(self.hyperparameters).__name__}"
            )
        try:
            json.dumps(self.hyperparameters, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"hyperparameters must be JSON-serialisable: {error}") from None
        if self.last_step is not None and (
            not isinstance(self.last_step, int) or isinstance(self.last_step, bool)
        ):
            raise ValueError(f"last_step must be an integer or None, got {self.last_step!r}")
        if self.last_loss is not None:
            if not isinstance(self.last_loss, (int, float)) or isinstance(self.last_loss, bool):
                raise ValueError(f"last_loss must be a number or None, got {self.last_loss!r}")
            object.__setattr__(self, "last_loss", float(self.last_loss))
        _check_version(self.version)

    @property
    def sk(self) -> str:
        """The item's sort key, `JOB#<job_name>`."""
        return f"{JOB_SK_PREFIX}{self.job_name}"

    def to_item(self) -> dict[str, Any]:
        """The DynamoDB item (plain Python values); attributes that are None are left out.

        `hyperparameters` is a JSON string and `last_loss` its `repr`, because DynamoDB
        numbers refuse Python floats (see `ModelRecord.to_item`).
        """
        item = {"user_id": self.user_id, "sk": self.sk, "entity": "JOB"}
        item.update(_present(self, exclude={"user_id", "hyperparameters", "last_loss"}))
        item["status"] = self.status.value
        item["hyperparameters"] = json.dumps(self.hyperparameters, sort_keys=True)
        if self.last_loss is not None:
            item["last_loss"] = repr(self.last_loss)
        return item

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> JobRecord:
        """Build a record from an item of `to_item`'s shape (numbers may be `Decimal`).

        Raises:
            ValueError: when the item is not a job item or a value is invalid.
        """
        _check_entity(item, "JOB")
        values = {f.name: item[f.name] for f in fields(cls) if f.name in item}
        values["version"] = _as_int(values.get("version", 1))
        if "last_step" in values:
            values["last_step"] = _as_int(values["last_step"])
        if "last_loss" in values:
            values["last_loss"] = float(values["last_loss"])
        hyperparameters = values.get("hyperparameters", "{}")
        values["hyperparameters"] = (
            json.loads(hyperparameters)
            if isinstance(hyperparameters, str)
            else dict(hyperparameters)
        )
        record = cls(**values)
        if item.get("sk") != record.sk:
            raise ValueError(f"item sk {item.get('sk')!r} does not match job_name {record.sk!r}")
        return record
