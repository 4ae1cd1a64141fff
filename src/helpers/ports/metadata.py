"""The metadata store port: users, their models and training jobs, with optimistic concurrency.

`helpers.backend.open_backend(settings).metadata` gives SQLite locally and DynamoDB on the
sagemaker backend; both keep
the item shape of `helpers.domain.records`. Every model write bumps `version`, and `update_model`
writes only if the caller saw the latest one, so concurrent workers never lose an update.

A deleted user leaves a tombstone at their key (`tombstone_item`: the id and `deleted_at`, no
key hash, no personal data), so their id, and with it every model, job and execution name made
from it, is never given to anyone else (`UserIdRetired`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from helpers.domain.records import (
    USER_SK,
    InvalidTransition,
    JobRecord,
    JobStatus,
    ModelRecord,
    ModelStatus,
    UserRecord,
    can_move,
    can_move_job,
    check_id,
    check_job_name,
    utc_now,
)

if TYPE_CHECKING:
    pass

__all__ = [
    "JOB_UPDATABLE_FIELDS",
    "TOMBSTONE_ENTITY",
    "UPDATABLE_FIELDS",
    "USER_UPDATABLE_FIELDS",
    "AlreadyExists",
    "InvalidTransition",
    "MetadataError",
    "MetadataStore",
    "NotFound",
    "TableMissing",
    "UserIdRetired",
    "VersionConflict",
    "apply_changes",
    "apply_job_changes",
    "apply_user_changes",
    "check_changes",
    "check_job_changes",
    "check_user_changes",
    "tombstone_item",
]

#: The model fields `update_model` may change; the rest are keys or kept by the store.
UPDATABLE_FIELDS = frozenset(
    {
        "status",
        "instance_data_uri",
        "training_job_name",
        "model_artifact_uri",
        "endpoint_model_name",
        "failure_reason",
        "params",
    }
)

#: The job fields `update_job` may change.
JOB_UPDATABLE_FIELDS = frozenset(
    {"status", "started_at", "ended_at", "output_uri", "failure_reason", "last_step", "last_loss"}
)

#: The user fields `update_user` may change.
USER_UPDATABLE_FIELDS = frozenset({"api_key_hash", "display_name", "deleting_since"})

#: The `entity` of a deleted user's tombstone, the item that keeps their id retired.
TOMBSTONE_ENTITY = "TOMBSTONE"


def tombstone_item(user_id: str, deleted_at: str | None = None) -> dict[str, Any]:
    """The item a deleted user leaves at their key (sk `USER`): the id and when, nothing else."""
    check_id("user_id", user_id)
    return {
        "user_id": user_id,
        "sk": USER_SK,
        "entity": TOMBSTONE_ENTITY,
        "deleted_at": deleted_at or utc_now(),
    }


class MetadataError(Exception):
    """Base of the metadata store's errors."""


class AlreadyExists(MetadataError):
    """A user or model with this key is already stored."""


class UserIdRetired(AlreadyExists):
    """The user id belonged to a deleted user: ids are never reused, so neither are the model,
    job and execution names made from them."""


class NotFound(MetadataError, KeyError):
    """No user or model with this key."""

    def __str__(self) -> str:
        # KeyError would quote the message; this one is meant to be read.
        return str(self.args[0]) if self.args else ""


class VersionConflict(MetadataError):
    """The stored version is not the one the caller expected: re-read and try again.

    Attributes:
        expected (`int`): the version the caller passed.
        actual (`int`): the version stored now.
    """

    def __init__(self, message: str, expected: int, actual: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class TableMissing(MetadataError):
    """The table (or database) does not exist yet: `create_table()` or provisioning makes it."""


class MetadataStore(abc.ABC):
    """Users and their models in one table keyed by (`user_id`, `sk`)."""

    @abc.abstractmethod
    def create_table(self) -> None:
        """Create the table; an existing one is fine."""

    @abc.abstractmethod
    def put_user(self, user: UserRecord) -> None:
        """Store a new user.

        Raises:
            UserIdRetired: when `user.user_id` belonged to a deleted user.
            AlreadyExists: when `user.user_id` is already stored.
        """

    @abc.abstractmethod
    def get_user(self, user_id: str) -> UserRecord | None:
        """The user `user_id`, or None (also for a deleted user)."""

    @abc.abstractmethod
    def list_users(self) -> list[UserRecord]:
        """All users, oldest first (deleted users are not users)."""

    @abc.abstractmethod
    def update_user(self, user_id: str, *, expected_version: int, **changes: Any) -> UserRecord:
        """Change fields of a user if it is still at `expected_version` (a new API key's hash,
        say: the old key stops working with this write).

        Args:
            user_id (`str`): the user.
            expected_version (`int`): the `version` of the record the change was based on.
            **changes: new values of fields in `USER_UPDATABLE_FIELDS`.

        Returns:
            `UserRecord`: the stored record, with `version` + 1 and a new `updated_at`.

        Raises:
            ValueError: naming fields that are unknown or may not change, or invalid values.
            NotFound: when there is no such user.
            VersionConflict: when the stored version is not `expected_version`.
            InvalidTransition: when `deleting_since`, once set, would change.
        """

    @abc.abstractmethod
    def delete_user(self, user_id: str) -> int:
        """Delete the user's models and jobs and put a tombstone in place of the user (when
        there was one), so the id is never reused; return how many items went, the user
        included (0 if none)."""

    @abc.abstractmethod
    def create_model(self, model: ModelRecord) -> None:
        """Store a new model of an existing user.

        Raises:
            AlreadyExists: when the user already has a model `model.model_id`.
            NotFound: when the user `model.user_id` does not exist, or is being deleted
                (`UserRecord.deleting_since`).
        """

    @abc.abstractmethod
    def get_model(self, user_id: str, model_id: str) -> ModelRecord | None:
        """The model `model_id` of `user_id`, or None."""

    @abc.abstractmethod
    def list_models(self, user_id: str) -> list[ModelRecord]:
        """The models of `user_id`, oldest first."""

    @abc.abstractmethod
    def update_model(
        self, user_id: str, model_id: str, *, expected_version: int, **changes: Any
    ) -> ModelRecord:
        """Change fields of a model if it is still at `expected_version`.

        Args:
            user_id (`str`): the owner.
            model_id (`str`): the model.
            expected_version (`int`): the `version` of the record the change was based on.
            **changes: new values of fields in `UPDATABLE_FIELDS`.

        Returns:
            `ModelRecord`: the stored record, with `version` + 1 and a new `updated_at`.

        Raises:
            ValueError: naming fields that are unknown or may not change, or invalid values.
            NotFound: when there is no such model.
            VersionConflict: when the stored version is not `expected_version`.
            InvalidTransition: when `status` may not move to the new value (`can_move`).
        """

    @abc.abstractmethod
    def delete_model(self, user_id: str, model_id: str) -> bool:
        """Delete a model; return whether it existed."""

    @abc.abstractmethod
    def put_job(self, job: JobRecord) -> None:
        """Store a new training job (its user need not exist: jobs are the jobs port's).

        Raises:
            AlreadyExists: when the user already has a job `job.job_name`.
        """

    @abc.abstractmethod
    def get_job(self, user_id: str, job_name: str) -> JobRecord | None:
        """The job `job_name` of `user_id`, or None."""

    @abc.abstractmethod
    def delete_job(self, user_id: str, job_name: str) -> bool:
        """Delete a job's record; return whether it existed."""

    @abc.abstractmethod
    def list_jobs(self, user_id: str | None = None) -> list[JobRecord]:
        """The jobs of `user_id` (of every user when None), oldest first."""

    @abc.abstractmethod
    def update_job(
        self, user_id: str, job_name: str, *, expected_version: int | None = None, **changes: Any
    ) -> JobRecord:
        """Change fields of a job, if it is still at `expected_version` when one is given.

        Args:
            user_id (`str`): the owner.
            job_name (`str`): the job.
            expected_version (`int`, *optional*): the `version` the change was based on; None
                writes over whatever is stored (the status rules still apply).
            **changes: new values of fields in `JOB_UPDATABLE_FIELDS`.

        Returns:
            `JobRecord`: the stored record, with `version` + 1.

        Raises:
            ValueError: naming fields that are unknown or may not change, or invalid values.
            NotFound: when there is no such job.
            VersionConflict: when the stored version is not `expected_version`.
            InvalidTransition: when `status` may not move to the new value (`can_move_job`),
                for example out of a final status.
        """


def check_changes(expected_version: int, changes: Mapping[str, Any]) -> None:
    """Raise `ValueError` naming `expected_version` or the fields of `changes` that
    `update_model` does not accept. Adapters call this before touching the store."""
    if (
        not isinstance(expected_version, int)
        or isinstance(expected_version, bool)
        or expected_version < 1
    ):
        raise ValueError(f"expected_version must be an integer >= 1, got {expected_version!r}")
    refused = sorted(set(changes) - UPDATABLE_FIELDS)
    if refused:
        raise ValueError(
            f"update_model cannot change field(s) {refused}; it changes {sorted(UPDATABLE_FIELDS)}"
        )


def apply_changes(
    current: ModelRecord, expected_version: int, changes: Mapping[str, Any]
) -> ModelRecord:
    """The record that `update_model` stores: `current` with `changes`, next version, new
    `updated_at`. Shared by the adapters so both enforce the same rules.

    Raises:
        VersionConflict: when `current.version` is not `expected_version`.
        InvalidTransition: when the status change is not allowed.
        ValueError: when a new value is invalid.
    """
    values = _checked_changes(
        f"model {current.user_id}/{current.model_id}",
        current,
        expected_version,
        changes,
        ModelStatus,
        can_move,
    )
    return dataclasses.replace(current, **values, updated_at=utc_now(), version=current.version + 1)


def check_user_changes(expected_version: int, changes: Mapping[str, Any]) -> None:
    """Raise `ValueError` naming `expected_version` or the fields of `changes` that
    `update_user` does not accept. Adapters call this before touching the store."""
    check_changes(expected_version, {})
    refused = sorted(set(changes) - USER_UPDATABLE_FIELDS)
    if refused:
        raise ValueError(
            f"update_user cannot change field(s) {refused}; it changes "
            f"{sorted(USER_UPDATABLE_FIELDS)}"
        )


def apply_user_changes(
    current: UserRecord, expected_version: int, changes: Mapping[str, Any]
) -> UserRecord:
    """The record that `update_user` stores: `current` with `changes`, next version, new
    `updated_at`.

    Raises:
        VersionConflict: when `current.version` is not `expected_version`.
        InvalidTransition: when `deleting_since` is set and would change: a deletion that
            began is finished, never undone.
        ValueError: when a new value is invalid.
    """
    # Without a status, the shared checks are the version's alone.
    values = _checked_changes(f"user {current.user_id}", current, expected_version, changes)
    since = current.deleting_since
    if since is not None and values.get("deleting_since", since) != since:
        raise InvalidTransition(
            f"user {current.user_id} is being deleted since {since}; that cannot change"
        )
    return dataclasses.replace(current, **values, updated_at=utc_now(), version=current.version + 1)


def check_job_changes(expected_version: int | None, changes: Mapping[str, Any]) -> None:
    """Raise `ValueError` naming `expected_version` or the fields of `changes` that
    `update_job` does not accept. Adapters call this before touching the store."""
    if expected_version is not None and (
        not isinstance(expected_version, int)
        or isinstance(expected_version, bool)
        or expected_version < 1
    ):
        raise ValueError(
            f"expected_version must be None or an integer >= 1, got {expected_version!r}"
        )
    refused = sorted(set(changes) - JOB_UPDATABLE_FIELDS)
    if refused:
        raise ValueError(
            f"update_job cannot change field(s) {refused}; it changes "
            f"{sorted(JOB_UPDATABLE_FIELDS)}"
        )


def apply_job_changes(
    current: JobRecord, expected_version: int | None, changes: Mapping[str, Any]
) -> JobRecord:
    """The record that `update_job` stores: `current` with `changes` and the next version.

    Raises:
        VersionConflict: when `expected_version` is given and is not `current.version`.
        InvalidTransition: when the status change is not allowed.
        ValueError: when a new value is invalid.
    """
    values = _checked_changes(
        f"job {current.user_id}/{current.job_name}",
        current,
        expected_version,
        changes,
        JobStatus,
        can_move_job,
    )
    return dataclasses.replace(current, **values, version=current.version + 1)


def _checked_changes(
    label: str,
    current: Any,
    expected_version: int | None,
    changes: Mapping[str, Any],
    status_type: type | None = None,
    may_move: Any = None,
) -> dict[str, Any]:
    """`changes` with the status as `status_type`, after the checks models and jobs share:
    the version (when `expected_version` is given) and the status transition."""
    if expected_version is not None and current.version != expected_version:
        raise VersionConflict(
            f"{label} is at version {current.version}, "
            f"not {expected_version}: re-read it and apply the change again",
            expected=expected_version,
            actual=current.version,
        )
    values = dict(changes)
    if "status" in values:
        try:
            values["status"] = status_type(values["status"])
        except ValueError:
            raise ValueError(
                f"status {values['status']!r} must be one of {[s.value for s in status_type]}"
            ) from None
        # Setting the status it already has is a no-op, so retried workers stay idempotent.
        if values["status"] != current.status and not may_move(current.status, values["status"]):
            raise InvalidTransition(
                f"{label} cannot move from {current.status.value} to {values['status'].value}"
            )
    return values


def check_ids(user_id: str, model_id: str | None = None) -> None:
    """Raise `ValueError` naming `user_id` or `model_id` when it is not a valid id."""
    check_id("user_id", user_id)
    if model_id is not None:
        check_id("model_id", model_id)


def check_job_ids(user_id: str | None, job_name: str | None = None) -> None:
    """Raise `ValueError` naming `user_id` or `job_name` when it is not valid (None skips)."""
    if user_id is not None:
        check_id("user_id", user_id)
    if job_name is not None:
        check_job_name(job_name)


def check_record(name: str, value: Any, kind: type) -> None:
    """Raise `ValueError` naming the argument `name` unless `value` is a `kind`."""
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
