"""Braze `POST /users/track`: batched attribute updates with Braze's limits and errors.

- At most `batch_size` objects (75 by default, 50 on some contracts) and under the 4 MB
  body cap per request; a `400 Max Input Length Exceeded` or `413` splits the batch.
- Pacing, 429 waits (not counted as attempts) and 5xx/timeout retries with backoff and
  jitter: core/http.py; the pacer may be a budget shared by workers (core/ratebudget.py).
- `send_batch` is called from up to `max_in_flight` threads at once (core/sync/inflight.py).
- 401, 403 and 404 (unknown key, missing permission) raise TerminalError at once.
- Per-item `errors[]` ({type, input_array, index}) come back as ItemFailures; an error
  saying the profile does not exist (update-only mode) marks that item unmatched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
import requests
from requests.adapters import HTTPAdapter

from core.destinations.base import BatchResult, Capabilities, ItemFailure
from core.errors import TerminalError
from core.http import PoliteSender
from core.ratelimit import Pacer
from core.sync.definitions import SyncDefinition, SyncMode
from core.sync.native import NATIVE_OBJECT_FORMAT
from core.sync.state import Change

log = logging.getLogger(__name__)

_TERMINAL_STATUSES = {401: "unauthorized", 403: "forbidden", 404: "unknown API key"}
# Per-item error types that mean "no such profile" rather than "bad data".
_UNMATCHED_MARKERS = ("does not exist", "not found", "unknown user", "no user")


def _is_unmatched(error_type: str) -> bool:
    lowered = error_type.lower()
    return any(marker in lowered for marker in _UNMATCHED_MARKERS)


def users_track_object(sync: SyncDefinition, identity: str, change: Change) -> dict[str, Any]:
    """The /users/track attributes object for one profile's change."""
    item: dict[str, Any] = {sync.identity.destination_key: identity}
    if sync.mode != SyncMode.UPSERT:
        item["_update_existing_only"] = True
    item.update(change.attributes)
    audiences = sync.audiences
    by_name = {segment.name: segment for segment in audiences.segments}
    if audiences.representation == "boolean":
        for name in change.added:
            item[audiences.attribute_for(by_name[name])] = True
        for name in change.removed:
            item[audiences.attribute_for(by_name[name])] = False
    elif change.added or change.removed:
        operations: dict[str, list[str]] = {}
        if change.added:
            operations["add"] = list(change.added)
        if change.removed:
            operations["remove"] = list(change.removed)
        item[audiences.array_attribute] = operations
    return item


class BrazeDestination:
    name = "braze"
    capabilities = Capabilities(
        modes=frozenset(SyncMode),
        reports_unknown=True,  # update-only objects for unknown profiles come back as errors
        identities=("external_id", "braze_id", "email", "phone"),
        grouping="requests",
        acknowledgement="response",
        native_format=NATIVE_OBJECT_FORMAT,  # the C path writes /users/track objects
    )

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
        max_in_flight: int = 1,
        session: requests.Session | None = None,
        pacer: Pacer | None = None,
        sleep: Callable[[float], None] = time.sleep,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = endpoint.rstrip("/") + "/users/track"
        self.max_batch_objects = batch_size
        self.max_body_bytes = max_body_bytes
        self.max_attempts = max_attempts
        self.max_in_flight = max_in_flight
        if session is None:  # one kept connection per batch in flight
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(10, max_in_flight))
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "User-Agent": "switchboard",
        }
        self._sender = PoliteSender(
            "Braze", self.url, headers, requests_per_second=requests_per_second,
            max_attempts=max_attempts, timeout_seconds=timeout_seconds, session=session,
            pacer=pacer, sleep=sleep, wall_clock=wall_clock,
        )  # fmt: skip

    def close(self) -> None:
        self._sender.close()

    def item(self, sync: SyncDefinition, identity: str, change: Change) -> dict[str, Any]:
        return users_track_object(sync, identity, change)

    def encode(self, item: dict[str, Any]) -> bytes:
        return orjson.dumps(item)

    def send_batch(self, items: list[bytes]) -> BatchResult:
        # Objects are encoded once, when queued; the body is only their concatenation.
        body = b'{"attributes":[' + b",".join(items) + b"]}"
        delivered = self._sender.post(body)
        response, status = delivered.response, delivered.response.status_code
        if status in _TERMINAL_STATUSES:
            raise TerminalError(
                f"Braze refused the request: {status} {_TERMINAL_STATUSES[status]}; "
                "check the REST endpoint and that the API key has users.track",
                status=status,
            )
        if status == 413 or (status == 400 and "max input length" in response.text.lower()):
            if len(items) == 1:
                raise TerminalError(f"Braze rejects a single object as too large ({status})")
            return self._split(items, delivered.retries, delivered.rate_limited_waits)
        if status >= 400:
            raise TerminalError(
                f"Braze rejected the batch: {status} {response.text[:200]}", status=status
            )
        return BatchResult(
            failures=self._item_failures(response, len(items)),
            requests=delivered.requests,
            rate_limited_waits=delivered.rate_limited_waits,
            retries=delivered.retries,
            paced_seconds=delivered.paced_seconds,
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
