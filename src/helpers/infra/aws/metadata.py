"""The metadata store in one DynamoDB table (boto3; `AWS_ENDPOINT_URL` points it at moto).

Every write that must not clobber another is conditional (`attribute_not_exists`,
`version = :expected`), so DynamoDB itself arbitrates concurrent writers; a failed condition
becomes the same error the local adapter raises.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.exceptions import ClientError

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
    VersionConflict,
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

__all__ = ["DynamoDbMetadataStore"]

logger = logging.getLogger(__name__)

#: BatchWriteItem takes at most this many requests per call.
_BATCH = 25


class DynamoDbMetadataStore(MetadataStore):
    """Users, models and training jobs in the DynamoDB table `table_name`.

    Args:
        table_name (`str`): the table (`settings.table_name`).
        region (`str`): its AWS region.
        resource (`boto3.resources.base.ServiceResource`, *optional*): a DynamoDB resource to
            use; by default one for `region`. Only its low-level client is used, because
            clients are thread-safe and resources are not.
    """

    def __init__(self, table_name: str, region: str, resource=None) -> None:
        if not isinstance(table_name, str) or not 3 <= len(table_name) <= 255:
            raise ValueError(f"table_name must be 3-255 characters, got {table_name!r}")
        if not isinstance(region, str) or not region:
            raise ValueError(f"region must be an AWS region name, got {region!r}")
        self.table_name = table_name
        self.region = region
        resource = resource or boto3.resource("dynamodb", region_name=region)
        self.client = resource.meta.client

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.table_name!r}, region={self.region!r})"

    def create_table(self) -> None:
        try:
            self.client.create_table(
                TableName=self.table_name,
                KeySchema=[
                    {"AttributeName": "user_id", "KeyType": "HASH"},
                    {"AttributeName": "sk", "KeyType": "RANGE"},
                ],
                AttributeDefinitions=[
                    {"AttributeName": "user_id", "AttributeType": "S"},
                    {"AttributeName": "sk", "AttributeType": "S"},
                ],
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as error:
            if _code(error) != "ResourceInUseException":
                raise
        self.client.get_waiter("table_exists").wait(
            TableName=self.table_name, WaiterConfig={"Delay": 2, "MaxAttempts": 60}
        )
        try:
            self.client.update_continuous_backups(
                TableName=self.table_name,
                PointInTimeRecoverySpecification={"PointInTimeRecoveryEnabled": True},
            )
        except (ClientError, NotImplementedError) as error:
            # Backups are a safety net, not a requirement: emulators may lack the call, and
            # AWS refuses it for a short while after a table is created.
            logger.warning("point-in-time recovery not enabled on %s: %s", self.table_name, error)

    # -- users ----------------------------------------------------------------------------

    def put_user(self, user: UserRecord) -> None:
        check_record("user", user, UserRecord)
        with self._errors():
            try:
                self.client.put_item(
                    TableName=self.table_name,
                    Item=user.to_item(),
                    # A tombstone is at the same key, so a retired id fails this too.
                    ConditionExpression="attribute_not_exists(user_id)",
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
            except ClientError as error:
                if _code(error) != "ConditionalCheckFailedException":
                    raise
                entity = error.response.get("Item", {}).get("entity", {}).get("S")
                if entity is None:  # an emulator that does not return the item
                    entity = (self._get(user.user_id, USER_SK) or {}).get("entity")
                if entity == TOMBSTONE_ENTITY:
                    raise UserIdRetired(
                        f"user id {user.user_id!r} belonged to a deleted user; ids are never reused"
                    ) from None
                raise AlreadyExists(f"user {user.user_id!r} already exists") from None

    def get_user(self, user_id: str) -> UserRecord | None:
        check_ids(user_id)
        item = self._get(user_id, USER_SK)
        return UserRecord.from_item(item) if item and item.get("entity") == "USER" else None

    def list_users(self) -> list[UserRecord]:
        items = self._pages(
            "scan",
            FilterExpression="sk = :user AND entity = :entity",
            ExpressionAttributeValues={":user": USER_SK, ":entity": "USER"},
        )
        users = [UserRecord.from_item(item) for item in items]
        return sorted(users, key=lambda user: (user.created_at, user.user_id))

    def update_user(self, user_id: str, *, expected_version: int, **changes: Any) -> UserRecord:
        check_ids(user_id)
        check_user_changes(expected_version, changes)
        current = self.get_user(user_id)
        if current is None:
            raise NotFound(f"user {user_id} does not exist")
        updated = apply_user_changes(current, expected_version, changes)
        # A tombstone has no version, so the condition also refuses a user deleted meanwhile.
        actual = self._put_at_version(
            updated, expected_version, f"user {user_id}", lambda: self.get_user(user_id)
        )
        if actual is not None:
            raise _conflict(f"user {user_id}", expected_version, actual)
        return updated

    def delete_user(self, user_id: str) -> int:
        check_ids(user_id)
        # No transaction spans a whole user, so the user's own item goes last: until then the
        # user exists, and a deletion interrupted here can be run again by them.
        deleted = self._sweep(user_id)
        with self._errors():
            try:
                self.client.put_item(
                    TableName=self.table_name,
                    Item=tombstone_item(user_id),
                    ConditionExpression="entity = :user",
                    ExpressionAttributeValues={":user": "USER"},
                )
                deleted += 1
            except ClientError as error:
                if _code(error) != "ConditionalCheckFailedException":
                    raise
                # No user, or a tombstone already.
        # From the tombstone on, create_model refuses this user: one more sweep takes any
        # model that slipped in during the first.
        return deleted + self._sweep(user_id)

    def _sweep(self, user_id: str) -> int:
        """Delete every item of the user but the one at their key; return how many."""
        keys = [
            {"user_id": item["user_id"], "sk": item["sk"]}
            for item in self._pages(
                "query",
                KeyConditionExpression="user_id = :user",
                FilterExpression="sk <> :sk",
                ExpressionAttributeValues={":user": user_id, ":sk": USER_SK},
                ProjectionExpression="user_id, sk",
            )
        ]
        for start in range(0, len(keys), _BATCH):
            self._delete_batch(keys[start : start + _BATCH])
        return len(keys)

    # -- models ---------------------------------------------------------------------------

    def create_model(self, model: ModelRecord) -> None:
        check_record("model", model, ModelRecord)
        with self._errors():
            try:
                # One transaction: the user must exist and the model must not.
                self.client.transact_write_items(
                    TransactItems=[
                        {
                            "ConditionCheck": {
                                "TableName": self.table_name,
                                "Key": {"user_id": model.user_id, "sk": USER_SK},
                                "ConditionExpression": (
                                    "entity = :user AND attribute_not_exists(deleting_since)"
                                ),
                                "ExpressionAttributeValues": {":user": "USER"},
                            }
                        },
                        {
                            "Put": {
                                "TableName": self.table_name,
                                "Item": model.to_item(),
                                "ConditionExpression": "attribute_not_exists(user_id)",
                            }
                        },
                    ]
                )
            except ClientError as error:
                if _code(error) != "TransactionCanceledException":
                    raise
                user = self.get_user(model.user_id)
                if user is None:
                    raise NotFound(f"user {model.user_id!r} does not exist") from None
                if user.deleting_since is not None:
                    raise NotFound(f"user {model.user_id!r} is being deleted") from None
                raise AlreadyExists(
                    f"model {model.user_id}/{model.model_id} already exists"
                ) from None

    def get_model(self, user_id: str, model_id: str) -> ModelRecord | None:
        check_ids(user_id, model_id)
        item = self._get(user_id, MODEL_SK_PREFIX + model_id)
        return ModelRecord.from_item(item) if item else None

    def list_models(self, user_id: str) -> list[ModelRecord]:
        check_ids(user_id)
        items = self._pages(
            "query",
            KeyConditionExpression="user_id = :user AND begins_with(sk, :model)",
            ExpressionAttributeValues={":user": user_id, ":model": MODEL_SK_PREFIX},
        )
        models = [ModelRecord.from_item(item) for item in items]
        # The sort key orders by model id; callers want creation order.
        return sorted(models, key=lambda model: (model.created_at, model.model_id))

    def update_model(
        self, user_id: str, model_id: str, *, expected_version: int, **changes: Any
    ) -> ModelRecord:
        check_ids(user_id, model_id)
        check_changes(expected_version, changes)
        current = self.get_model(user_id, model_id)
        if current is None:
            raise NotFound(f"model {user_id}/{model_id} does not exist")
        updated = apply_changes(current, expected_version, changes)
        # The read above may be stale by now; the condition is what guarantees it.
        actual = self._put_at_version(
            updated,
            expected_version,
            f"model {user_id}/{model_id}",
            lambda: self.get_model(user_id, model_id),
        )
        if actual is not None:
            raise _conflict(f"model {user_id}/{model_id}", expected_version, actual)
        return updated

    def delete_model(self, user_id: str, model_id: str) -> bool:
        check_ids(user_id, model_id)
        with self._errors():
            response = self.client.delete_item(
                TableName=self.table_name,
                Key={"user_id": user_id, "sk": MODEL_SK_PREFIX + model_id},
                ReturnValues="ALL_OLD",
            )
        return bool(response.get("Attributes"))

    def _put_at_version(self, record, version: int, what: str, reread) -> int | None:
        """Write `record` if the stored item is at `version`: None when written, else the
        version that is stored (`reread()` gives it when DynamoDB's answer does not).

        Raises:
            NotFound: when the item is gone.
        """
        with self._errors():
            try:
                self.client.put_item(
                    TableName=self.table_name,
                    Item=record.to_item(),
                    ConditionExpression="#version = :expected",
                    ExpressionAttributeNames={"#version": "version"},
                    ExpressionAttributeValues={":expected": version},
                    # The failure then carries the stored item: no second read to explain it.
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
            except ClientError as error:
                if _code(error) != "ConditionalCheckFailedException":
                    raise
                actual = _stored_version(error)
                if actual is None:
                    stored = reread()
                    if stored is None:
                        raise NotFound(f"{what} does not exist") from None
                    actual = stored.version
                return actual
        return None

    # -- jobs -----------------------------------------------------------------------------

    def put_job(self, job: JobRecord) -> None:
        check_record("job", job, JobRecord)
        with self._errors():
            try:
                self.client.put_item(
                    TableName=self.table_name,
                    Item=job.to_item(),
                    ConditionExpression="attribute_not_exists(user_id)",
                )
            except ClientError as error:
                if _code(error) != "ConditionalCheckFailedException":
                    raise
                raise AlreadyExists(f"job {job.user_id}/{job.job_name} already exists") from None

    def get_job(self, user_id: str, job_name: str) -> JobRecord | None:
        check_job_ids(user_id, job_name)
        item = self._get(user_id, JOB_SK_PREFIX + job_name)
        return JobRecord.from_item(item) if item else None

    def delete_job(self, user_id: str, job_name: str) -> bool:
        check_job_ids(user_id, job_name)
        with self._errors():
            response = self.client.delete_item(
                TableName=self.table_name,
                Key={"user_id": user_id, "sk": JOB_SK_PREFIX + job_name},
                ReturnValues="ALL_OLD",
            )
        return bool(response.get("Attributes"))

    def list_jobs(self, user_id: str | None = None) -> list[JobRecord]:
        check_job_ids(user_id)
        if user_id is None:
            # A scan: fine for a workshop's table; a GSI on `entity` would serve a large one.
            items = self._pages(
                "scan",
                FilterExpression="begins_with(sk, :job)",
                ExpressionAttributeValues={":job": JOB_SK_PREFIX},
            )
        else:
            items = self._pages(
                "query",
                KeyConditionExpression="user_id = :user AND begins_with(sk, :job)",
                ExpressionAttributeValues={":user": user_id, ":job": JOB_SK_PREFIX},
            )
        jobs = [JobRecord.from_item(item) for item in items]
        return sorted(jobs, key=lambda job: (job.created_at, job.job_name))

    def update_job(
        self, user_id: str, job_name: str, *, expected_version: int | None = None, **changes: Any
    ) -> JobRecord:
        check_job_ids(user_id, job_name)
        check_job_changes(expected_version, changes)
        current = self.get_job(user_id, job_name)
        if current is None:
            raise NotFound(f"job {user_id}/{job_name} does not exist")
        updated = apply_job_changes(current, expected_version, changes)
        # Without an expected version the write is still conditional on the version read, so
        # the status rules checked above hold against a concurrent writer too.
        condition_version = current.version if expected_version is None else expected_version
        what = f"job {user_id}/{job_name}"
        actual = self._put_at_version(
            updated, condition_version, what, lambda: self.get_job(user_id, job_name)
        )
        if actual is None:
            return updated
        if expected_version is None:  # lost a race: apply the change again to what is stored now
            return self.update_job(user_id, job_name, **changes)
        raise _conflict(what, expected_version, actual)

    # -- calls ----------------------------------------------------------------------------

    def _get(self, user_id: str, sk: str) -> dict[str, Any] | None:
        with self._errors():
            response = self.client.get_item(
                TableName=self.table_name,
                Key={"user_id": user_id, "sk": sk},
                ConsistentRead=True,
            )
        return response.get("Item")

    def _pages(self, operation: str, **arguments: Any) -> list[dict[str, Any]]:
        """All items of a paginated scan or query, read consistently."""
        paginator = self.client.get_paginator(operation)
        items = []
        with self._errors():
            for page in paginator.paginate(
                TableName=self.table_name, ConsistentRead=True, **arguments
            ):
                items += page.get("Items", [])
        return items

    def _delete_batch(self, keys: list[dict[str, Any]]) -> None:
        requests = {self.table_name: [{"DeleteRequest": {"Key": key}} for key in keys]}
        # DynamoDB may hand back part of a batch under load; send the rest again.
        for _ in range(10):
            with self._errors():
                response = self.client.batch_write_item(RequestItems=requests)
            requests = response.get("UnprocessedItems") or {}
            if not requests:
                return
        raise RuntimeError(f"could not delete {len(keys)} item(s) from {self.table_name}")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except ClientError as error:
            if _code(error) == "ResourceNotFoundException":
                raise TableMissing(
                    f"the DynamoDB table {self.table_name!r} does not exist in {self.region}: "
                    "run provisioning (helpers.backend.Backend.provision) "
                    "or create_table() first"
                ) from None
            raise


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _conflict(what: str, expected: int, actual: int) -> VersionConflict:
    return VersionConflict(
        f"{what} is at version {actual}, not {expected}: re-read it and apply the change again",
        expected=expected,
        actual=actual,
    )


def _stored_version(error: ClientError) -> int | None:
    # Error bodies are not converted to Python values: the item is in DynamoDB's typed JSON.
    number = error.response.get("Item", {}).get("version", {}).get("N")
    return int(number) if number is not None else None
