"""One request budget per destination endpoint and key, shared by every worker and sync.

A worker's threads pace themselves locally, but the limit belongs to the destination's
workspace: N fan-out workers and concurrent syncs must share it without knowing of each
other, on Azure Functions instances that share nothing but storage. The budget is one
table row (`ratebudgets`), read and written under its ETag.

The row holds each active worker's share of the rate, with a lease. A worker paces its
threads with a local token bucket at its share and renews the lease twice a second: it
aims at an equal share (rate / active workers), lowers its own at once, and raises it
only by a write that keeps the shares' sum within the rate. So the workers together
never send faster than the rate, plus each local bucket's burst (5% of a second), and
storage sees two round trips per worker per second whatever the request rate (leasing
credits per request cost more CPU than the requests). A worker that joins waits until
the others have lowered theirs (about one renewal); one that ends gives its share back,
and one that dies loses it when its lease runs out. When the destination answers 429,
the row's `paused_until` stops every worker at its next renewal, the one that was told
at once.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import ClassVar

from pydantic import Field

from core.ratelimit import TokenBucket
from core.storage.tables import EntityTable, TableEntity


class RateBudgetRow(TableEntity):
    """Table `ratebudgets`: PartitionKey `budget`, RowKey a hash of endpoint and key."""

    table_name: ClassVar[str] = "ratebudgets"

    shares: dict[str, list[float]] = Field(default_factory=dict)
    """Worker id -> [its requests per second, its lease's end (epoch seconds)]."""
    paused_until: float = 0.0
    rate: float = 0.0
    """The whole budget, as the last writer saw it (for operators reading the row)."""


def budget_key(endpoint: str, api_key: str) -> str:
    """The row for a workspace: the same endpoint and key share one budget; neither is
    stored (the key is a secret, and the endpoint alone would merge workspaces)."""
    return hashlib.sha256(f"{endpoint.rstrip('/')}\n{api_key}".encode()).hexdigest()[:32]


class SharedBudget:
    """A pacer (`acquire`, `pause_for`, `close`) whose rate is this worker's share of a
    budget kept in a table row."""

    _PARTITION = "budget"

    def __init__(
        self,
        table: EntityTable[RateBudgetRow],
        key: str,
        rate: float,
        *,
        renew_seconds: float = 0.5,
        lease_seconds: float = 3.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.renew_seconds = renew_seconds
        self.lease_seconds = lease_seconds
        self.worker = uuid.uuid4().hex[:16]
        self._table = table
        self._key = key
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._share = 0.0
        self._bucket: TokenBucket | None = None
        self._renew_at = 0.0
        self._paused_until = 0.0
        self.renewals = 0
        """Storage round trips made for the share (for benchmarks and tests)."""

    @property
    def share(self) -> float:
        return self._share

    def acquire(self) -> float:
        """Take one request at this worker's share of the rate; returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                if now >= self._renew_at:
                    self._renew(now)
                bucket = self._bucket
                if now < self._paused_until:
                    delay = self._paused_until - now
                elif bucket is None:  # no share free yet: the others lower theirs first
                    delay = max(0.0, self._renew_at - now)
                else:
                    delay = -1.0
            if delay < 0 and bucket is not None:
                return waited + bucket.acquire()
            self._sleep(delay)
            waited += delay

    def renew(self) -> float:
        """Renew now (as `acquire` does every `renew_seconds`); this worker's share."""
        with self._lock:
            self._renew(self._clock())
            return self._share

    def _renew(self, now: float) -> None:
        """One ETag-guarded read-modify-write of the row: this worker's share and lease."""
        decided: list[float] = []
        me, total = self.worker, self.rate

        def change(current: RateBudgetRow | None) -> RateBudgetRow:
            decided.clear()
            row = current or RateBudgetRow(partition_key=self._PARTITION, row_key=self._key)
            live = {w: s for w, s in row.shares.items() if s[1] > now and w != me}
            fair = total / (len(live) + 1)
            free = max(0.0, total - sum(s[0] for s in live.values()))
            share = min(fair, free)
            if share < self._share:  # lower at once, before the row says so
                self._set_share(share)
            decided.extend((share, row.paused_until))
            shares = {**live, me: [share, now + self.lease_seconds]}
            return row.model_copy(update={"shares": shares, "rate": total})

        self._table.mutate(self._PARTITION, self._key, change, attempts=50)
        self.renewals += 1
        share, paused_until = decided
        self._paused_until = max(self._paused_until, paused_until)
        self._set_share(share)
        self._renew_at = now + self.renew_seconds

    def _set_share(self, share: float) -> None:
        self._share = share
        if share < 1e-6:
            self._bucket = None
        elif self._bucket is None:
            self._bucket = TokenBucket(
                share, burst=max(1.0, share * 0.05), clock=self._clock, sleep=self._sleep
            )
        else:
            self._bucket.set_rate(share, burst=max(1.0, share * 0.05))

    def pause_for(self, seconds: float) -> None:
        """The destination said stop: this worker at once, and (through the row) every
        other one at its next renewal, sends nothing for `seconds`."""
        until = self._clock() + seconds
        with self._lock:
            self._paused_until = max(self._paused_until, until)
            if self._bucket is not None:
                self._bucket.pause_for(seconds)

        def change(current: RateBudgetRow | None) -> RateBudgetRow | None:
            row = current or RateBudgetRow(partition_key=self._PARTITION, row_key=self._key)
            if row.paused_until >= until:
                return None
            return row.model_copy(update={"paused_until": until})

        self._table.mutate(self._PARTITION, self._key, change, attempts=50)

    def close(self) -> None:
        """Give the share back, so the other workers may take it at once."""
        with self._lock:
            self._set_share(0.0)
            self._renew_at = 0.0

        def change(current: RateBudgetRow | None) -> RateBudgetRow | None:
            if current is None or self.worker not in current.shares:
                return None
            shares = {w: s for w, s in current.shares.items() if w != self.worker}
            return current.model_copy(update={"shares": shares})

        self._table.mutate(self._PARTITION, self._key, change, attempts=50)
