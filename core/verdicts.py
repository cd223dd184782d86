"""Every run ends with a verdict: succeeded, partially failed, or failed with a reason.

Triggers are at-least-once and retry by themselves, so what escapes an attempt is handled
in one of three ways, the same for every flow:

- `verdict_on_failure` wraps an attempt (in the trigger adapters, and around a timer's or
  route's run): an exception is written on the run, creating its record if the flow never
  got that far. On a trigger that will try again (blob, queue) the run stays open and
  says so (`detail.last_error`, with the attempt); on one that will not (timer, HTTP) it
  ends `failed` with the reason code. The exception is raised again, so the host still
  retries and logs it.
- `poisoned`: when the host gives up on a message or blob it moves it to a poison queue;
  a handler per poison queue (`functions/poison.py`) keeps the message in the `poison`
  container and ends the runs it stood for as `failed` (`poisoned`), with its last error.
  Which runs a message stands for is each flow's own resolver, listed in `POISON_QUEUES`.
- `sweep`: a timer ends open runs with no sign of life (no update, no heartbeat, not
  waiting on purpose) for `SWITCHBOARD_RUN_DEADLINE_MINUTES` as `deadline_exceeded`,
  for what no trigger reports: a host killed mid-timer, a message lost with its queue.

An operator can start a failed run again (`core/retries.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from core.errors import (
    ConfigError,
    RateLimitedError,
    StorageError,
    SwitchboardError,
    TerminalError,
    TransientError,
)
from core.runs import RunKind, RunRecord
from core.services import Services

log = logging.getLogger(__name__)
POISON_CONTAINER = "poison"
BLOB_POISON_QUEUE = "webjobs-blobtrigger-poison"
_MESSAGE_CHARS = 500


@dataclass(frozen=True)
class RunRef:
    """The run an attempt works for, enough to create its record if it does not exist."""

    run_id: str
    kind: RunKind
    source: str
    sync_id: str | None = None
    started_at: datetime | None = None


RunResolver = Callable[[], RunRef | None]


def failure_of(exc: BaseException) -> tuple[str, str]:
    """The reason code and message a run records for an exception (no values: messages
    of the app's own errors never carry personal data, others are named by type)."""
    code = getattr(exc, "code", None)
    message = str(exc)[:_MESSAGE_CHARS] or type(exc).__name__
    if isinstance(code, str) and code.isidentifier():
        return code, message
    for kind, name in (
        (RateLimitedError, "rate_limited"),
        (TransientError, "transient_error"),
        (TerminalError, "terminal_error"),
        (ConfigError, "config_error"),
        (StorageError, "storage_error"),
        (SwitchboardError, "error"),
        (ValidationError, "invalid_message"),
    ):
        if isinstance(exc, kind):
            return name, message
    return "internal_error", f"{type(exc).__name__}: {message}"


def _open(services: Services, ref: RunRef) -> RunRecord:
    return services.runs.start(
        ref.kind, run_id=ref.run_id, sync_id=ref.sync_id, source=ref.source, now=ref.started_at
    )


def record_failure(
    services: Services, ref: RunRef, exc: BaseException, *, final: bool, attempt: int | None
) -> RunRecord:
    code, message = failure_of(exc)
    _open(services, ref)
    if final:
        return services.runs.fail(ref.run_id, code, message, detail={"attempts": attempt})
    return services.runs.attempt_failed(ref.run_id, code, message, attempt=attempt)


@contextlib.contextmanager
def verdict_on_failure(
    services: Services,
    run: RunRef | RunResolver | str,
    *,
    final: bool,
    attempt: int | None = None,
) -> Iterator[None]:
    """Run an attempt; an exception that escapes it is recorded on its run (see above) and
    raised again. `run`: the run id, a reference, or how to find one (resolved only on
    failure; None: the attempt was for no run)."""
    try:
        yield
    except Exception as exc:
        try:
            ref = run() if callable(run) else run
            if isinstance(ref, str):
                if services.runs.get(ref) is not None:
                    _record_by_id(services, ref, exc, final, attempt)
            elif ref is not None:
                record_failure(services, ref, exc, final=final, attempt=attempt)
        except Exception:  # the original error matters more; the sweeper ends the run
            log.exception("could not record a failed attempt on its run")
        raise


def _record_by_id(
    services: Services, run_id: str, exc: BaseException, final: bool, attempt: int | None
) -> None:
    code, message = failure_of(exc)
    if final:
        services.runs.fail(run_id, code, message, detail={"attempts": attempt})
    else:
        services.runs.attempt_failed(run_id, code, message, attempt=attempt)


# -- poison queues ---------------------------------------------------------------------

PoisonHandler = Callable[[Services, bytes, str], list[RunRecord]]
"""(services, the message's body, where it is kept) -> the runs it ended."""


def _poison_queues() -> dict[str, PoisonHandler]:
    """Each poison queue and what a message on it ends: the flows' handlers, listed here
    (no discovery by naming convention)."""
    from core.currents.discovery import FILES_QUEUE, run_of_file_message
    from core.privacy.erasure import ERASURE_QUEUE
    from core.push.chunk_runner import chunk_poisoned
    from core.push.dispatch_model import PLAN_QUEUE
    from core.push.dispatch_model import PUSH_CHUNK_QUEUE as PUSH_CHUNKS
    from core.retries import RETRY_QUEUE
    from core.segments.arrival import run_of_poisoned_blob
    from core.sync.service import MANIFEST_QUEUE
    from core.sync.service import SEGMENT_CHUNK_QUEUE as SEGMENT_CHUNKS
    from core.webhooks.deliveries import DELIVERY_QUEUE

    return {
        BLOB_POISON_QUEUE: _failing(run_of_poisoned_blob),
        f"{SEGMENT_CHUNKS}-poison": _failing(_named("run_id", RunKind.SEGMENT_SYNC)),
        f"{MANIFEST_QUEUE}-poison": _failing(_named("run_id", RunKind.SEGMENT_SYNC)),
        f"{FILES_QUEUE}-poison": _failing(run_of_file_message),
        f"{PLAN_QUEUE}-poison": _failing(_named("dispatch_id", RunKind.PUSH_DISPATCH)),
        f"{PUSH_CHUNKS}-poison": chunk_poisoned,
        f"{RETRY_QUEUE}-poison": _failing(_named("run_id", None)),
        f"{ERASURE_QUEUE}-poison": _failing(_named("run_id", RunKind.PRIVACY_ERASURE)),
        f"{DELIVERY_QUEUE}-poison": _failing(_named("run_id", RunKind.WEBHOOK_DELIVERY)),
    }


def _unkept_queues() -> frozenset[str]:
    """Poison queues whose messages are not kept: they carry personal data (an erasure
    request's identifiers)."""
    from core.privacy.erasure import ERASURE_QUEUE

    return frozenset({f"{ERASURE_QUEUE}-poison"})


def poison_queue_names() -> list[str]:
    return sorted(_poison_queues())


def poisoned(services: Services, queue: str, body: bytes) -> list[RunRecord]:
    """A message the host gave up on: kept in the `poison` container, and what it stood
    for ended (see `_poison_queues`)."""
    handle = _poison_queues().get(queue)
    if handle is None:
        raise ConfigError(f"no handler for poison queue {queue!r}")
    kept = f"{POISON_CONTAINER}/{queue}/(not kept)" if queue in _unkept_queues() else (
        _keep(services, queue, body)
    )  # fmt: skip
    try:
        return handle(services, body, kept)
    except (ValueError, ValidationError) as exc:  # kept, and said: nothing else to do
        log.error("poison message of %s names no run: %s", queue, type(exc).__name__)
        return []


def poison_detail(
    services: Services, run_id: str, queue: str, kept: str
) -> tuple[str, dict[str, Any]]:
    """The message and detail a run ended by a poison message records."""
    run = services.runs.get(run_id)
    last = run.detail.get("last_error") if run is not None else None
    message = f"the host gave up after its retries ({queue.removesuffix('-poison')})"
    if last:
        message += f"; last error: {last.get('code')}: {last.get('message')}"
    return message, {"poison_message": kept, "poison_queue": queue}


def _failing(resolve: Callable[[Services, bytes], RunRef | None]) -> PoisonHandler:
    """The handler that ends the message's run as failed (`poisoned`)."""

    def handle(services: Services, body: bytes, kept: str) -> list[RunRecord]:
        ref = resolve(services, body)
        if ref is None:
            return []
        _open(services, ref)
        queue = kept.split("/")[1]
        message, detail = poison_detail(services, ref.run_id, queue, kept)
        log.warning("run ended by its poison message", extra={"run_id": ref.run_id})
        return [services.runs.fail(ref.run_id, "poisoned", message, detail=detail)]

    return handle


def _named(field: str, kind: RunKind | None) -> Callable[[Services, bytes], RunRef | None]:
    """A message naming its run in `field` (the run exists unless the message was never a
    run's: then, with a `kind`, it gets one so that the failure shows)."""

    def resolve(services: Services, body: bytes) -> RunRef | None:
        run_id = json_body(body).get(field)
        if not isinstance(run_id, str):
            raise ValueError(f"the message has no {field}")
        run = services.runs.get(run_id)
        if run is not None:
            return RunRef(run.run_id, run.kind, run.source or "", run.sync_id, run.started_at)
        if kind is None:
            return None
        return RunRef(run_id, kind, f"message naming {field} {run_id}")

    return resolve


def _keep(services: Services, queue: str, body: bytes) -> str:
    """The message as it was, under a name of its own content (a redelivered poison
    message is kept once)."""
    name = f"{queue}/{hashlib.sha256(body).hexdigest()[:32]}.json"
    blobs = services.storage.blobs
    blobs.ensure_container(POISON_CONTAINER)
    with contextlib.suppress(StorageError):  # already kept
        blobs.create(POISON_CONTAINER, name, body)
    return f"{POISON_CONTAINER}/{name}"


def read_kept(services: Services, path: str) -> bytes | None:
    container, _, name = path.partition("/")
    found = services.storage.blobs.read_versioned(container, name)
    return found[0] if found else None


def json_body(body: bytes) -> dict[str, Any]:
    """A message's JSON object (the host writes blob poison messages as JSON too)."""
    parsed = json.loads(body)
    if not isinstance(parsed, dict):
        raise ValueError("expected a JSON object")
    return parsed


# -- the sweeper ------------------------------------------------------------------------


def sweep(
    services: Services, *, now: datetime | None = None, only: set[str] | None = None
) -> list[RunRecord]:
    """End open runs without a sign of life for the deadline (`deadline_exceeded`);
    `only`: of these run ids."""
    moment = now or datetime.now(UTC)
    deadline = timedelta(minutes=services.settings.run_deadline_minutes)
    ended = []
    for run in list(services.runs.open_runs(now=moment)):
        if only is not None and run.run_id not in only:
            continue
        alive = max(t for t in (run.started_at, run.updated_at, run.idle_until) if t is not None)
        if moment - alive < deadline:
            continue
        quiet = int((moment - alive).total_seconds() // 60)
        message = (
            f"no sign of life for {quiet} minutes (deadline "
            f"{services.settings.run_deadline_minutes}); its worker was stopped or lost"
        )
        ended.append(services.runs.fail(run.run_id, "deadline_exceeded", message))
        log.warning("run ended by the sweeper", extra={"run_id": run.run_id})
    return ended
