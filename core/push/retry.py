"""Retries of one push, the same for every provider: 5xx and broken connections back off
exponentially with jitter and count against `max_attempts`; 429s wait (the server's
`Retry-After` when given) and count against a separate, larger budget, so being throttled
does not turn a good message into a failure."""

from __future__ import annotations

import asyncio
import random

from core.errors import RateLimitedError, TransientError

_MAX_BACKOFF_SECONDS = 30.0
_BASE_BACKOFF_SECONDS = 0.05
_FREE_RESENDS = 3


class Attempts:
    def __init__(self, provider: str, *, max_attempts: int = 5, max_rate_limited_waits: int = 20):
        self.provider = provider
        self.max_attempts = max_attempts
        self.max_rate_limited_waits = max_rate_limited_waits
        self.retries = 0
        self.rate_limited_waits = 0
        self.not_processed = 0

    async def after_failure(self, why: str, retry_after: float | None = None) -> None:
        self.retries += 1
        if self.retries >= self.max_attempts:
            raise TransientError(f"{self.provider}: {why}; gave up after {self.retries} attempts")
        await asyncio.sleep(_delay(self.retries, retry_after))

    async def after_not_processed(self, why: str) -> None:
        """The server refused the stream unseen (GOAWAY, REFUSED_STREAM): resend at once,
        a few times, then back off like any failure."""
        self.not_processed += 1
        if self.not_processed > _FREE_RESENDS:
            await self.after_failure(why)

    async def after_rate_limit(self, why: str, retry_after: float | None = None) -> None:
        self.rate_limited_waits += 1
        if self.rate_limited_waits > self.max_rate_limited_waits:
            raise RateLimitedError(
                f"{self.provider}: {why}; throttled {self.rate_limited_waits} times in a row",
                retry_after=retry_after,
            )
        await asyncio.sleep(_delay(self.rate_limited_waits, retry_after))


def _delay(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(retry_after, 15 * 60.0)
    return random.uniform(0, min(_MAX_BACKOFF_SECONDS, _BASE_BACKOFF_SECONDS * 2**attempt))
