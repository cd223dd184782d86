"""One request budget per destination endpoint and key, shared by every worker and sync.

A worker's threads pace themselves locally, but the limit belongs to the destination's
workspace: N fan-out workers and concurrent syncs must share it without knowing of each
other, on Azure Functions instances that share nothing but storage. The budget is one
table row (`ratebudgets`), read and written under its ETag.

The row holds GCRA's "theoretical arrival time" (`tat`): the moment up to which the
budget's capacity is already promised. A worker whose threads find no request credit left
reserves as many as are waiting (at most 100 ms of the rate): they may go from
max(now, tat - burst), and `tat` moves on by their count / rate. Reservations follow each
other, so all workers together send at most `rate` per second, plus the burst, plus one
reservation (and the clock skew between instances). Credits a worker has not spent soon
after their time are dropped, never carried into later time. When the destination answers
429, the row's `paused_until` stops every worker, not only the one that was told.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from typing import ClassVar

from core.storage.tables import EntityTable, TableEntity


class RateBudgetRow(TableEntity):
    """Table `ratebudgets`: PartitionKey `budget`, RowKey a hash of endpoint and key."""

    table_name: ClassVar[str] = "ratebudgets"

    tat: float = 0.0
    """Epoch seconds up to which the capacity is reserved."""
    paused_until: float = 0.0
    rate: float = 0.0
    """The rate the last reservation was made at (for operators reading the row)."""


def budget_key(endpoint: str, api_key: str) -> str:
    """The row for a workspace: the same endpoint and key share one budget; neither is
    stored (the key is a secret, and the endpoint alone would merge workspaces)."""
    return hashlib.sha256(f"{endpoint.rstrip('/')}\n{api_key}".encode()).hexdigest()[:32]


class SharedBudget:
    """A pacer (`acquire`, `pause_for`) whose requests come from a shared table row."""

    _PARTITION = "budget"

    def __init__(
        self,
        table: EntityTable[RateBudgetRow],
        key: str,
        rate: float,
        *,
        burst: float | None = None,
        max_reservation_seconds: float = 0.1,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst_seconds = (burst if burst is not None else max(1.0, rate * 0.05)) / rate
        self.max_reservation = max(1, math.floor(rate * max_reservation_seconds))
        self.min_reservation = 1
        """Not one round trip per request when threads arrive one by one."""
        self._table = table
        self._key = key
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._counting = threading.Lock()
        """Apart from `_lock`, which a reservation holds through its round trip: the
        threads arriving meanwhile count as waiting, and the next one is sized for them."""
        self._credits = 0
        self._usable_from = 0.0
        self._usable_until = 0.0
        self._waiting = 0
        self._paused_until = 0.0
        self.reservations = 0
        """Storage round trips made for credits (for benchmarks and tests)."""

    def acquire(self) -> float:
        """Take one request credit, waiting for its time; returns the seconds waited."""
        waited = 0.0
        with self._counting:
            self._waiting += 1
        try:
            while True:
                with self._lock:
                    now = self._clock()
                    if now >= self._paused_until and (
                        self._credits <= 0 or now >= self._usable_until
                    ):
                        wanted = max(self._waiting, self.min_reservation)
                        self._reserve(now, min(wanted, self.max_reservation))
                    if now < self._paused_until:
                        delay = self._paused_until - now
                    elif now >= self._usable_from:
                        self._credits -= 1
                        return waited
                    else:
                        delay = self._usable_from - now
                self._sleep(delay)  # outside the lock: the others queue up meanwhile
                waited += delay
        finally:
            with self._counting:
                self._waiting -= 1

    def _reserve(self, now: float, count: int) -> None:
        """One ETag-guarded read-modify-write: `count` credits (or the pause)."""
        reserved: list[float] = []

        def change(current: RateBudgetRow | None) -> RateBudgetRow | None:
            reserved.clear()
            row = current or RateBudgetRow(partition_key=self._PARTITION, row_key=self._key)
            if row.paused_until > now:
                reserved.append(-row.paused_until)
                return None
            reserved.append(max(now, row.tat - self.burst_seconds))
            tat = max(row.tat, now) + count / self.rate
            return row.model_copy(update={"tat": tat, "rate": self.rate})

        self._table.mutate(self._PARTITION, self._key, change, attempts=50)
        self.reservations += 1
        if reserved[0] < 0:
            self._paused_until = -reserved[0]
            self._credits = 0
            return
        start = reserved[0]
        # Spent as their threads wake; whatever is left a reservation's length after its
        # time goes unused rather than into someone else's time.
        self._credits = count
        self._usable_from = start
        self._usable_until = start + max(count / self.rate, self.max_reservation / self.rate)

    def pause_for(self, seconds: float) -> None:
        """The destination said stop: this worker and (through the row) every other one
        sends nothing for `seconds`; what is reserved meanwhile starts after the pause."""
        until = self._clock() + seconds
        with self._lock:
            self._paused_until = max(self._paused_until, until)
            self._credits = 0

        def change(current: RateBudgetRow | None) -> RateBudgetRow | None:
            row = current or RateBudgetRow(partition_key=self._PARTITION, row_key=self._key)
            if row.paused_until >= until and row.tat >= until:
                return None
            return row.model_copy(
                update={"paused_until": max(row.paused_until, until), "tat": max(row.tat, until)}
            )

        self._table.mutate(self._PARTITION, self._key, change, attempts=50)
