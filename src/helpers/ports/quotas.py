"""The quota counters port: atomic hits on fixed-window counters that every process shares.

`QuotaCounters.hit(scope, name, limit, window_seconds, cost)` adds `cost` to the counter of
`(scope, name)` in the current window, unless that would take it past `limit`: a refused hit
costs nothing, so a client that keeps retrying past its limit cannot push its reset further
away. Windows are fixed (aligned to the epoch: a day window resets at 00:00 UTC), so a client
may spend up to twice a limit across one window boundary; in exchange the hit is one atomic
write in both adapters.

`helpers.infra.local.quotas.SqliteQuotaCounters` (a SQLite file shared by the processes of one
machine) and `helpers.infra.aws.quotas.DynamoDbQuotaCounters` (one conditional `UpdateItem`,
shared by every Lambda instance) implement it.
"""

from __future__ import annotations

import abc
import math
import re
from dataclasses import dataclass

__all__ = ["QuotaCounters", "QuotaDecision", "check_hit", "window_of"]

#: Scopes and names: printable, no separator of the adapters' keys ("#", "|"), bounded.
_KEY_RE = re.compile(r"^[A-Za-z0-9_.:@/+=-]{1,128}$")


@dataclass(frozen=True)
class QuotaDecision:
    """The outcome of a hit.

    Args:
        allowed (`bool`): whether the hit was counted.
        used (`int`): the counter after the hit (or, when refused, as it stands).
        limit (`int`): the limit the hit was checked against.
        resets_at (`float`): when the window ends (seconds since the epoch).
    """

    allowed: bool
    used: int
    limit: int
    resets_at: float

    def retry_after(self, now: float) -> int:
        """Whole seconds from `now` until the window ends, at least 1 (for `Retry-After`)."""
        return max(1, math.ceil(self.resets_at - now))


class QuotaCounters(abc.ABC):
    """Counters of `(scope, name)` per fixed window, shared by every process of a backend."""

    @abc.abstractmethod
    def hit(
        self, scope: str, name: str, limit: int, window_seconds: int, cost: int = 1
    ) -> QuotaDecision:
        """Add `cost` to the counter of `scope`/`name` in the current window of
        `window_seconds`, unless it would pass `limit`; atomic against every other hit.

        Args:
            scope (`str`): what is counted ("requests", "images", ...).
            name (`str`): whose ("alice", an address, "admin").
            limit (`int`): the most the window may count (0 refuses everything).
            window_seconds (`int`): the window's length (60 for a minute, 86400 for a day).
            cost (`int`, defaults to 1): how much this hit counts.

        Raises:
            ValueError: naming the argument that is invalid (`check_hit`).
        """

    def prepare(self) -> None:  # noqa: B027 (nothing to prepare is a valid adapter)
        """Create what the counters need (a table, its expiry); idempotent."""


def check_hit(scope: str, name: str, limit: int, window_seconds: int, cost: int) -> None:
    """Raise a `ValueError` naming the first invalid argument of `QuotaCounters.hit`."""
    for argument, value in (("scope", scope), ("name", name)):
        if not isinstance(value, str) or not _KEY_RE.match(value):
            raise ValueError(
                f"{argument} must be 1-128 of letters, digits and _.:@/+=-, got {value!r}"
            )
    for argument, value, low in (("limit", limit, 0), ("window_seconds", window_seconds, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{argument} must be an integer >= {low}, got {value!r}")
    if not isinstance(cost, int) or isinstance(cost, bool) or cost < 1:
        raise ValueError(f"cost must be an integer >= 1, got {cost!r}")


def window_of(now: float, window_seconds: int) -> tuple[int, int]:
    """The window holding `now`: its start and its end (seconds since the epoch)."""
    start = int(now // window_seconds) * window_seconds
    return start, start + window_seconds
