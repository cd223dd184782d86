"""Run records: one row per unit of work (a segment file, a timer firing, a dispatch).

Table `runs`: PartitionKey is the run's month (`YYYYMM`), RowKey is the run's start time
inverted (newest first) plus the run id's suffix, so listing recent runs is a forward scan
of the newest partitions and a lookup by run id is a point read.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import Field

from core.errors import EntityExists
from core.storage import Storage
from core.storage.tables import TableEntity

_RUN_ID_TIME = "%Y%m%dT%H%M%SZ"
_MAX_SECONDS = 10**11  # inverted timestamps stay fixed-width until the year 5138
_MONTHS_SCANNED = 13  # how far back GET /runs looks


class RunKind(StrEnum):
    SEGMENT_SYNC = "segment_sync"
    LOG_EXPORT = "log_export"
    CURRENTS = "currents"
    PUSH_DISPATCH = "push_dispatch"
    PRIVACY_ERASURE = "privacy_erasure"
    KNOWN_PROFILES = "known_profiles"
    """A platform's profile export applied to a known-profiles registry."""
    WEBHOOK_DELIVERY = "webhook_delivery"
    """Recorded only when a delivery fails (one run per delivery would flood the log)."""


class RunStatus(StrEnum):
    RECEIVED = "received"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIALLY_FAILED = "partially_failed"
    """Finished, but a part of the work could not be done (e.g. a poisoned chunk)."""
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in _ENDED


_ENDED = frozenset({RunStatus.SUCCEEDED, RunStatus.PARTIALLY_FAILED, RunStatus.FAILED})
OPEN_STATUSES = (RunStatus.RECEIVED, RunStatus.RUNNING)


class RunRecord(TableEntity):
    table_name: ClassVar[str] = "runs"

    run_id: str
    kind: RunKind
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None = None
    sync_id: str | None = None
    source: str | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    detail: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    error_code: str | None = None
    """Why a run failed, as a reason code (`poisoned`, `deadline_exceeded`, `not_utf8`, ...)."""
    updated_at: datetime | None = None
    """The run's last sign of life: every update and heartbeat sets it."""
    idle_until: datetime | None = None
    """A run that waits on purpose (a delayed retry round, parts of an export still to
    land) is not stale before this time."""

    def public(self) -> dict[str, Any]:
        """The JSON shape served by the runs API."""
        return self.model_dump(mode="json", exclude={"partition_key", "row_key"})


def new_run_id(started_at: datetime, seed: str | None = None) -> str:
    """`20261124T041800Z-1a2b3c4d`: sortable by time; deterministic when `seed` is given."""
    suffix = (
        hashlib.sha256(seed.encode()).hexdigest()[:8] if seed is not None else secrets.token_hex(4)
    )
    return f"{started_at.astimezone(UTC).strftime(_RUN_ID_TIME)}-{suffix}"


def _keys(run_id: str) -> tuple[str, str]:
    stamp, _, suffix = run_id.partition("-")
    started = datetime.strptime(stamp, _RUN_ID_TIME).replace(tzinfo=UTC)
    inverted = _MAX_SECONDS - int(started.timestamp())
    return started.strftime("%Y%m"), f"{inverted:011d}-{suffix}"


def parse_run_id(run_id: str) -> tuple[str, str] | None:
    """Table keys of a run id, or None when it is not one of ours."""
    try:
        return _keys(run_id)
    except ValueError:
        return None


class RunLog:
    """Creates, updates and lists run records."""

    def __init__(self, storage: Storage) -> None:
        self._table = storage.tables.get(RunRecord)

    def start(
        self,
        kind: RunKind,
        *,
        run_id: str | None = None,
        status: RunStatus = RunStatus.RUNNING,
        sync_id: str | None = None,
        source: str | None = None,
        detail: dict[str, Any] | None = None,
        now: datetime | None = None,
    ) -> RunRecord:
        """Create the run record; an existing record with the same id is returned as is."""
        started = now or datetime.now(UTC)
        run_id = run_id or new_run_id(started)
        partition, row = _keys(run_id)
        record = RunRecord(
            partition_key=partition,
            row_key=row,
            run_id=run_id,
            kind=kind,
            status=status,
            started_at=started,
            sync_id=sync_id,
            source=source,
            detail=detail or {},
        )
        try:
            self._table.insert(record)
        except EntityExists:
            existing = self.get(run_id)
            assert existing is not None
            if existing.status == RunStatus.RECEIVED and status == RunStatus.RUNNING:
                # a run reopened by an operator's retry, started again
                return self.update(run_id, lambda r: setattr(r, "status", RunStatus.RUNNING))
            return existing
        return record

    def get(self, run_id: str) -> RunRecord | None:
        keys = parse_run_id(run_id)
        if keys is None:
            return None
        found = self._table.get(*keys)
        return found.entity if found else None

    def update(self, run_id: str, change: Callable[[RunRecord], None]) -> RunRecord:
        """Apply `change` to the record under its ETag (retried on conflict)."""
        keys = parse_run_id(run_id)
        if keys is None:
            raise ValueError(f"not a run id: {run_id!r}")

        def apply(current: RunRecord | None) -> RunRecord | None:
            if current is None:
                raise LookupError(f"run {run_id} does not exist")
            updated = current.model_copy(deep=True)
            change(updated)
            updated.updated_at = datetime.now(UTC)
            return updated

        result = self._table.mutate(*keys, apply)
        assert result is not None
        return result.entity

    def finish(
        self,
        run_id: str,
        status: RunStatus,
        *,
        counts: dict[str, int] | None = None,
        detail: dict[str, Any] | None = None,
        error: str | None = None,
        error_code: str | None = None,
        now: datetime | None = None,
    ) -> RunRecord:
        def close(record: RunRecord) -> None:
            record.status = status
            record.finished_at = now or datetime.now(UTC)
            if counts is not None:
                record.counts = counts
            if detail:
                record.detail = {**record.detail, **detail}
            record.error = error
            record.error_code = error_code if error is not None or error_code else None
            record.idle_until = None

        return self.update(run_id, close)

    def fail(
        self, run_id: str, code: str, message: str, *, detail: dict[str, Any] | None = None
    ) -> RunRecord:
        """End an open run as failed with a reason; a run that has ended keeps its verdict."""

        def close(record: RunRecord) -> None:
            if record.status.ended:
                return
            record.status = RunStatus.FAILED
            record.finished_at = datetime.now(UTC)
            record.error = f"{code}: {message}" if not message.startswith(code) else message
            record.error_code = code
            record.idle_until = None
            if detail:
                record.detail = {**record.detail, **detail}

        return self.update(run_id, close)

    def attempt_failed(
        self, run_id: str, code: str, message: str, *, attempt: int | None = None
    ) -> RunRecord:
        """An attempt of an open run failed and its trigger will try again: the run stays
        open and says what happened (`detail.last_error`)."""

        def note(record: RunRecord) -> None:
            if record.status.ended:
                return
            record.detail = {
                **record.detail,
                "last_error": {
                    "code": code, "message": message, "attempt": attempt,
                    "at": datetime.now(UTC).isoformat(),
                },
            }  # fmt: skip

        return self.update(run_id, note)

    def heartbeat(self, run_id: str, *, idle_until: datetime | None = None) -> None:
        """A sign of life from a long run (or one about to wait until `idle_until`)."""

        def touch(record: RunRecord) -> None:
            if idle_until is not None:
                record.idle_until = idle_until

        self.update(run_id, touch)

    def open_runs(self, *, now: datetime | None = None, limit: int = 1000) -> Iterator[RunRecord]:
        """Runs not ended yet (received or running), newest first, about a year back."""
        for status in OPEN_STATUSES:
            yield from self.recent(limit=limit, status=status, now=now)

    def recent(
        self,
        *,
        limit: int = 50,
        kind: RunKind | None = None,
        sync_id: str | None = None,
        status: RunStatus | None = None,
        now: datetime | None = None,
    ) -> Iterator[RunRecord]:
        """Newest first, optionally filtered; looks back about a year."""
        clauses = ["PartitionKey eq @month"]
        parameters: dict[str, Any] = {}
        for name, value in (("kind", kind), ("sync_id", sync_id), ("status", status)):
            if value is not None:
                clauses.append(f"{name} eq @{name}")
                parameters[name] = str(value)
        month = (now or datetime.now(UTC)).replace(day=1)
        returned = 0
        for _ in range(_MONTHS_SCANNED):
            parameters["month"] = month.strftime("%Y%m")
            for record in self._table.query(" and ".join(clauses), parameters, page_size=200):
                yield record
                returned += 1
                if returned >= limit:
                    return
            month = (month - timedelta(days=1)).replace(day=1)
