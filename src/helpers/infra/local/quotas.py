"""Quota counters in their own SQLite file, shared by every process and thread of the machine.

Each hit is one `BEGIN IMMEDIATE` transaction: it holds the write lock from reading the
counter to writing it, so concurrent hits queue instead of both passing the check. Each thread
of each process keeps its own connection (one must not cross threads or a fork), because
closing a database's last connection checkpoints its WAL with an fsync: a connection per hit
cost 12-25 ms a hit here, a kept one 0.02-0.07 ms. The file runs in WAL mode with
`synchronous = NORMAL`, durable across a crash of the application, which is all a counter that
resets within a day needs. Windows that have ended are deleted as hits go by.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from helpers.ports.quotas import QuotaCounters, QuotaDecision, check_hit, window_of

__all__ = ["SqliteQuotaCounters"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    scope        TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    window_s     INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    used         INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    PRIMARY KEY (scope, name, window_s, window_start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS counters_by_expiry ON counters (expires_at);
"""


class SqliteQuotaCounters(QuotaCounters):
    """Fixed-window counters in the SQLite database at `path`.

    Args:
        path (`str` or `os.PathLike`): the database file (`settings.quotas_path`); it and its
            directory are created on first use.
        timeout (`float`, defaults to 10.0): seconds to wait for another hit's lock.
        clock (`Callable[[], float]`, defaults to `time.time`): the time, for tests.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"path must be a file path, got {path!r}")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.path = Path(path).expanduser().absolute()
        self.timeout = float(timeout)
        self.clock = clock
        self._prepared = False
        self._local = threading.local()
        # Connections a forked child inherited: never used, and never closed (closing one there
        # could delete the WAL that the parent is writing).
        self._inherited: list[sqlite3.Connection] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def prepare(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = self._connection()
        # WAL is a property of the file: set once, every later connection uses it.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.executescript(_SCHEMA)
        self._prepared = True

    def hit(
        self, scope: str, name: str, limit: int, window_seconds: int, cost: int = 1
    ) -> QuotaDecision:
        check_hit(scope, name, limit, window_seconds, cost)
        if not self._prepared:
            self.prepare()
        now = self.clock()
        start, end = window_of(now, window_seconds)
        with self._transaction() as connection:
            connection.execute("DELETE FROM counters WHERE expires_at <= ?", (int(now),))
            row = connection.execute(
                "SELECT used FROM counters "
                "WHERE scope = ? AND name = ? AND window_s = ? AND window_start = ?",
                (scope, name, window_seconds, start),
            ).fetchone()
            used = row[0] if row else 0
            if used + cost > limit:
                return QuotaDecision(False, used, limit, end)
            connection.execute(
                "INSERT INTO counters (scope, name, window_s, window_start, used, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (scope, name, window_s, window_start) "
                "DO UPDATE SET used = used + excluded.used",
                (scope, name, window_seconds, start, cost, end),
            )
        return QuotaDecision(True, used + cost, limit, end)

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened again in a forked child."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            if hasattr(local, "connection"):
                self._inherited.append(local.connection)
            connection = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            connection.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            connection.execute("PRAGMA synchronous = NORMAL")
            local.connection, local.pid = connection, os.getpid()
        return local.connection

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection inside `BEGIN IMMEDIATE`: committed on success (a refused
        hit wrote nothing but the sweep of ended windows), rolled back on any error."""
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
