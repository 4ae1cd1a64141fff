"""What breaks first as the user base grows: each limit's demand at a scale, against AWS's
documented limits and the account quotas (`limits`), from `helpers.workshop.capacity`'s plans."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from helpers.workshop.capacity import Demand, ModePlan


@dataclass(frozen=True)
class Quotas:
    """The limits checked at scale. S3's and DynamoDB's are AWS's documented figures; the
    SageMaker ones are account quotas that differ per account and region, so their values
    here are assumptions to replace with your own (Service Quotas console).

    Attributes:
        endpoint_instances (`int`, defaults to 20): ml.g5.xlarge instances for endpoint usage in
            the region (assumed; raised on request).
        training_instances (`int`, defaults to 20): ml.g5.xlarge instances for training jobs
            running at once in the region (assumed; raised on request).
        s3_get_per_prefix_s (`float`, defaults to 5500): GET/HEAD requests per second per
            partitioned S3 prefix (documented; S3 adds partitions as load grows, in minutes).
        dynamodb_partition_rcu (`float`, defaults to 3000): read units per second one partition
            serves (documented).
        dynamodb_table_read_units (`float`, defaults to 40000): on-demand read request units per
            second per table (documented default table quota, adjustable).
        reads_per_request (`float`, defaults to 1): DynamoDB read units per generate request (the
            API reads the user's model record, strongly consistent, under 4 KB).
    """

    endpoint_instances: int = 20
    training_instances: int = 20
    s3_get_per_prefix_s: float = 5_500.0
    dynamodb_partition_rcu: float = 3_000.0
    dynamodb_table_read_units: float = 40_000.0
    reads_per_request: float = 1.0


@dataclass(frozen=True)
class Limit:
    name: str
    demand: float
    limit: float
    unit: str
    note: str

    @property
    def ratio(self) -> float:
        return self.demand / self.limit


def limits(
    demand: Demand,
    plans: Sequence[ModePlan],
    quotas: Quotas | None = None,
    training_seconds_per_user: float = 1500.0,
) -> dict:
    """Each limit's demand at `demand`'s scale, and the one that binds first (the largest
    demand over limit; demand grows about linearly with users, so it is also the one a growing
    user base reaches first).

    Args:
        demand (`Demand`): the scale (e.g. 10 million users).
        plans (`Sequence[ModePlan]`): `plan`'s results for `demand`, one per mode.
        quotas (`Quotas`, defaults to `Quotas()`): the limits.
        training_seconds_per_user (`float`, defaults to 1500): one onboarding job on one
            ml.g5.xlarge (AWS's figure for 1000 steps).
    """
    quotas = quotas or Quotas()
    found: list[Limit] = []
    for mode_plan in plans:
        instances = mode_plan.instances
        found.append(
            Limit(
                f"endpoint instances ({mode_plan.mode})",
                float(instances) if instances is not None else math.inf,
                quotas.endpoint_instances,
                "instances",
                "regional ml.g5.xlarge endpoint quota (assumed value)",
            )
        )
        found.append(
            Limit(
                f"S3 GET on the models prefix ({mode_plan.mode})",
                mode_plan.misses_per_s,
                quotas.s3_get_per_prefix_s,
                "GET/s",
                "one GET per cache miss at the peak (an upper bound: an instance keeps "
                "archives on disk)",
            )
        )
    reads = demand.peak_per_second * quotas.reads_per_request
    found.append(
        Limit(
            "DynamoDB table reads",
            reads,
            quotas.dynamodb_table_read_units,
            "RCU/s",
            "on-demand table quota",
        )
    )
    top_user = demand.max_per_user_per_day / 86_400 * demand.peak_to_mean
    found.append(
        Limit(
            "DynamoDB hottest partition",
            top_user * quotas.reads_per_request,
            quotas.dynamodb_partition_rcu,
            "RCU/s",
            "items keyed by user: the busiest user's reads",
        )
    )
    jobs_per_day = demand.users * demand.new_users_per_day_fraction
    concurrent = jobs_per_day * training_seconds_per_user / 86_400
    found.append(
        Limit(
            "training instances at once",
            concurrent,
            quotas.training_instances,
            "instances",
            f"{jobs_per_day:,.0f} onboarding jobs a day x {training_seconds_per_user:g} s",
        )
    )
    rows = [
        {
            "limit": item.name,
            "demand": round(item.demand, 3),
            "quota": item.limit,
            "unit": item.unit,
            "demand_over_quota": round(item.ratio, 4),
            "users_at_quota": (
                int(demand.users / item.ratio) if item.ratio and math.isfinite(item.ratio) else None
            ),
            "note": item.note,
        }
        for item in found
    ]
    rows.sort(key=lambda row: -row["demand_over_quota"])
    return {"users": demand.users, "binds_first": rows[0]["limit"], "limits": rows}


def limits_markdown(found: dict) -> str:
    """`limits`' result as a markdown table, the binding limit first."""
    lines = [
        "| limit | demand | quota | demand / quota | users at the quota | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in found["limits"]:
        at = f"{row['users_at_quota']:,}" if row["users_at_quota"] else ""
        lines.append(
            f"| {row['limit']} | {row['demand']:,.3g} {row['unit']} | {row['quota']:,.0f} | "
            f"{row['demand_over_quota']:.3g} | {at} | {row['note']} |"
        )
    return "\n".join(lines)
