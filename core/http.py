"""Outbound HTTP with the manners every destination needs.

A client-side token bucket paces requests per endpoint. A 429 pauses every sender until
`Retry-After` / `X-Ratelimit-Retry-After` / `X-RateLimit-Reset` and does not count as a
failed attempt. 5xx, timeouts and dropped connections retry with exponential backoff and
full jitter, `max_attempts` times at most, then raise TransientError. Everything else is
the caller's to interpret. The session is injectable (tests, connection pools, proxies).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import requests

from core.errors import RateLimitedError, TransientError
from core.ratelimit import Pacer, TokenBucket

log = logging.getLogger(__name__)
_MAX_BACKOFF_SECONDS = 30.0
_MAX_RATE_LIMIT_WAIT_SECONDS = 15 * 60


def retry_after_seconds(headers: Any, now: float) -> float | None:
    """Seconds to wait from a 429's headers, whichever of the common forms is present."""
    for name in ("Retry-After", "X-Ratelimit-Retry-After"):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value))
            except ValueError:
                try:
                    return max(0.0, parsedate_to_datetime(value).timestamp() - now)
                except (TypeError, ValueError):
                    continue
    reset = headers.get("X-RateLimit-Reset")
    if reset:
        try:
            return max(0.0, float(reset) - now)
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class Delivered:
    """A response that is neither a 429 nor a 5xx, and what it took to get it."""

    response: requests.Response
    retries: int
    rate_limited_waits: int
    paced_seconds: float = 0.0
    """Waited for the pacer (the budget), not for the server."""

    @property
    def requests(self) -> int:
        return self.retries + self.rate_limited_waits + 1


class PoliteSender:
    """POSTs one body to one URL until the server answers something other than 429/5xx."""

    def __init__(
        self,
        service: str,
        url: str,
        headers: dict[str, str],
        *,
        requests_per_second: float,
        max_attempts: int = 5,
        timeout_seconds: float = 30.0,
        session: requests.Session | None = None,
        pacer: Pacer | None = None,
        sleep: Callable[[float], None] = time.sleep,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.url = url
        self.max_attempts = max_attempts
        self.timeout = timeout_seconds
        self._headers = headers
        self._session = session or requests.Session()
        self._pacer = pacer or TokenBucket(requests_per_second, sleep=sleep)
        self._sleep = sleep
        self._wall_clock = wall_clock

    def close(self) -> None:
        """Give back the pacer's share (a shared budget's) and the connections."""
        close = getattr(self._pacer, "close", None)
        if close is not None:
            close()
        self._session.close()

    def post(self, body: bytes, *, headers: dict[str, str] | None = None) -> Delivered:
        """`headers` are added to the sender's own for this call (e.g. a fresh token)."""
        request_headers = {**self._headers, **headers} if headers else self._headers
        attempt = 0
        waits = 0
        waited = 0.0
        paced = 0.0
        while True:
            paced += self._pacer.acquire()
            try:
                response = self._session.post(
                    self.url, data=body, headers=request_headers, timeout=self.timeout
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                attempt += 1
                self._backoff_or_raise(attempt, f"{type(exc).__name__} calling {self.service}")
                continue
            status = response.status_code
            if status == 429:
                delay = retry_after_seconds(response.headers, self._wall_clock())
                delay = 1.0 if delay is None else delay
                waits += 1
                waited += delay
                if waited > _MAX_RATE_LIMIT_WAIT_SECONDS:
                    raise RateLimitedError(
                        f"{self.service} kept rate limiting for over 15 minutes",
                        status=429,
                        retry_after=delay,
                    )
                log.info("%s rate limit: waiting %.1fs", self.service, delay)
                self._pacer.pause_for(delay)
                continue  # a rate-limit wait is not a failed attempt
            if status >= 500:
                attempt += 1
                self._backoff_or_raise(attempt, f"{self.service} answered {status}", status)
                continue
            return Delivered(
                response, retries=attempt, rate_limited_waits=waits, paced_seconds=paced
            )

    def _backoff_or_raise(self, attempt: int, reason: str, status: int | None = None) -> None:
        if attempt >= self.max_attempts:
            raise TransientError(f"{reason}; gave up after {attempt} attempts", status=status)
        delay = random.uniform(0, min(_MAX_BACKOFF_SECONDS, 0.5 * 2**attempt))
        log.info(
            "%s; retrying in %.2fs (attempt %d of %d)", reason, delay, attempt, self.max_attempts
        )
        self._sleep(delay)
