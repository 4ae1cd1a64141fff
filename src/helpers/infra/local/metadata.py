"""The metadata store in one SQLite file, with the DynamoDB table's item shape.

Safe for writers in several threads and processes: every call opens its own connection (an
sqlite3 connection must not be shared across threads, nor across a fork), the database runs in
WAL mode so readers never block the writer, and each read-modify-write holds the write lock
from its read to its write (`BEGIN IMMEDIATE`), waiting up to `timeout` seconds for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from helpers.domain.records import (
    JOB_SK_PREFIX,
    MODEL_SK_PREFIX,
    USER_SK,
    JobRecord,
    ModelRecord,
    UserRecord,
)
from helpers.ports.metadata import (
    TOMBSTONE_ENTITY,
    AlreadyExists,
    MetadataStore,
    NotFound,
    TableMissing,
    UserIdRetired,
    apply_changes,
    apply_job_changes,
    apply_user_changes,
    check_changes,
    check_ids,
    check_job_changes,
    check_job_ids,
    check_record,
    check_user_changes,
    tombstone_item,
)

__all__ = ["SqliteMetadataStore"]

# The item as JSON plus the columns that keys and sorting need.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    user_id    TEXT    NOT NULL,
    sk         TEXT    NOT NULL,
    entity     TEXT    NOT NULL,
    created_at TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    item       TEXT    NOT NULL,
    PRIMARY KEY (user_id, sk)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_by_entity ON items (entity, created_at);
"""


class SqliteMetadataStore(MetadataStore):
    """Users, models and training jobs in the SQLite database at `path`.

    Args:
        path (`str` or `os.PathLike`): the database file (`settings.metadata_path`); its
            directory is created when needed.
        timeout (`float`, defaults to 30.0): seconds to wait for another writer's lock.
    """

    def __init__(self, path: str | os.PathLike, timeout: float = 30.0) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"path must be a file path, got {path!r}")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.path = Path(path).expanduser().absolute()
        self.timeout = float(timeout)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def create_table(self) -> None:
        with self._connection() as connection:
            # WAL is a property of the file: set once, every later connection uses it.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)

    # -- users ----------------------------------------------------------------------------

    def put_user(self, user: UserRecord) -> None:
        check_record("user", user, UserRecord)
        with self._connection(write=True) as connection:
            try:
                connection.execute(_INSERT, _row(user.to_item()))
            except sqlite3.IntegrityError:
                # The write lock is held: the item read here is the one that refused the insert.
                if _entity(connection, user.user_id) == TOMBSTONE_ENTITY:
                    raise UserIdRetired(
                        f"user id {user.user_id!r} belonged to a deleted user; ids are never reused"
                    ) from None
                raise AlreadyExists(f"user {user.user_id!r} already exists") from None

    def get_user(self, user_id: str) -> UserRecord | None:
        check_ids(user_id)
        with self._connection() as connection:
            row = connection.execute(
                "SELECT item FROM items WHERE user_id = ? AND sk = ? AND entity = 'USER'",
                (user_id, USER_SK),
            ).fetchone()
        return UserRecord.from_item(json.loads(row[0])) if row else None

    def list_users(self) -> list[UserRecord]:
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT item FROM items WHERE entity = 'USER' ORDER BY created_at, user_id"
            ).fetchall()
        return [UserRecord.from_item(json.loads(row[0])) for row in rows]

    def update_user(self, user_id: str, *, expected_version: int, **changes: Any) -> UserRecord:
        check_ids(user_id)
        check_user_changes(expected_version, changes)

        def change(item: dict[str, Any]) -> UserRecord:
            if item.get("entity") != "USER":
                raise NotFound(f"user {user_id} does not exist")
            return apply_user_changes(UserRecord.from_item(item), expected_version, changes)

        return self._update(user_id, USER_SK, f"user {user_id}", change)

    def delete_user(self, user_id: str) -> int:
        check_ids(user_id)
        with self._connection(write=True) as connection:
            user = _entity(connection, user_id) == "USER"
            deleted = connection.execute(
                "DELETE FROM items WHERE user_id = ? AND entity != ?", (user_id, TOMBSTONE_ENTITY)
            ).rowcount
            if user:  # in the same transaction: the id is never free in between
                item = tombstone_item(user_id)
                connection.execute(
                    _INSERT,
                    (user_id, USER_SK, TOMBSTONE_ENTITY, item["deleted_at"], 1, json.dumps(item)),
                )
        return deleted

    # -- models ---------------------------------------------------------------------------

    def create_model(self, model: ModelRecord) -> None:
        check_record("model", model, ModelRecord)
        with self._connection(write=True) as connection:
            user = connection.execute(
                "SELECT item FROM items WHERE user_id = ? AND sk = ? AND entity = 'USER'",
                (model.user_id, USER_SK),
            ).fetchone()
            if user is None:
                raise NotFound(f"user {model.user_id!r} does not exist")
            if "deleting_since" in json.loads(user[0]):
                raise NotFound(f"user {model.user_id!r} is being deleted")
            try:
                connection.execute(_INSERT, _row(model.to_item()))
            except sqlite3.IntegrityError:
                raise AlreadyExists(
                    f"model {model.user_id}/{model.model_id} already exists"
                ) from None

    def get_model(self, user_id: str, model_id: str) -> ModelRecord | None:
        check_ids(user_id, model_id)
        with self._connection() as connection:
            row = connection.execute(
                "SELECT item FROM items WHERE user_id = ? AND sk = ?",
                (user_id, MODEL_SK_PREFIX + model_id),
            ).fetchone()
        return ModelRecord.from_item(json.loads(row[0])) if row else None

    def list_models(self, user_id: str) -> list[ModelRecord]:
        check_ids(user_id)
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT item FROM items WHERE user_id = ? AND entity = 'MODEL' "
                "ORDER BY created_at, sk",
                (user_id,),
            ).fetchall()
        return [ModelRecord.from_item(json.loads(row[0])) for row in rows]

    def update_model(
        self, user_id: str, model_id: str, *, expected_version: int, **changes: Any
    ) -> ModelRecord:
        check_ids(user_id, model_id)
        check_changes(expected_version, changes)
        return self._update(
            user_id,
            MODEL_SK_PREFIX + model_id,
            f"model {user_id}/{model_id}",
            lambda item: apply_changes(ModelRecord.from_item(item), expected_version, changes),
        )

    def delete_model(self, user_id: str, model_id: str) -> bool:
        check_ids(user_id, model_id)
        with self._connection() as connection:
            cursor = connection.execute(
                "DELETE FROM items WHERE user_id = ? AND sk = ?",
                (user_id, MODEL_SK_PREFIX + model_id),
            )
        return cursor.rowcount > 0

    # -- jobs -----------------------------------------------------------------------------

    def put_job(self, job: JobRecord) -> None:
        check_record("job", job, JobRecord)
        with self._connection() as connection:
            try:
                connection.execute(_INSERT, _row(job.to_item()))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"job {job.user_id}/{job.job_name} already exists") from None

    def get_job(self, user_id: str, job_name: str) -> JobRecord | None:
        check_job_ids(user_id, job_name)
        with self._connection() as connection:
            row = connection.execute(
                "SELECT item FROM items WHERE user_id = ? AND sk = ?",
                (user_id, JOB_SK_PREFIX + job_name),
            ).fetchone()
        return JobRecord.from_item(json.loads(row[0])) if row else None

    def delete_job(self, user_id: str, job_name: str) -> bool:
        check_job_ids(user_id, job_name)
        with self._connection() as connection:
            cursor = connection.execute(
                "DELETE FROM items WHERE user_id = ? AND sk = ?",
                (user_id, JOB_SK_PREFIX + job_name),
            )
        return cursor.rowcount > 0

    def list_jobs(self, user_id: str | None = None) -> list[JobRecord]:
        check_job_ids(user_id)
        query = "SELECT item FROM items WHERE entity = 'JOB'"
        arguments: tuple = ()
        if user_id is not None:
            query += " AND user_id = ?"
            arguments = (user_id,)
        with self._connection() as connection:
            rows = connection.execute(query + " ORDER BY created_at, sk", arguments).fetchall()
        return [JobRecord.from_item(json.loads(row[0])) for row in rows]

    def update_job(
        self, user_id: str, job_name: str, *, expected_version: int | None = None, **changes: Any
    ) -> JobRecord:
        check_job_ids(user_id, job_name)
        check_job_changes(expected_version, changes)
        return self._update(
            user_id,
            JOB_SK_PREFIX + job_name,
            f"job {user_id}/{job_name}",
            lambda item: apply_job_changes(JobRecord.from_item(item), expected_version, changes),
        )

    def _update(self, user_id: str, sk: str, what: str, change):
        """Read the item, `change` it into a record, write that record back; the write lock
        is held from the read to the write, so a version check in `change` is exact."""
        with self._connection(write=True) as connection:
            row = connection.execute(
                "SELECT item FROM items WHERE user_id = ? AND sk = ?", (user_id, sk)
            ).fetchone()
            if row is None:
                raise NotFound(f"{what} does not exist")
            updated = change(json.loads(row[0]))
            connection.execute(
                "UPDATE items SET version = ?, item = ? WHERE user_id = ? AND sk = ?",
                (updated.version, json.dumps(updated.to_item()), user_id, sk),
            )
        return updated

    # -- connections ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A fresh connection in autocommit mode; with `write`, inside `BEGIN IMMEDIATE`,
        committed on success and rolled back on any error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            # NORMAL is durable across application crashes in WAL mode, and much faster.
            connection.execute("PRAGMA synchronous = NORMAL")
            if write:
                connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            if connection.in_transaction:
                connection.execute("COMMIT")
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                raise TableMissing(
                    f"the metadata database {self.path} has no table yet: run provisioning "
                    "(helpers.backend.Backend.provision) or store.create_table() first"
                ) from None
            raise
        finally:
            connection.close()


_INSERT = (
    "INSERT INTO items (user_id, sk, entity, created_at, version, item) VALUES (?, ?, ?, ?, ?, ?)"
)


def _entity(connection: sqlite3.Connection, user_id: str) -> str | None:
    """The entity stored at the user's key: USER, TOMBSTONE, or None."""
    row = connection.execute(
        "SELECT entity FROM items WHERE user_id = ? AND sk = ?", (user_id, USER_SK)
    ).fetchone()
    return row[0] if row else None


def _row(item: dict[str, Any]) -> tuple:
    return (
        item["user_id"],
        item["sk"],
        item["entity"],
        item["created_at"],
        item["version"],
        json.dumps(item),
    )
