"""Quota counters in the metadata table, shared by every Lambda instance (boto3).

A hit is one `UpdateItem`: `ADD used :cost` under the condition `used <= limit - cost`, so
DynamoDB itself refuses a hit that would pass the limit, atomically against every other
writer; a refused hit writes nothing.

Counters live beside users, models and jobs without touching them: their partition key is
`QUOTA#<scope>#<name>` (user ids are `[a-z0-9_-]`, never `#`, so no user's partition, and
`delete_user`'s query of one, ever meets a counter), and their sort key
`WINDOW#<seconds>#<start>` is neither `USER` nor `JOB#...`, so the `list_users` and
`list_jobs` scans filter them out. Each counter carries `expires_at` (the end of its window
plus a day), the table's TTL attribute, so DynamoDB deletes ended windows by itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import boto3
from botocore.exceptions import ClientError

from helpers.ports.quotas import QuotaCounters, QuotaDecision, check_hit, window_of

__all__ = ["COUNTER_PREFIX", "EXPIRY_ATTRIBUTE", "DynamoDbQuotaCounters"]

logger = logging.getLogger(__name__)

COUNTER_PREFIX = "QUOTA#"
WINDOW_PREFIX = "WINDOW#"
#: The table's TTL attribute (seconds since the epoch); the `cdk/` table names it too.
EXPIRY_ATTRIBUTE = "expires_at"
#: TTL deletes within a day or two of expiry, never before: the margin keeps a window's counter
#: readable until its window has surely ended.
_EXPIRY_MARGIN = 86400


class DynamoDbQuotaCounters(QuotaCounters):
    """Fixed-window counters as items of the DynamoDB table `table_name`.

    Args:
        table_name (`str`): the metadata table (`settings.table_name`).
        region (`str`): its AWS region.
        client (`botocore.client.BaseClient`, *optional*): a DynamoDB client; by default one
            for `region` (clients are thread-safe).
        clock (`Callable[[], float]`, defaults to `time.time`): the time, for tests.
    """

    def __init__(
        self,
        table_name: str,
        region: str,
        client=None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(table_name, str) or not 3 <= len(table_name) <= 255:
            raise ValueError(f"table_name must be 3-255 characters, got {table_name!r}")
        if not isinstance(region, str) or not region:
            raise ValueError(f"region must be an AWS region name, got {region!r}")
        self.table_name = table_name
        self.region = region
        self.client = client or boto3.client("dynamodb", region_name=region)
        self.clock = clock

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.table_name!r}, region={self.region!r})"

    def prepare(self) -> None:
        """Turn on the table's TTL on `expires_at` (the table itself is the metadata store's)."""
        described = self.client.describe_time_to_live(TableName=self.table_name)
        status = described.get("TimeToLiveDescription", {}).get("TimeToLiveStatus")
        if status in ("ENABLED", "ENABLING"):
            return
        self.client.update_time_to_live(
            TableName=self.table_name,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": EXPIRY_ATTRIBUTE},
        )

    def hit(
        self, scope: str, name: str, limit: int, window_seconds: int, cost: int = 1
    ) -> QuotaDecision:
        check_hit(scope, name, limit, window_seconds, cost)
        start, end = window_of(self.clock(), window_seconds)
        key = {
            "user_id": {"S": f"{COUNTER_PREFIX}{scope}#{name}"},
            "sk": {"S": f"{WINDOW_PREFIX}{window_seconds}#{start}"},
        }
        if cost > limit:
            return QuotaDecision(False, self._used(key), limit, end)
        try:
            response = self.client.update_item(
                TableName=self.table_name,
                Key=key,
                UpdateExpression="ADD #used :cost SET #expires = if_not_exists(#expires, :expires)",
                ConditionExpression="attribute_not_exists(#used) OR #used <= :room",
                ExpressionAttributeNames={"#used": "used", "#expires": EXPIRY_ATTRIBUTE},
                ExpressionAttributeValues={
                    ":cost": {"N": str(cost)},
                    ":room": {"N": str(limit - cost)},
                    ":expires": {"N": str(end + _EXPIRY_MARGIN)},
                },
                ReturnValues="UPDATED_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ConditionalCheckFailedException":
                raise
            stored = error.response.get("Item", {}).get("used", {}).get("N")
            used = int(stored) if stored is not None else self._used(key)
            return QuotaDecision(False, used, limit, end)
        return QuotaDecision(True, int(response["Attributes"]["used"]["N"]), limit, end)

    def _used(self, key: dict) -> int:
        item = self.client.get_item(TableName=self.table_name, Key=key, ConsistentRead=True)
        return int(item.get("Item", {}).get("used", {}).get("N", 0))
