"""Fair share: what each tenant, each anonymous address and the admin may use, counted on the
backend's shared counters (`helpers.ports.quotas`), so every process and Lambda instance sees
the same counts.

Every refusal is a 429 whose message names the limit ("20 generations per minute"), whose
`field` names the quota (`generations_per_minute`), with `Retry-After` and the reset time
(`resets_at`, ISO 8601 UTC) in the body. Rates per minute answer `rate_limited`; quotas per day
and caps answer `quota_exceeded`. The account's training capacity is not one tenant's quota: a
full account answers 503 `training_capacity_full` with `Retry-After`.

Models in flight are counted from the records, not a counter (a model leaves the count when
onboarding marks it AVAILABLE or FAILED, whichever driver does it): two requests at the same
instant may both pass a cap, by at most the requests that race, and the per-minute rate bounds
those. Training steps are a counter, exact under any concurrency.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from helpers.api.errors import ApiError
from helpers.domain.records import ModelRecord, ModelStatus
from helpers.ports.metadata import MetadataStore
from helpers.ports.quotas import QuotaCounters, QuotaDecision

__all__ = ["QuotaExceeded", "QuotaLimits", "Quotas"]

MINUTE, DAY = 60, 86400
IN_FLIGHT = (ModelStatus.REQUESTED, ModelStatus.TRAINING, ModelStatus.PACKAGING)


@dataclass(frozen=True)
class QuotaLimits:
    """The API's limits, in one place. Each value is argued beside it.

    Args:
        requests_per_minute (`int`, defaults to 120): per tenant, every route. Two a second
            covers a client polling a model's status and a UI listing photos and models; a
            script in a loop is what it stops.
        generations_per_minute (`int`, defaults to 20): per tenant. One every 3 s is about what
            one ml.g5.xlarge serves for SD 2.1 at 512 px and 25 steps, so one tenant can fill
            at most one instance.
        images_per_day (`int`, defaults to 1000): per tenant, images generated (a request of
            four counts four): a day of interactive use, not a batch job's worth.
        models_in_flight (`int`, defaults to 2): per tenant, models REQUESTED, TRAINING or
            PACKAGING: a tenant can compare two settings at once, not queue dozens.
        training_steps_per_day (`int`, defaults to 4000): per tenant, the `max_train_steps` of
            models requested today: two models at the largest (2000 steps) or thirteen at the
            default (300); about an hour of an ml.g5.2xlarge for SD 2.1.
        account_models_in_flight (`int`, defaults to 4): every tenant's models in flight
            together. It stands for the account's SageMaker quota of ml.g5.2xlarge training
            instances (new accounts get a few); set it to yours, so that jobs wait here with a
            clear answer instead of failing on ResourceLimitExceeded.
        anonymous_per_minute (`int`, defaults to 60): per client address, requests without a
            valid key (`/health`, and every failed authentication): enough for health checks
            every second, and key guessing at one a second.
        admin_per_minute (`int`, defaults to 60): requests with the admin key (creating
            users): an onboarding script creates a user a second.
    """

    requests_per_minute: int = 120
    generations_per_minute: int = 20
    images_per_day: int = 1000
    models_in_flight: int = 2
    training_steps_per_day: int = 4000
    account_models_in_flight: int = 4
    anonymous_per_minute: int = 60
    admin_per_minute: int = 60

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def iso(seconds: float) -> str:
    """`seconds` since the epoch as ISO 8601 UTC, to the second."""
    return dt.datetime.fromtimestamp(int(seconds), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class QuotaExceeded(ApiError):
    """A 429 naming the limit, the quota (`field`), `Retry-After` and `resets_at`."""

    def __init__(
        self, code: str, quota: str, message: str, retry_after: int, resets_at: str | None
    ) -> None:
        super().__init__(
            429,
            code,
            message,
            field=quota,
            allowed=None,
            headers={"Retry-After": str(retry_after)},
        )
        self.body["resets_at"] = resets_at


class Quotas:
    """The API's quotas over `counters`.

    Args:
        counters (`QuotaCounters`): the backend's shared counters.
        limits (`QuotaLimits`): what each quota allows.
        clock (`Callable[[], float]`, defaults to `time.time`): the time, for `Retry-After`.
    """

    def __init__(
        self, counters: QuotaCounters, limits: QuotaLimits, clock: Callable[[], float] = time.time
    ) -> None:
        self.counters = counters
        self.limits = limits
        self.clock = clock

    # --------------------------------------------------------------------------- rates

    def request(self, user_id: str) -> None:
        """Count one request of tenant `user_id`."""
        self._hit("requests_per_minute", "requests", user_id, MINUTE, "requests per minute")

    def generation(self, user_id: str) -> None:
        """Count one generation request of tenant `user_id`."""
        self._hit(
            "generations_per_minute", "generations", user_id, MINUTE, "generations per minute"
        )

    def images(self, user_id: str, count: int) -> None:
        """Count `count` images that tenant `user_id` is about to generate."""
        self._hit("images_per_day", "images", user_id, DAY, "images per day", cost=count)

    def anonymous(self, address: str) -> None:
        """Count one request without a valid key from client `address`."""
        self._hit(
            "anonymous_per_minute",
            "anonymous",
            address,
            MINUTE,
            "requests per minute from one address without a valid key",
        )

    def admin(self) -> None:
        """Count one request made with the admin key."""
        self._hit("admin_per_minute", "admin", "admin", MINUTE, "admin requests per minute")

    # --------------------------------------------------------------------------- training

    def training_admission(
        self, metadata: MetadataStore, user_id: str
    ) -> Callable[[Sequence[ModelRecord], Mapping[str, Any]], None]:
        """What `services.onboarding.request_model` calls before it records a new model of
        `user_id`: the tenant's models in flight, the account's, then today's training steps
        (the one that counts, so a refused request costs no steps)."""

        def admit(models: Sequence[ModelRecord], hyperparameters: Mapping[str, Any]) -> None:
            self._tenant_in_flight(models)
            self._account_in_flight(metadata)
            steps = int(hyperparameters.get("max_train_steps", 0))
            if steps > 0:
                self._hit(
                    "training_steps_per_day",
                    "training_steps",
                    user_id,
                    DAY,
                    "training steps per day",
                    cost=steps,
                )

        return admit

    def _tenant_in_flight(self, models: Sequence[ModelRecord]) -> None:
        limit = self.limits.models_in_flight
        busy = [m.model_id for m in models if m.status in IN_FLIGHT]
        if len(busy) >= limit:
            raise QuotaExceeded(
                "quota_exceeded",
                "models_in_flight",
                f"quota: {limit} models in flight (REQUESTED, TRAINING or PACKAGING) per "
                f"tenant; yours are {', '.join(busy)}: ask again when one is AVAILABLE or FAILED",
                retry_after=MINUTE,
                resets_at=None,
            )

    def _account_in_flight(self, metadata: MetadataStore) -> None:
        # One query per user: fine for a workshop's tenants; a GSI on status would serve more.
        limit = self.limits.account_models_in_flight
        busy = sum(
            m.status in IN_FLIGHT
            for user in metadata.list_users()
            for m in metadata.list_models(user.user_id)
        )
        if busy >= limit:
            raise ApiError(
                503,
                "training_capacity_full",
                f"the service trains at most {limit} models at once and all are in use; "
                "ask again in a few minutes",
                field="account_models_in_flight",
                headers={"Retry-After": str(5 * MINUTE)},
            )

    # --------------------------------------------------------------------------- counting

    def _hit(
        self, quota: str, scope: str, name: str, window: int, unit: str, cost: int = 1
    ) -> QuotaDecision:
        limit = getattr(self.limits, quota)
        decision = self.counters.hit(scope, name, limit, window, cost)
        if decision.allowed:
            return decision
        wait = decision.retry_after(self.clock())
        resets_at = iso(decision.resets_at)
        if window == MINUTE:
            code, kind = "rate_limited", "rate limit"
        else:
            code, kind = "quota_exceeded", "quota"
        asked = f"; this request needs {cost}" if cost > 1 else ""
        raise QuotaExceeded(
            code,
            quota,
            f"{kind}: {limit} {unit}; {decision.used} used{asked}; "
            f"retry in {wait} s (resets at {resets_at})",
            retry_after=wait,
            resets_at=resets_at,
        )
