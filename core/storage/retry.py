"""Retries of storage calls the SDKs give up on too early.

The storage SDKs retry by themselves, with policies set here (`sdk_retry_options`): blob
and queue calls on any method, table calls only on methods they call idempotent (GET,
PUT, DELETE). A table `POST` (an insert, a transaction) or `PATCH` that loses its
connection, times out or meets a busy server is raised at once, although Azure Storage
answers `503 ServerBusy` and resets connections under load in production too.

`retrying` retries such a call, bounded (`ATTEMPTS`), with exponential backoff and full
jitter. That is safe for every table call Switchboard makes, because each one's effect
is idempotent or its outcome checked: upserts and transactions of upserts write the same
rows again; a create-only insert that did land the first time answers `EntityExists` on
the retry, which callers already take as "it exists"; an ETag-guarded write that did
land answers `ConcurrencyConflict`, which `mutate` resolves by reading the row again, and
the pointer and placement commits resolve by checking whether the row is their own.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.storage.blob import ExponentialRetry as BlobRetry
from azure.storage.queue import ExponentialRetry as QueueRetry

from core.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
ATTEMPTS = 6
_BASE_SECONDS = 0.25
_MAX_SECONDS = 4.0
_RETRIED_STATUS = frozenset({408, 500, 502, 503, 504})


def transient(exc: BaseException) -> bool:
    """A connection that failed or broke, a timeout, or a server that is busy or failing."""
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return True
    return isinstance(exc, HttpResponseError) and exc.status_code in _RETRIED_STATUS


def retrying(call: Callable[[], T], *, what: str, sleep: Callable[[float], None] = time.sleep) -> T:
    """`call()`, again after a transient failure, up to `ATTEMPTS` times in all."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except (ServiceRequestError, ServiceResponseError, HttpResponseError) as exc:
            if not transient(exc):
                raise
            if attempt == ATTEMPTS:
                raise StorageError(
                    f"{what} failed {ATTEMPTS} times ({type(exc).__name__}); storage may be down"
                ) from exc
            pause = backoff(attempt)
            log.warning(
                "storage call failed, retrying", extra={"call": what, "attempt": attempt,
                                                        "error": type(exc).__name__},
            )  # fmt: skip
            sleep(pause)
    raise AssertionError("unreachable")


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): exponential with full
    jitter, so that workers that failed together do not retry together."""
    return random.uniform(0, min(_MAX_SECONDS, _BASE_SECONDS * 2**attempt))


class _BlobBackoff(BlobRetry):
    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        return backoff(int(settings["count"]) + 1)


class _QueueBackoff(QueueRetry):
    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        return backoff(int(settings["count"]) + 1)


def sdk_retry_options() -> dict[str, Any]:
    """The SDK clients' own retry policies, with `backoff`'s waits (the blob and queue SDKs
    wait 15 s or more before each retry by default), bounded in count."""
    return {
        "blob": {"retry_policy": _BlobBackoff(retry_total=ATTEMPTS - 1)},
        "queue": {"retry_policy": _QueueBackoff(retry_total=ATTEMPTS - 1)},
        "table": {"retry_total": ATTEMPTS - 1, "retry_backoff_factor": _BASE_SECONDS,
                  "retry_backoff_max": _MAX_SECONDS},
    }  # fmt: skip
