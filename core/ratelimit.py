"""Client-side pacing: a token bucket per endpoint, shared by the threads that use it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

_EPSILON = 1e-6
"""A millionth of a token: what clock rounding (epoch seconds carry ~0.2 us of it) may
leave a refill short by. Without it a waiter would sleep for less than the clock can add."""


class Pacer(Protocol):
    """What a sender asks before each request: a local bucket, or a budget shared by
    workers (core/ratebudget.py)."""

    def acquire(self) -> float: ...

    def pause_for(self, seconds: float) -> None: ...


class TokenBucket:
    """At most `rate` acquisitions per second on average, bursts up to `burst`."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self._lock = threading.Lock()
        self._paused_until = 0.0

    def set_rate(self, rate: float, burst: float | None = None) -> None:
        """From now on, at `rate` (what was earned until now at the old one is kept)."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        with self._lock:
            now = self._clock()
            if now >= self._paused_until:
                self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
            self.rate = rate
            self.capacity = burst if burst is not None else max(1.0, rate)
            self._tokens = min(self._tokens, self.capacity)

    def pause_for(self, seconds: float) -> None:
        """The server said stop: nobody acquires until `seconds` have passed."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)
            self._tokens = 0.0
            self._updated = self._paused_until  # no refill is earned while paused

    def acquire(self) -> float:
        """Take one token, waiting as needed; returns the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                if now < self._paused_until:
                    delay = self._paused_until - now
                else:
                    self._tokens = min(
                        self.capacity, self._tokens + (now - self._updated) * self.rate
                    )
                    self._updated = now
                    if self._tokens >= 1.0 - _EPSILON:  # the refill's rounding, not a token short
                        self._tokens = max(0.0, self._tokens - 1.0)
                        return waited
                    # At least a microsecond: a shorter wait may not move an epoch clock.
                    delay = max(1e-6, (1.0 - self._tokens) / self.rate)
            self._sleep(delay)
            waited += delay
