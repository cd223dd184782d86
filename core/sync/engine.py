"""Processing one bucket of a segment file: every row ends with one outcome and a reason.

Past 500 lines because it is the Python reference of the C bucket path
(native/switchboard_sync.c), kept whole so the two can be compared step by step.

    raw digest unchanged? -> unchanged (no typing needed)
    map & type -> dedupe -> suppression & consent -> diff against acknowledged state
      -> batch -> send -> checkpoint -> (bucket done) commit state

Crash safety: after each acknowledged batch a checkpoint row records every item of the
batch (bucket and source line) with its result (core/sync/checkpoints.py). A re-run
replays the buckets against the same (uncommitted) state; an item found in a checkpoint is
settled from it instead of being sent again, so at most the batches in flight when the
process died (the destination's `max_in_flight`, core/sync/inflight.py) are sent twice.
A bucket's state is committed once all of its items are acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from core.audit import Exclusion, exclusion
from core.destinations.base import BatchResult, Destination
from core.storage import Storage
from core.suppression import Channel, SuppressionSnapshot
from core.sync.checkpoints import CheckpointLog
from core.sync.definitions import SyncDefinition, SyncMode
from core.sync.inflight import InFlight
from core.sync.mapping import MappedRow, RowMapper, RowRejected
from core.sync.native import NATIVE_OBJECT_FORMAT, native_mapping
from core.sync.readers import SourceRow
from core.sync.reports import Outcome, OutcomeCounts, PreviewPart, RejectsPart
from core.sync.split import work_rows
from core.sync.state import Change, SyncState, raw_digest
from core.sync.unchanged import SettledRows

log = logging.getLogger(__name__)
_PROGRESS_EVERY_SECONDS = 10.0
_PROGRESS_CHECK_ROWS = 4096
_NO_CONSENT = "no_consent"
_HELD_BACK_SECONDS = 0.02
"""A send that waited longer for the budget was one more than the budget lets go."""
_GATHER_SECONDS = 0.025
"""How long a checkpoint write waits for other sends' batches (about a quarter of a
REST round trip): it holds each batch's place in the window that much longer."""


def _item_key(bucket: int, line: int) -> str:
    return f"{bucket}:{line}"


@dataclass
class _Pending:
    bucket: BucketWork
    line: int
    identity: str
    change: Change
    digest: bytes
    item: dict[str, Any]
    encoded: bytes = b""
    contact: tuple[str | None, str | None] = (None, None)
    """The row's e-mail and phone, for the audit trail if the destination does not apply it."""
    withdrawal: bool = False
    """The audiences we added, taken back from a row that withdrew consent (counted
    already as suppressed: the row itself sends nothing)."""


class _Items:
    """Queued objects of one bucket, by index: the reference's, one `_Pending` each."""

    def __init__(self, work: BucketWork) -> None:
        self.work = work
        self.pending: list[_Pending | None] = []
        """None once settled."""

    def _unsettled(self, start: int, end: int) -> list[_Pending]:
        return [pending for pending in self.pending[start:end] if pending is not None]

    def encoded(self, start: int, end: int) -> list[bytes]:
        return [pending.encoded for pending in self._unsettled(start, end)]

    def keys(self, start: int, end: int) -> list[str]:
        return [_item_key(self.work.number, p.line) for p in self._unsettled(start, end)]


class _NativeItems:
    """Queued objects of one bucket processed in C: they stay in its `State` until sent."""

    def __init__(self, work: BucketWork) -> None:
        self.work = work
        self.state = work.state.native

    def encoded(self, start: int, end: int) -> list[bytes]:
        encoded: list[bytes] = self.state.encoded(start, end)
        return encoded

    def keys(self, start: int, end: int) -> list[str]:
        keys: list[str] = self.state.keys(self.work.number, start, end)
        return keys


@dataclass
class _Span:
    """Items start..end-1 of one bucket, in a batch."""

    items: _Items | _NativeItems
    start: int
    end: int


@dataclass
class BatchStats:
    sent: int = 0
    resumed: int = 0
    requests: int = 0
    rate_limited_waits: int = 0
    retries: int = 0
    native: int = 0
    """Buckets processed in C (the rest ran on the reference)."""

    def add(self, other: BatchStats) -> None:
        for name in ("sent", "resumed", "requests", "rate_limited_waits", "retries", "native"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class BucketWork:
    """One bucket while it is processed: its state, rejects, counts and unsent items."""

    number: int
    state: SyncState
    rejects: RejectsPart
    counts: OutcomeCounts = field(default_factory=OutcomeCounts)
    stats: BatchStats = field(default_factory=BatchStats)
    preview: PreviewPart | None = None
    """Dry runs: where the objects that would be sent are written."""
    diff: Counter[str] = field(default_factory=Counter)
    """Dry runs: new and updated profiles, changed attributes, membership moves."""
    in_flight: int = 0
    rows_done: bool = False
    exclusions: list[Exclusion] = field(default_factory=list)
    """Every row kept out of the send, for the audit trail (core/audit.py)."""
    lines: bytes = b""
    """The work lines C processed: excluded rows and unapplied items point into them."""


class SegmentChunkRunner:
    """Runs the buckets of one worker against the destination, batching across buckets.

    A bucket's state is handed to `on_bucket_done` once its rows are read and every item
    it queued is acknowledged; batches are filled across bucket boundaries so that small
    files do not turn into one small request per bucket.
    """

    def __init__(
        self,
        storage: Storage,
        sync: SyncDefinition,
        mapper: RowMapper,
        destination: Destination,
        suppressions: SuppressionSnapshot,
        *,
        run_id: str,
        worker: str,
        on_bucket_done: Callable[[BucketWork], None],
        dry_run: bool = False,
        blocked_by: str | None = None,
        checkpoints: CheckpointLog | None = None,
        native: bool = True,
    ) -> None:
        self.sync = sync
        self.mapper = mapper
        self.destination = destination
        self.suppressions = suppressions
        self._no_suppressions = suppressions.empty
        self.run_id = run_id
        self.worker = worker
        self.on_bucket_done = on_bucket_done
        self.blocked_by = blocked_by
        """A policy that blocks the sync: rows that would be sent end blocked_by_policy."""
        dry_run = self.dry_run = dry_run or blocked_by is not None
        self.send_nulls = frozenset(m.target for m in sync.fields if m.send_nulls)
        self._names = ([t for t, _, _, _ in mapper.fields], [name for name, _ in mapper.audiences])
        self._checkpoints = checkpoints or CheckpointLog(storage)
        window = 1 if dry_run else destination.max_in_flight
        self._in_flight: InFlight[list[_Span], BatchResult] = InFlight(
            window, name=f"send-{worker}"
        )
        if window > 1:
            self._checkpoints.gather_for(_GATHER_SECONDS)
        self._batch: list[_Span] = []
        self._batch_objects = 0
        self._batch_bytes = 0
        self._batch_number = 0
        self._acknowledged: dict[str, list[Any]] = {}
        self._open: list[BucketWork] = []
        self._rows = 0
        self._items: dict[int, _Items] = {}
        self._started = self._last_report = time.monotonic()
        if not dry_run:
            self._load_checkpoints()
        self.native = (
            native_mapping(sync, mapper, suppressions, self._suppressed_raw)
            if native and not dry_run and not self._acknowledged
            and destination.capabilities.native_format == NATIVE_OBJECT_FORMAT else None
        )  # fmt: skip
        """The mapping compiled for the C path, or None: every bucket on the reference."""

    def run_bucket(self, work: BucketWork, lines: bytes) -> None:
        """Process a bucket's work lines (split.work_rows): in C if its state was decoded
        for it and C takes them, else on the reference (mirror removals included)."""
        self._open.append(work)
        self._items[work.number] = _Items(work)
        lines, settled = SettledRows.take(lines)
        if settled is not None:
            self._count_settled(work, settled)
        if lines or self.sync.mode == SyncMode.MIRROR:
            self._run_rows(work, lines, settled)
        work.rows_done = True
        self._close_finished()

    def _run_rows(self, work: BucketWork, lines: bytes, settled: SettledRows | None) -> None:
        native = self.native is not None and work.state.native is not None
        # The state's next tables hold the mapping's names (C's from its own mapping).
        work.state.names = self._names
        if native and settled is not None:
            work.state.mark_seen(settled.index, settled.state_etag)
        if not (native and self._process_native(work, lines)):
            work.state.use_reference()
            seen = work.state.mark_seen(settled.index, settled.state_etag) if settled else set()
            self._process(work, work_rows(lines, len(self.mapper.columns)), seen)
            if self.sync.mode == SyncMode.MIRROR:
                self._mirror_absent(work, seen)

    def _count_settled(self, work: BucketWork, settled: SettledRows) -> None:
        """Rows the split settled: counted as `_process` counts them."""
        _add_counts(work.counts, settled.unchanged, settled.reasons)
        self._report_progress(settled.rows)

    def _process_native(self, work: BucketWork, data: bytes) -> bool:
        outcome = work.state.native.process(self.native, data, work.state.withheld)
        if outcome is None:
            return False  # input C does not take: the whole bucket runs on the reference
        unchanged, reasons, rejects, withheld_now, items, excluded = outcome
        if self.sync.mode == SyncMode.MIRROR:
            items = work.state.native.mirror()  # with removals for absent profiles
            if items is None:
                return False
        _add_counts(work.counts, unchanged, reasons)
        work.rejects.add_texts(rejects)
        work.state.withheld_now.update(withheld_now)
        work.lines = data
        for offset, reason in excluded:
            self._exclude_at(work, offset, Outcome.SUPPRESSED, reason)
        self._report_progress(unchanged + sum(reasons.values()) + items)
        work.stats.native = 1
        self._add_native(_NativeItems(work), items)
        return True

    def _mirror_absent(self, work: BucketWork, seen: set[str]) -> None:
        """A full export without a profile we gave audiences: take those audiences back."""
        absent = [
            (identity, profile)
            for identity, profile in work.state.profiles.items()
            if identity not in seen and profile.audiences
        ]
        for index, (identity, profile) in enumerate(absent, start=1):
            change = Change({}, (), tuple(sorted(profile.audiences)))
            # Negative "lines" keep checkpoint keys unique and apart from real rows.
            self._queue(work, -index, identity, change, b"")

    def finish(self) -> None:
        self._flush()
        for batch, answer in self._in_flight.drain():
            self._settle_batch(batch, answer)
        self._in_flight.close()
        self._close_finished()

    def close(self) -> None:
        """After an error: wait for the sends under way, send nothing more."""
        self._in_flight.close()

    def _close_finished(self) -> None:
        for work in [w for w in self._open if w.rows_done and w.in_flight == 0]:
            self._open.remove(work)
            del self._items[work.number]
            self.on_bucket_done(work)

    def _process(self, work: BucketWork, rows: Iterable[SourceRow], seen: set[str]) -> None:
        """`seen`: identities met before these rows (settled in the split); it grows."""
        consent = self.sync.consent
        mapper = self.mapper
        state = work.state
        counts = work.counts
        digest_values = mapper.digest_values
        unchanged_raw = 0  # the common case, counted here: an enum lookup per row adds up
        full = self.destination.capabilities.resend_unchanged
        number = 0
        for number, entry in enumerate(rows, start=1):
            if number % _PROGRESS_CHECK_ROWS == 0:
                self._report_progress(_PROGRESS_CHECK_ROWS)
            values = entry.values
            digest = raw_digest(digest_values(values))
            try:
                identity = mapper.identity(values)
            except RowRejected as exc:
                self._reject(work, entry, exc.code, str(exc))
                continue
            if identity in seen:
                self._reject(
                    work, entry, "duplicate_identity",
                    "identity already appeared earlier in this file (first row wins)",
                )  # fmt: skip
                continue
            seen.add(identity)
            if full:
                pass  # a full refresh sends every row whole: nothing is settled unread
            elif state.unchanged_raw(identity, digest):
                # Acknowledged before exactly as it is: valid then, nothing to send now.
                reason = self._suppressed_raw(values)
                if reason:
                    counts.add(Outcome.SUPPRESSED, reason)
                    self._exclude(
                        work, identity, mapper.contact(values), Outcome.SUPPRESSED, reason
                    )
                else:
                    unchanged_raw += 1
                continue
            if not full and state.withheld_again(identity, digest):
                # Held back again as it was: recorded when first held back (or suppressed now).
                reason = self._suppressed_raw(values)
                counts.add(Outcome.SUPPRESSED, reason or _NO_CONSENT)
                if reason:
                    self._exclude(
                        work, identity, mapper.contact(values), Outcome.SUPPRESSED, reason
                    )
                continue
            try:
                row = mapper.map(values)
            except RowRejected as exc:
                self._reject(work, entry, exc.code, str(exc))
                continue
            reason = self._suppressed(row)
            withheld = (
                reason is None and consent is not None and consent.column is not None
                and row.consent not in consent.granted_values
            )  # fmt: skip
            if withheld:
                reason = _NO_CONSENT
                known = state.profiles.get(identity)
                if known is not None and known.audiences:
                    removal = Change({}, (), tuple(sorted(known.audiences)))
                    self._queue(work, entry.line, identity, removal, digest, withdrawal=True)
                else:  # once taken back (_settle), the row is held back like any other
                    state.withhold(identity, digest)
            if reason is not None:
                counts.add(Outcome.SUPPRESSED, reason)
                self._exclude(work, identity, (row.email, row.phone), Outcome.SUPPRESSED, reason)
                continue
            change = state.diff(
                identity, row.attributes, row.memberships, self.send_nulls, whole=full
            )
            if change.empty:
                state.remember_digest(identity, digest)
                counts.add(Outcome.UNCHANGED)
                continue
            if self.blocked_by is not None:
                counts.add(Outcome.BLOCKED_BY_POLICY, self.blocked_by)
                self._exclude(
                    work, identity, (row.email, row.phone), Outcome.BLOCKED_BY_POLICY,
                    self.blocked_by,
                )  # fmt: skip
                continue
            self._queue(work, entry.line, identity, change, digest, contact=(row.email, row.phone))
        counts.add(Outcome.UNCHANGED, times=unchanged_raw)
        self._report_progress(number % _PROGRESS_CHECK_ROWS)

    def _exclude(
        self, work: BucketWork, identity: str, contact: tuple[str | None, str | None],
        outcome: Outcome, rule: str,
    ) -> None:  # fmt: skip
        """A row kept out of the send, for the audit trail."""
        work.exclusions.append(exclusion(identity, *contact, outcome.value, rule))

    def _exclude_at(self, work: BucketWork, offset: int, outcome: Outcome, rule: str) -> None:
        """A row C kept out, by its offset in the bucket's work lines."""
        if offset < 0:
            return
        end = work.lines.find(b"\n", offset)
        line = work.lines[offset : end + 1 if end >= 0 else len(work.lines)]
        for entry in work_rows(line, len(self.mapper.columns)):
            values = entry.values
            identity = self.mapper.identity(values)
            self._exclude(work, identity, self.mapper.contact(values), outcome, rule)

    def _report_progress(self, new_rows: int) -> None:
        """Log rows and rows/s every _PROGRESS_EVERY_SECONDS (counts only: no identities)."""
        self._rows += new_rows
        now = time.monotonic()
        if now - self._last_report >= _PROGRESS_EVERY_SECONDS:
            elapsed = now - self._started
            log.info(
                "sync progress: %d rows, %.0f rows/s",
                self._rows, self._rows / elapsed if elapsed else 0.0,
                extra={"run_id": self.run_id, "worker": self.worker},
            )  # fmt: skip
            self._last_report = now

    def _reject(self, work: BucketWork, entry: SourceRow, code: str, message: str) -> None:
        work.rejects.add(entry.line, code, message, entry.values, entry.raw)
        work.counts.add(Outcome.REJECTED, code)

    def _suppressed(self, row: MappedRow) -> str | None:
        reason = self.suppressions.reason_for(Channel.EMAIL, row.email)
        reason = reason or self.suppressions.reason_for(Channel.PHONE, row.phone)
        return reason.value if reason else None

    def _suppressed_raw(self, values: Any) -> str | None:
        if self._no_suppressions:
            return None  # nothing to look up: skip normalising the row's addresses
        email, phone = self.mapper.contact(values)
        reason = self.suppressions.reason_for(Channel.EMAIL, email)
        reason = reason or self.suppressions.reason_for(Channel.PHONE, phone)
        return reason.value if reason else None

    # -- batching ----------------------------------------------------------------------

    def _queue(
        self, work: BucketWork, line: int, identity: str, change: Change, digest: bytes,
        *, withdrawal: bool = False, contact: tuple[str | None, str | None] = (None, None),
    ) -> None:  # fmt: skip
        if self.blocked_by is not None:
            return  # removals (mirror, withdrawal) wait too: a blocked sync sends nothing
        item = self.destination.item(self.sync, identity, change)
        pending = _Pending(
            work, line, identity, change, digest, item, contact=contact, withdrawal=withdrawal
        )
        if work.preview is not None:
            self._preview(work, pending)
            return
        previous = self._acknowledged.get(_item_key(work.number, line))
        if previous is not None:  # sent and checkpointed before a crash: not again
            work.stats.resumed += 1
            self._settle(pending, previous)
            return
        pending.encoded = self.destination.encode(pending.item)
        size = len(pending.encoded) + 1
        if self._batch and (
            self._batch_objects >= self.destination.max_batch_objects
            or self._batch_bytes + size > self.destination.max_body_bytes
        ):
            self._flush()
            self._close_finished()
        items = self._items[work.number]
        items.pending.append(pending)
        self._add_span(_Span(items, len(items.pending) - 1, len(items.pending)), size)

    def _add_native(self, items: _NativeItems, count: int) -> None:
        """Queue a bucket's objects from C: whole runs of them per batch, the same batches
        as `_queue` makes one object at a time."""
        start = 0
        while start < count:
            end, size = items.state.take(
                start, self._batch_objects, self._batch_bytes,
                self.destination.max_batch_objects, self.destination.max_body_bytes,
            )  # fmt: skip
            if end == start:  # the batch is full
                self._flush()
                self._close_finished()
                continue
            self._add_span(_Span(items, start, end), size - self._batch_bytes)
            start = end

    def _add_span(self, span: _Span, size: int) -> None:
        span.items.work.in_flight += span.end - span.start
        self._batch.append(span)
        self._batch_objects += span.end - span.start
        self._batch_bytes += size

    def _preview(self, work: BucketWork, pending: _Pending) -> None:
        assert work.preview is not None
        work.preview.add(pending.line, pending.item)
        known = pending.identity in work.state.profiles
        if pending.line > 0 and not pending.withdrawal:
            work.diff["profiles_updated" if known else "profiles_new"] += 1
        for name in pending.change.attributes:
            work.diff[f"attribute.{name}"] += 1
        work.diff["memberships_added"] += len(pending.change.added)
        work.diff["memberships_removed"] += len(pending.change.removed)
        if pending.withdrawal:
            work.diff["consent_withdrawals"] += 1
        elif pending.line > 0:
            work.counts.add(Outcome.WOULD_SEND)

    def _flush(self) -> None:
        """Hand the batch to a sender; settle the batches that came back meanwhile."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        self._batch_objects = self._batch_bytes = 0
        encoded: list[bytes] = []
        keys: list[str] = []
        for span in batch:  # read here: the spans' items live in this thread's state
            encoded += span.items.encoded(span.start, span.end)
            keys += span.items.keys(span.start, span.end)
        self._batch_number += 1
        key = f"{self.worker}-{self._batch_number:09d}"
        for done, answer in self._in_flight.submit(batch, lambda: self._send(encoded, keys, key)):
            self._settle_batch(done, answer)

    def _settle_batch(self, batch: list[_Span], answer: BatchResult) -> None:
        stats = batch[-1].items.work.stats
        stats.sent += 1
        stats.requests += answer.requests
        stats.rate_limited_waits += answer.rate_limited_waits
        stats.retries += answer.retries
        self._in_flight.window.observe(
            answer.rate_limited_waits > 0, held_back=answer.paced_seconds > _HELD_BACK_SECONDS
        )
        failures = {
            index: [failure.unmatched, failure.reason] for index, failure in answer.failures.items()
        }
        offset = 0
        for span in batch:
            count = span.end - span.start
            span.items.work.in_flight -= count
            failed = {
                span.start + index - offset: result
                for index, result in failures.items()
                if offset <= index < offset + count
            }
            self._settle_span(span, failed)
            offset += count

    def _settle_span(self, span: _Span, failed: dict[int, list[Any]]) -> None:
        """Settle a span's items: those in `failed` (by item index) were not applied."""
        items = span.items
        if isinstance(items, _Items):
            for index in range(span.start, span.end):
                pending = items.pending[index]
                assert pending is not None
                self._settle(pending, failed.get(index, []))
                items.pending[index] = None  # settled: its objects may go
            return
        rows, removals, failed_removals = items.state.settle(span.start, span.end, failed)
        counts = items.work.counts
        counts.add(Outcome.SENT, times=rows)
        if removals:
            counts.reasons["mirror.removed"] += removals
        unmatched: list[int] = []
        for index, result in failed.items():
            if index in failed_removals:
                counts.reasons["mirror.failed"] += 1
            else:
                self._count_failure(counts, result)
                if result[0]:
                    unmatched.append(index)
        if unmatched:
            offsets = items.state.row_offsets(span.start, span.end)
            for index in unmatched:
                self._exclude_at(
                    items.work, offsets[index - span.start], Outcome.UNMATCHED,
                    "not_in_destination",
                )  # fmt: skip

    def _settle(self, pending: _Pending, result: list[Any]) -> None:
        counts = pending.bucket.counts
        if pending.withdrawal:  # the row is counted (no consent); this is its removal
            if not result:
                state = pending.bucket.state
                state.acknowledge(pending.identity, pending.change, None)
                state.withhold(pending.identity, pending.digest)
            # Not taken back: not held back either, so the next run tries again.
            counts.reasons[
                "consent.audiences_removed" if not result else "consent.removal_failed"
            ] += 1
            return
        if pending.line < 0:  # a mirror removal: not a row of the file
            if not result:
                pending.bucket.state.acknowledge(pending.identity, pending.change, None)
            counts.reasons["mirror.removed" if not result else "mirror.failed"] += 1
            return
        if not result:
            pending.bucket.state.acknowledge(pending.identity, pending.change, pending.digest)
            counts.add(Outcome.SENT)
        else:
            self._count_failure(counts, result)
            if result[0]:
                self._exclude(
                    pending.bucket, pending.identity, pending.contact, Outcome.UNMATCHED,
                    "not_in_destination",
                )  # fmt: skip

    @staticmethod
    def _count_failure(counts: OutcomeCounts, result: list[Any]) -> None:
        if result[0]:
            counts.add(Outcome.UNMATCHED, "not_in_destination")
        else:
            counts.add(Outcome.FAILED, _reason_code(str(result[1])))

    def _send(self, encoded: list[bytes], keys: list[str], key: str) -> BatchResult:
        """On a sender thread: send one batch and checkpoint it before it counts as back."""
        answer = self.destination.send_batch(encoded)
        recorded: dict[str, list[Any]] = {item: [] for item in keys}  # [] means applied
        for index, failure in answer.failures.items():
            recorded[keys[index]] = [failure.unmatched, failure.reason]
        self._checkpoints.record(self.run_id, key, recorded)
        return answer

    def _load_checkpoints(self) -> None:
        self._acknowledged = self._checkpoints.load(self.run_id)
        if self._acknowledged:
            log.info(
                "resuming from checkpoints",
                extra={"run_id": self.run_id, "items": len(self._acknowledged)},
            )


def _add_counts(counts: OutcomeCounts, unchanged: int, reasons: dict[str, int]) -> None:
    """Counts kept elsewhere (C, the split): rows unchanged, and {"outcome.reason": rows}."""
    counts.add(Outcome.UNCHANGED, times=unchanged)
    for key, times in reasons.items():
        counts.outcomes[key.partition(".")[0]] += times
        counts.reasons[key] += times


def _reason_code(reason: str) -> str:
    """A short code for a destination's free-text item error.

    Only plain words are kept: an error text may quote the identifier or address it is
    about, and run counts must not carry personal data.
    """
    words = [
        word for word in reason.lower().replace("_", " ").split()
        if word.isalpha() and word.isascii()
    ]  # fmt: skip
    return ("destination_" + "_".join(words))[:60] if words else "destination_error"
