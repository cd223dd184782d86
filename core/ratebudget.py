"""One request budget per destination endpoint and key, shared by every worker and sync.

A worker's threads pace themselves locally, but the limit belongs to the destination's
workspace: N fan-out workers and concurrent syncs must share it without knowing of each
other, on Azure Functions instances that share nothing but storage. The budget is one
table row (`ratebudgets`), read and written under its ETag.

The row holds GCRA's "theoretical arrival time" (`tat`): the moment up to which the
budget's capacity is already promised. A worker reserves a slot of `n` requests, from
max(tat, now - burst) to that plus n/rate, and moves `tat` to the slot's end; it then spends
the slot's requests at their own times, locally, with no further storage call. Slots never
overlap, so all workers together send at most `rate` per second plus `burst` (and the
slot's length of clock skew between instances). A slot not used by its end is dropped,
never carried into another worker's time. When the destination answers 429, the row's
`paused_until` stops every worker, not only the one that was told.
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
        slot_seconds: float = 0.1,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst_seconds = (burst if burst is not None else max(1.0, rate * 0.05)) / rate
        self.slot_size = max(1, math.floor(rate * slot_seconds))
        self._table = table
        self._key = key
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._slot_start = 0.0
        self._slot_used = 0
        self._slot_size = 0
        self._paused_until = 0.0
        self.reservations = 0
        """Storage round trips made for slots (for benchmarks and tests)."""

    def acquire(self) -> float:
        """Take one request, waiting for its time; returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                if now >= self._paused_until and not self._slot_usable(now):
                    self._reserve(now)
                mine = now >= self._paused_until
                if mine:  # the next time in the slot is this request's
                    delay = self._slot_start + self._slot_used / self.rate - now
                    self._slot_used += 1
                else:
                    delay = self._paused_until - now
            if delay > 0:  # outside the lock: other threads take the next times meanwhile
                self._sleep(delay)
                waited += delay
            if mine:
                return waited

    def _slot_usable(self, now: float) -> bool:
        end = self._slot_start + self._slot_size / self.rate
        return self._slot_used < self._slot_size and now < end

    def _reserve(self, now: float) -> None:
        """One ETag-guarded read-modify-write: this worker's next slot (or the pause)."""
        size = self.slot_size
        reserved: list[float] = []

        def change(current: RateBudgetRow | None) -> RateBudgetRow | None:
            reserved.clear()
            row = current or RateBudgetRow(partition_key=self._PARTITION, row_key=self._key)
            if row.paused_until > now:
                reserved.append(-row.paused_until)
                return None
            start = max(row.tat, now - self.burst_seconds)
            reserved.append(start)
            return row.model_copy(update={"tat": start + size / self.rate, "rate": self.rate})

        self._table.mutate(self._PARTITION, self._key, change, attempts=50)
        self.reservations += 1
        if reserved and reserved[0] < 0:
            self._paused_until = -reserved[0]
            self._slot_size = self._slot_used = 0
            return
        self._slot_start, self._slot_used, self._slot_size = reserved[0], 0, size

    def pause_for(self, seconds: float) -> None:
        """The destination said stop: this worker and (through the row) every other one
        sends nothing for `seconds`; the slots reserved meanwhile start after the pause."""
        until = self._clock() + seconds
        with self._lock:
            self._paused_until = max(self._paused_until, until)
            self._slot_size = self._slot_used = 0

        def change(current: RateBudgetRow | None) -> RateBudgetRow | None:
            row = current or RateBudgetRow(partition_key=self._PARTITION, row_key=self._key)
            if row.paused_until >= until and row.tat >= until:
                return None
            return row.model_copy(
                update={"paused_until": max(row.paused_until, until), "tat": max(row.tat, until)}
            )

        self._table.mutate(self._PARTITION, self._key, change, attempts=50)
