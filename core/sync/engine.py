"""The segment sync run: one file in, exactly the changes out, every row accounted for.

    validate UTF-8 -> read rows -> map & type -> dedupe -> suppression & consent
      -> diff against acknowledged state -> batch -> send -> checkpoint -> commit state

Crash safety: after each acknowledged batch a checkpoint row records the last source
line the batch covered and its per-item failures. A re-triggered run replays the file
against the same (uncommitted) state; rows up to the last checkpointed line count as
acknowledged without being sent again, so at most the one batch in flight when the
process died is sent twice. The state snapshot is committed once, at the end, under the
ETag it was loaded with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from core.destinations.base import BatchResult, Destination
from core.errors import TerminalError
from core.storage import Storage
from core.storage.blobs import BlobRef
from core.storage.tables import EntityTable, TableEntity, safe_key
from core.suppression import Channel, SuppressionSnapshot
from core.sync.definitions import SyncDefinition, SyncMode
from core.sync.mapping import MappedRow, RowMapper, RowRejected
from core.sync.readers import FileRejected, RowReader, SourceRow, check_utf8, decompressed
from core.sync.reports import Outcome, OutcomeCounts, RejectsWriter
from core.sync.state import Change, SyncState

log = logging.getLogger(__name__)
_PROGRESS_EVERY_SECONDS = 10.0


class BatchCheckpoint(TableEntity):
    """Table `checkpoints`: PartitionKey run id, RowKey batch number (zero-padded)."""

    table_name: ClassVar[str] = "checkpoints"

    last_line: int
    failures: dict[str, list[Any]] = Field(default_factory=dict)
    """Source line -> [unmatched, reason] for items the destination did not apply."""


@dataclass
class _Pending:
    line: int
    identity: str
    change: Change
    item: dict[str, Any]


@dataclass
class SyncResult:
    counts: OutcomeCounts
    rejects_path: str | None
    batches_sent: int
    batches_resumed: int
    requests: int
    rate_limited_waits: int
    retries: int
    seconds: float
    file_error: FileRejected | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "rejects": self.rejects_path,
            "batches_sent": self.batches_sent,
            "batches_resumed": self.batches_resumed,
            "requests": self.requests,
            "rate_limited_waits": self.rate_limited_waits,
            "retries": self.retries,
            "rows_per_second": round(self.counts.rows / self.seconds) if self.seconds else None,
        }


def build_item(sync: SyncDefinition, identity: str, change: Change) -> dict[str, Any]:
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


class SegmentSyncRun:
    """Runs one segment file for one sync against one destination."""

    def __init__(
        self,
        storage: Storage,
        sync: SyncDefinition,
        destination: Destination,
        state: SyncState,
        suppressions: SuppressionSnapshot,
        *,
        run_id: str,
        dry_run: bool = False,
    ) -> None:
        self.storage = storage
        self.sync = sync
        self.destination = destination
        self.state = state
        self.suppressions = suppressions
        self.run_id = run_id
        self.dry_run = dry_run
        self.counts = OutcomeCounts()
        self.send_nulls = frozenset(m.target for m in sync.fields if m.send_nulls)
        self._checkpoints: EntityTable[BatchCheckpoint] = storage.tables.get(BatchCheckpoint)
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._batch_number = 0
        self._resumed: dict[int, BatchCheckpoint] = {}
        self._acked_through = 0
        self._stats = {"sent": 0, "resumed": 0, "requests": 0, "waits": 0, "retries": 0}
        self.preview: list[dict[str, Any]] = []

    # -- the run -----------------------------------------------------------------------

    def execute(self, blob: BlobRef) -> SyncResult:
        started = time.perf_counter()
        try:
            check_utf8(decompressed(self.storage.blobs.open_reader(blob)))
            reader = RowReader(
                self.storage.blobs.open_reader(blob),
                self.sync.input,
                RowMapper.wanted_columns(self.sync),
            )
            mapper = RowMapper(self.sync, reader.columns)
        except FileRejected as rejected:
            return self._result(None, started, file_error=rejected)
        self._load_checkpoints()
        rejects = RejectsWriter(self.storage.blobs, self.sync.id, self.run_id, reader.columns)
        try:
            self._process(reader, mapper, rejects)
            self._flush()
        finally:
            rejects_path = rejects.close()
        return self._result(rejects_path, started)

    def _result(
        self, rejects: str | None, started: float, *, file_error: FileRejected | None = None
    ) -> SyncResult:
        return SyncResult(
            counts=self.counts,
            rejects_path=rejects,
            batches_sent=self._stats["sent"],
            batches_resumed=self._stats["resumed"],
            requests=self._stats["requests"],
            rate_limited_waits=self._stats["waits"],
            retries=self._stats["retries"],
            seconds=time.perf_counter() - started,
            file_error=file_error,
        )

    def _rows(self, reader: RowReader) -> Iterator[SourceRow | tuple[int, str]]:
        last_report = time.monotonic()
        for entry in reader:
            yield entry
            now = time.monotonic()
            if now - last_report > _PROGRESS_EVERY_SECONDS:
                log.info(
                    "sync progress",
                    extra={"run_id": self.run_id, "rows": self.counts.rows},
                )
                last_report = now

    def _process(self, reader: RowReader, mapper: RowMapper, rejects: RejectsWriter) -> None:
        seen: set[str] = set()
        consent = self.sync.consent
        for entry in self._rows(reader):
            if isinstance(entry, tuple):
                line, message = entry
                rejects.add(line, "malformed_row", message, "")
                self.counts.add(Outcome.REJECTED, "malformed_row")
                continue
            try:
                row = mapper.map(entry.values)
            except RowRejected as exc:
                rejects.add(entry.line, exc.code, str(exc), entry.values)
                self.counts.add(Outcome.REJECTED, exc.code)
                continue
            if row.identity in seen:
                rejects.add(
                    entry.line, "duplicate_identity",
                    "identity already appeared earlier in this file (first row wins)",
                    entry.values,
                )  # fmt: skip
                self.counts.add(Outcome.REJECTED, "duplicate_identity")
                continue
            seen.add(row.identity)
            reason = self._suppressed(row)
            if reason is None and consent is not None and consent.column is not None:
                reason = None if row.consent in consent.granted_values else "no_consent"
            if reason is not None:
                self.counts.add(Outcome.SUPPRESSED, reason)
                continue
            change = self.state.diff(row.identity, row.attributes, row.memberships, self.send_nulls)
            if change.empty:
                self.counts.add(Outcome.UNCHANGED)
                continue
            self._queue(entry.line, row.identity, change)

    def _suppressed(self, row: MappedRow) -> str | None:
        reason = self.suppressions.reason_for(Channel.EMAIL, row.email)
        reason = reason or self.suppressions.reason_for(Channel.PHONE, row.phone)
        return reason.value if reason else None

    # -- batching ----------------------------------------------------------------------

    def _queue(self, line: int, identity: str, change: Change) -> None:
        item = build_item(self.sync, identity, change)
        size = self.destination.object_size(item)
        limit = self.destination.max_body_bytes
        if self._pending and (
            len(self._pending) >= self.destination.max_batch_objects
            or self._pending_bytes + size > limit
        ):
            self._flush()
        self._pending.append(_Pending(line, identity, change, item))
        self._pending_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        self._batch_number += 1
        resumed = self._resumed.get(self._batch_number)
        if resumed is not None and resumed.last_line == batch[-1].line:
            failures = {int(line): value for line, value in resumed.failures.items()}
            self._stats["resumed"] += 1
        elif self.dry_run:
            self.preview.extend(p.item for p in batch)
            failures = {}
        else:
            failures = self._send(batch)
        for pending in batch:
            failure = failures.get(pending.line)
            if failure is None:
                if not self.dry_run:
                    self.state.acknowledge(pending.identity, pending.change)
                self.counts.add(Outcome.SENT)
            elif failure[0]:
                self.counts.add(Outcome.UNMATCHED, "not_in_destination")
            else:
                self.counts.add(Outcome.FAILED, _reason_code(str(failure[1])))

    def _send(self, batch: list[_Pending]) -> dict[int, list[Any]]:
        try:
            result: BatchResult = self.destination.send_batch([p.item for p in batch])
        except TerminalError:
            raise
        self._stats["sent"] += 1
        self._stats["requests"] += result.requests
        self._stats["waits"] += result.rate_limited_waits
        self._stats["retries"] += result.retries
        failures = {
            batch[index].line: [failure.unmatched, failure.reason]
            for index, failure in result.failures.items()
        }
        self._checkpoints.upsert(
            BatchCheckpoint(
                partition_key=safe_key(self.run_id),
                row_key=f"{self._batch_number:09d}",
                last_line=batch[-1].line,
                failures={str(line): value for line, value in failures.items()},
            )
        )
        return failures

    def _load_checkpoints(self) -> None:
        for checkpoint in self._checkpoints.query_partition(safe_key(self.run_id)):
            self._resumed[int(checkpoint.row_key)] = checkpoint
        if self._resumed:
            log.info(
                "resuming run from checkpoint",
                extra={"run_id": self.run_id, "batches": len(self._resumed)},
            )


def _reason_code(reason: str) -> str:
    """A short code for a destination's free-text item error."""
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in reason.lower())
    return "destination_" + "_".join(part for part in cleaned.split("_") if part)[:48]
