"""Braze `POST /users/track`: batched attribute updates with Braze's limits and errors.

- At most `batch_size` objects (75 by default, 50 on some contracts) and under the 4 MB
  body cap per request; a `400 Max Input Length Exceeded` or `413` splits the batch.
- A client-side token bucket paces requests per endpoint. A 429 pauses every sender until
  `Retry-After` / `X-Ratelimit-Retry-After` / `X-RateLimit-Reset` and does not count as a
  failed attempt. 5xx, timeouts and dropped connections retry with exponential backoff and
  full jitter, `max_attempts` times at most, then raise TransientError.
- 401, 403 and 404 (unknown key, missing permission) raise TerminalError at once.
- Per-item `errors[]` ({type, input_array, index}) come back as ItemFailures; an error
  saying the profile does not exist (update-only mode) marks that item unmatched.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import orjson
import requests

from core.destinations.base import BatchResult, ItemFailure
from core.errors import RateLimitedError, TerminalError, TransientError
from core.ratelimit import TokenBucket

log = logging.getLogger(__name__)

_TERMINAL_STATUSES = {401: "unauthorized", 403: "forbidden", 404: "unknown API key"}
# Per-item error types that mean "no such profile" rather than "bad data".
_UNMATCHED_MARKERS = ("does not exist", "not found", "unknown user", "no user")
_MAX_BACKOFF_SECONDS = 30.0
_MAX_RATE_LIMIT_WAIT_SECONDS = 15 * 60


def _is_unmatched(error_type: str) -> bool:
    lowered = error_type.lower()
    return any(marker in lowered for marker in _UNMATCHED_MARKERS)


def retry_after_seconds(headers: Any, now: float) -> float | None:
    """Seconds to wait from a 429's headers, whichever of Braze's forms is present."""
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


class BrazeDestination:
    name = "braze"

    def __init__(
        self,
        endpoint: str,
        api_key: str,
        *,
        batch_size: int = 75,
        max_body_bytes: int = 3_900_000,
        requests_per_second: float = 50.0,
        max_attempts: int = 5,
        timeout_seconds: float = 30.0,
        session: requests.Session | None = None,
        pacer: TokenBucket | None = None,
        sleep: Callable[[float], None] = time.sleep,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = endpoint.rstrip("/") + "/users/track"
        self.max_batch_objects = batch_size
        self.max_body_bytes = max_body_bytes
        self.max_attempts = max_attempts
        self.timeout = timeout_seconds
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "User-Agent": "switchboard",
        }
        self._session = session or requests.Session()
        self._pacer = pacer or TokenBucket(requests_per_second, sleep=sleep)
        self._sleep = sleep
        self._wall_clock = wall_clock

    def encode(self, item: dict[str, Any]) -> bytes:
        return orjson.dumps(item)

    def send_batch(self, items: list[bytes]) -> BatchResult:
        # Objects are encoded once, when queued; the body is only their concatenation.
        body = b'{"attributes":[' + b",".join(items) + b"]}"
        attempt = 0
        waits = 0
        waited = 0.0
        while True:
            self._pacer.acquire()
            try:
                response = self._session.post(
                    self.url, data=body, headers=self._headers, timeout=self.timeout
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                attempt += 1
                self._backoff_or_raise(attempt, f"{type(exc).__name__} calling Braze")
                continue
            status = response.status_code
            if status == 429:
                delay = retry_after_seconds(response.headers, self._wall_clock())
                delay = 1.0 if delay is None else delay
                waits += 1
                waited += delay
                if waited > _MAX_RATE_LIMIT_WAIT_SECONDS:
                    raise RateLimitedError(
                        "Braze kept rate limiting for over 15 minutes",
                        status=429,
                        retry_after=delay,
                    )
                log.info("Braze rate limit: waiting %.1fs", delay)
                self._pacer.pause_for(delay)
                continue  # a rate-limit wait is not a failed attempt
            if status >= 500:
                attempt += 1
                self._backoff_or_raise(attempt, f"Braze answered {status}", status)
                continue
            if status in _TERMINAL_STATUSES:
                raise TerminalError(
                    f"Braze refused the request: {status} {_TERMINAL_STATUSES[status]}; "
                    "check the REST endpoint and that the API key has users.track",
                    status=status,
                )
            if status == 413 or (status == 400 and "max input length" in response.text.lower()):
                if len(items) == 1:
                    raise TerminalError(f"Braze rejects a single object as too large ({status})")
                return self._split(items, attempt, waits)
            if status >= 400:
                raise TerminalError(
                    f"Braze rejected the batch: {status} {response.text[:200]}", status=status
                )
            return BatchResult(
                failures=self._item_failures(response, len(items)),
                requests=attempt + waits + 1,
                rate_limited_waits=waits,
                retries=attempt,
            )

    def _split(self, items: list[bytes], retries: int, waits: int) -> BatchResult:
        middle = len(items) // 2
        first = self.send_batch(items[:middle])
        second = self.send_batch(items[middle:])
        failures = dict(first.failures)
        for index, failure in second.failures.items():
            failures[index + middle] = ItemFailure(
                index + middle, failure.unmatched, failure.reason
            )
        return BatchResult(
            failures,
            requests=first.requests + second.requests + 1,
            rate_limited_waits=waits + first.rate_limited_waits + second.rate_limited_waits,
            retries=retries + first.retries + second.retries,
        )

    def _backoff_or_raise(self, attempt: int, reason: str, status: int | None = None) -> None:
        if attempt >= self.max_attempts:
            raise TransientError(f"{reason}; gave up after {attempt} attempts", status=status)
        delay = random.uniform(0, min(_MAX_BACKOFF_SECONDS, 0.5 * 2**attempt))
        log.info(
            "%s; retrying in %.2fs (attempt %d of %d)", reason, delay, attempt, self.max_attempts
        )
        self._sleep(delay)

    @staticmethod
    def _item_failures(response: requests.Response, count: int) -> dict[int, ItemFailure]:
        try:
            payload = response.json()
        except ValueError:
            return {}
        failures: dict[int, ItemFailure] = {}
        for error in payload.get("errors") or []:
            if not isinstance(error, dict):
                continue
            index = error.get("index")
            if error.get("input_array", "attributes") != "attributes" or not isinstance(index, int):
                continue
            if 0 <= index < count:
                error_type = str(error.get("type", "unknown error"))
                failures[index] = ItemFailure(index, _is_unmatched(error_type), error_type[:200])
        return failures
