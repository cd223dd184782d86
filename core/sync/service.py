"""A segment file from arrival to run report.

Past 500 lines because the run's phases (accept, split, plan, fan out, finalize) share
the run record and its checkpoints; each phase's own work lives in split.py, engine.py,
state.py and reports.py.

    accept (receipt) -> split into identity buckets -> process buckets -> finalize

Small files are processed in the invocation that received them. Files with more rows
than one worker should take (`processing.rows_per_worker`) fan out: one queue message per
group of buckets on `segment-chunks`, each processed by a queue-triggered instance; the
worker that completes the last bucket finalizes the run (counts summed, rejects file
committed, work files removed). Every step is safe to repeat for the same file version.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, Field

from core.audit import AuditBuffer, AuditWriter, identity_kind
from core.containers import SEGMENTS
from core.destinations.base import Destination
from core.destinations.registry import (
    check_configured,
    destination_for,
    destination_name,
    takes_native_objects,
)
from core.errors import ConfigError, TerminalError
from core.export.quarantine import QuarantineBook
from core.runs import RunRecord, RunStatus
from core.segments import arrival
from core.services import Services
from core.storage import BlobRef, Storage
from core.storage.tables import EntityTable, TableEntity, safe_key
from core.suppression import SuppressionList, SuppressionSnapshot
from core.sync.checkpoints import CheckpointLog
from core.sync.definitions import FileFormat, SyncDefinition, SyncMode, mapping_fingerprint
from core.sync.engine import BatchStats, BucketWork, SegmentChunkRunner
from core.sync.manifest import find_parts, is_manifest
from core.sync.mapping import RowMapper
from core.sync.readers import FileRejected
from core.sync.reports import (
    OutcomeCounts,
    PreviewPart,
    RejectsPart,
    commit_preview,
    commit_rejects,
)
from core.sync.split import (
    HeldWork,
    SplitResult,
    delete_work,
    fetch_work_blob,
    inflate_work,
    line_label,
    split_file,
    upload_held_work,
)
from core.sync.state import StateStore, SyncState
from core.sync.unchanged import UnchangedIndex, settled_exclusions

log = logging.getLogger(__name__)
_Fetched = TypeVar("_Fetched")
SEGMENT_CHUNK_QUEUE = "segment-chunks"
MANIFEST_QUEUE = "segment-manifests"
"""Manifests whose parts have not all landed yet, looked at again later (`ManifestWait`)."""
_WRITERS = 4
_FETCHERS = 2
_FETCH_AHEAD = 4
_FETCH_AHEAD_BYTES = 4 << 20
_RESULTS_PER_TRANSACTION = 100
_REJECTS_KEPT_BYTES = 16_000
"""A bucket's rejects up to this size go in its result (a table property holds 32,000
UTF-16 code units) instead of a block staged for them: a request per bucket saved."""
_MANIFEST_MAX_PAUSE = 300
PREVIEW_FOLDER = "preview"
"""Files under `segments/{sync_id}/preview/` are dry runs: reported, never sent."""


class RunPlan(TableEntity):
    """Table `runplans`: what a fanned-out run consists of (PartitionKey run id)."""

    table_name: ClassVar[str] = "runplans"

    sync_id: str
    blob_container: str
    blob_name: str
    blob_etag: str
    columns: list[str]
    inputs: list[str]
    """The data files of the run: the file itself, or the parts its manifest lists."""
    buckets: list[int]
    work_blobs: dict[str, str]
    work_bytes: list[int] = Field(default_factory=list)
    """Per bucket, the size of its work lines (empty: not known), to bound reading ahead."""
    split_reject_blocks: list[str] = Field(default_factory=list)
    split_counts: dict[str, int] = Field(default_factory=dict)
    settled_in_split: int = 0
    """Rows the split settled (core/sync/unchanged.py), of them `settled_by_line` unparsed."""
    settled_by_line: int = 0
    preview: bool = False
    blocked_by: str | None = None
    """The policy that blocks the sync (core/governance.py): nothing is sent or kept."""

    @property
    def sends(self) -> bool:
        """Whether the run sends and keeps state: not a preview, not blocked."""
        return not self.preview and self.blocked_by is None


class BucketResult(TableEntity):
    """Table `bucketresults`: one row per finished bucket (PartitionKey run id)."""

    table_name: ClassVar[str] = "bucketresults"

    outcomes: dict[str, int]
    reasons: dict[str, int]
    stats: dict[str, int]
    reject_blocks: list[str] = Field(default_factory=list)
    rejects_kept: str = ""
    """A bucket's few rejects (CSV lines), kept here rather than staged as a block of
    their own; the run's end stages them together (`commit_rejects`)."""
    diff: dict[str, int] = Field(default_factory=dict)
    preview_blocks: list[str] = Field(default_factory=list)


class SegmentChunkMessage(BaseModel):
    """Queue message: a reference to work, never the rows themselves."""

    run_id: str
    buckets: list[int]


def _waits_elsewhere(services: Services, blob: BlobRef) -> bool:
    """A data file of a manifest-driven sync, or a manifest of a sync that ignores them."""
    try:
        sync = services.syncs().get(arrival.sync_id_of(blob.name))
    except (ValueError, ConfigError):
        return False  # reported as a failed run by process_segment_file
    return sync is not None and is_manifest(blob.name) != sync.input.wait_for_manifest


def process_segment_file(services: Services, blob: BlobRef) -> RunRecord | None:
    """Handle one delivered segment blob version; safe to call again for the same version.

    Returns the run, or None for a file that is not a run by itself (see manifest.py).
    """
    if _waits_elsewhere(services, blob):
        log.info("segment file is handled through its manifest", extra={"blob": blob.name})
        return None
    accepted = arrival.accept(services, blob)
    if accepted.duplicate:
        return accepted.run
    return _run_file(services, blob, accepted.run)


class ManifestWait(BaseModel):
    """Queue message: a manifest's run, waiting for parts that have not all landed."""

    run_id: str
    manifest: str
    """The manifest's name in the `segments` container."""
    etag: str
    attempt: int = 1


def resume_manifest(services: Services, wait: ManifestWait) -> RunRecord | None:
    """Queue worker: look for a waiting manifest's parts again; run it once they are all
    there, or end it once the sync's `input.parts_deadline_minutes` has passed."""
    run = services.runs.get(wait.run_id)
    if run is None or run.status.ended:
        return run
    listed = BlobRef(SEGMENTS, wait.manifest, wait.etag, 0)
    blob = services.storage.blobs.find(SEGMENTS, wait.manifest)
    if blob is None or blob.etag != wait.etag:
        message = "the manifest was replaced or removed while its parts were awaited"
        return _close(services, listed, run.run_id, RunStatus.FAILED, error=message,
                      error_code="manifest_changed")  # fmt: skip
    return _run_file(services, blob, run, attempt=wait.attempt + 1)


def _wait_for_parts(
    services: Services, sync: SyncDefinition, blob: BlobRef, run: RunRecord, missing: list[str],
    attempt: int,
) -> RunRecord:  # fmt: skip
    """Park a manifest's run until its parts land: looked at again after a growing pause
    (2 s, 4 s, ... at most 5 minutes), ended `parts_missing` after the deadline."""
    now = datetime.now(UTC)
    deadline = run.started_at + timedelta(minutes=sync.input.parts_deadline_minutes)
    shown = ", ".join(missing[:10]) + (
        f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    )
    if now >= deadline:
        message = (
            f"{len(missing)} of the parts the manifest lists did not land (with the size it "
            f"gives) within {sync.input.parts_deadline_minutes:g} minutes: {shown}"
        )
        return _close(services, blob, run.run_id, RunStatus.FAILED, error=message,
                      error_code="parts_missing")  # fmt: skip
    delay = min(
        2**attempt, _MANIFEST_MAX_PAUSE, max(1, math.ceil((deadline - now).total_seconds()))
    )
    wait = ManifestWait(run_id=run.run_id, manifest=blob.name, etag=blob.etag, attempt=attempt)
    services.storage.queues.send(MANIFEST_QUEUE, wait, delay_seconds=delay)

    def waiting(record: RunRecord) -> None:
        record.status = RunStatus.RUNNING
        record.idle_until = now + timedelta(seconds=delay)
        record.detail = {**record.detail, "waiting_for_parts": missing[:100],
                         "parts_deadline": deadline.isoformat()}  # fmt: skip

    log.info("manifest waits for its parts", extra={"run_id": run.run_id, "missing": len(missing)})
    return services.runs.update(run.run_id, waiting)


def _run_file(services: Services, blob: BlobRef, run: RunRecord, *, attempt: int = 1) -> RunRecord:
    """The run of a segment file or manifest, from its sync's checks to its report."""
    sync_id = run.sync_id or ""
    try:
        sync = services.syncs().get(sync_id)
        if sync is None:
            raise ConfigError(f"no sync is declared with id {sync_id!r}")
        check_configured(sync, services.settings)
    except ConfigError as exc:
        return _close(services, blob, run.run_id, RunStatus.FAILED, error=str(exc),
                      error_code="config_error")  # fmt: skip
    services.runs.update(run.run_id, lambda r: setattr(r, "status", RunStatus.RUNNING))
    inputs = [blob]
    if is_manifest(blob.name):
        try:
            parts = find_parts(services.storage, blob)
        except FileRejected as exc:
            return _close(services, blob, run.run_id, RunStatus.FAILED,
                          error=f"{exc.code}: {exc}", error_code=exc.code)  # fmt: skip
        if parts.missing:
            return _wait_for_parts(services, sync, blob, run, parts.missing, attempt)
        inputs = parts.found
        if run.detail.get("waiting_for_parts"):
            services.runs.update(run.run_id, lambda r: r.detail.pop("waiting_for_parts", None))
    unchanged: UnchangedIndex | None = None
    audit: AuditWriter | None = None
    try:
        unchanged = unchanged_index(services, sync, destination_name(sync), run.run_id)
        if unchanged is not None and not _is_preview(sync, blob):
            audit = AuditWriter(
                services.storage, audit_source(sync), run.run_id,
                identity_kind(sync.identity.destination_key),
            )  # fmt: skip
            writer = audit

            def excluded(columns: list[str], found: list[tuple[str, bytes]]) -> None:
                writer.add(settled_exclusions(sync, columns, found))

            unchanged.on_excluded = excluded
        split = split_file(
            services.storage,
            sync,
            inputs,
            run_id=run.run_id,
            buckets=sync.processing.state_buckets,
            in_memory_max_rows=sync.processing.in_memory_max_rows,
            held_max_bytes=sync.processing.in_memory_max_mb << 20,
            native=services.settings.sync_native_buckets,
            unchanged=unchanged,
            limits=services.settings.input_limits,
        )
    except (FileRejected, ConfigError) as exc:
        error = f"{exc.code}: {exc}" if isinstance(exc, FileRejected) else str(exc)
        code = exc.code if isinstance(exc, FileRejected) else "config_error"
        if unchanged is not None:
            unchanged.stop()
        return _close(services, blob, run.run_id, RunStatus.FAILED, error=error, error_code=code)
    finally:
        if audit is not None:
            audit.close()
    planned = planned_buckets(sync, split)
    if unchanged is not None:  # no state is read for a bucket whose rows were all settled
        unchanged.reader.narrow(b for b in planned if _needs_state(sync, split.work_rows(b)))
    groups = _bucket_groups(planned, split, sync.processing.rows_per_worker)
    held = split.in_memory
    if held is not None and held.compressed and len(groups) > 1:  # workers read blobs
        split.work_blobs = upload_held_work(services.storage, run.run_id, held)
        split.in_memory = None
    plan = plan_run(services, sync, blob, run.run_id, split, [ref.name for ref in inputs])
    if split.in_memory is not None or len(groups) <= 1:
        try:
            finished = process_buckets(
                services, sync, plan, run.run_id, plan.buckets, split.in_memory,
                unchanged=unchanged, record_results=False,
            )  # fmt: skip
        except (TerminalError, ConfigError) as exc:
            code = "terminal_error" if isinstance(exc, TerminalError) else "config_error"
            return _close(services, blob, run.run_id, RunStatus.FAILED, error=str(exc),
                          error_code=code)  # fmt: skip
        return finalize(services, sync, plan, run.run_id, blob, finished)
    if unchanged is not None:
        unchanged.stop()  # the workers read their own
    for group in groups:
        services.storage.queues.send(
            SEGMENT_CHUNK_QUEUE, SegmentChunkMessage(run_id=run.run_id, buckets=group)
        )
    log.info("segment file fanned out", extra={"run_id": run.run_id, "chunks": len(groups)})
    return services.runs.update(
        run.run_id, lambda r: r.detail.update({"chunks": len(groups), "rows": split.rows})
    )


def unchanged_index(
    services: Services, sync: SyncDefinition, destination: str, run_id: str
) -> UnchangedIndex | None:
    """What the split needs to settle unchanged rows (core/sync/unchanged.py), or None
    when the sync runs on the reference throughout."""
    if not services.settings.sync_native_buckets or not takes_native_objects(sync):
        return None
    states = StateStore(
        services.storage, sync.id, destination, mapping_fingerprint(sync),
        sync.processing.state_buckets,
    )  # fmt: skip
    return UnchangedIndex(states, sync, SuppressionList(services.storage).snapshot(), run_id)


def _suppressions(
    services: Services, destination: Destination, unchanged: UnchangedIndex | None
) -> SuppressionSnapshot:
    """The run's suppression list, with the log export's quarantine where the destination
    honours it (Campaign's own rules: core/export/quarantine.py)."""
    snapshot = unchanged.suppressions if unchanged else SuppressionList(services.storage).snapshot()
    if not destination.capabilities.honours_quarantine:
        return snapshot
    book = QuarantineBook(services.storage, services.settings.quarantine_soft_threshold)
    return snapshot.merged(book.suppressed())


def process_chunk(services: Services, message: SegmentChunkMessage) -> None:
    """Queue worker: process a group of buckets of a fanned-out run."""
    plans: EntityTable[RunPlan] = services.storage.tables.get(RunPlan)
    stored = plans.get(safe_key(message.run_id), "plan")
    if stored is None:
        raise LookupError(f"run {message.run_id} has no plan")  # retried, then poisoned
    plan = stored.entity
    sync = services.syncs().get(plan.sync_id)
    blob = BlobRef(plan.blob_container, plan.blob_name, plan.blob_etag, 0)
    run = services.runs.get(message.run_id)
    if run is not None and run.status.ended:
        return  # another chunk stopped the run (terminal error) or it is already done
    if sync is None:
        _close(services, blob, message.run_id, RunStatus.FAILED, error="sync was removed",
               error_code="config_error")  # fmt: skip
        return
    try:
        process_buckets(services, sync, plan, message.run_id, message.buckets, None)
    except (TerminalError, ConfigError) as exc:
        code = "terminal_error" if isinstance(exc, TerminalError) else "config_error"
        _close(services, blob, message.run_id, RunStatus.FAILED, error=str(exc), error_code=code)
        return
    results: EntityTable[BucketResult] = services.storage.tables.get(BucketResult)
    finished = sum(1 for _ in results.query_partition(safe_key(message.run_id)))
    if finished >= len(plan.buckets):
        finalize(services, sync, plan, message.run_id, blob)


def plan_run(
    services: Services,
    sync: SyncDefinition,
    blob: BlobRef,
    run_id: str,
    split: SplitResult,
    inputs: list[str],
) -> RunPlan:
    split_rejects = RejectsPart(
        services.storage.blobs, sync.id, run_id, split.columns, part=0,
        label=lambda line: line_label(line, inputs), delimiter=sync.input.field_delimiter,
    )  # fmt: skip
    for line, message, text in split.malformed:
        split_rejects.add(line, "malformed_row", message, text)
    preview = _is_preview(sync, blob)
    governed = services.syncs().governed(sync.id)
    blocked = governed.verdict.blocked if governed is not None else ()
    plan = RunPlan(
        partition_key=safe_key(run_id),
        row_key="plan",
        sync_id=sync.id,
        blob_container=blob.container,
        blob_name=blob.name,
        blob_etag=blob.etag,
        columns=split.columns,
        inputs=inputs,
        buckets=planned_buckets(sync, split),
        work_blobs={str(b): name for b, name in split.work_blobs.items()},
        work_bytes=split.work_bytes,
        split_reject_blocks=split_rejects.close(),
        split_counts={"rejected.malformed_row": len(split.malformed)} if split.malformed else {},
        settled_in_split=sum(split.settled),
        settled_by_line=split.settled_by_line,
        preview=preview,
        blocked_by=blocked[0].policy if blocked else None,
    )
    services.storage.tables.get(RunPlan).upsert(plan)
    return plan


def _is_preview(sync: SyncDefinition, blob: BlobRef) -> bool:
    return sync.dry_run or PREVIEW_FOLDER in blob.name.split("/")[1:-1]


def audit_source(sync: SyncDefinition) -> str:
    return f"sync:{sync.id}"


def planned_buckets(sync: SyncDefinition, split: SplitResult) -> list[int]:
    """The buckets a run processes: those with rows, or in mirror mode every one (absent
    profiles live in empty buckets too)."""
    return [b for b, count in enumerate(split.counts) if count or sync.mode == SyncMode.MIRROR]


def _needs_state(sync: SyncDefinition, work_rows: int) -> bool:
    """Mirror mode takes memberships back from profiles absent from the file, so it needs
    every bucket's state; otherwise only buckets with rows the split did not settle."""
    return work_rows > 0 or sync.mode == SyncMode.MIRROR


def _bucket_groups(buckets: list[int], split: SplitResult, rows_per_worker: int) -> list[list[int]]:
    """Consecutive buckets per worker: their state lies together in the packs the last
    run wrote, so a worker reads it in few ranges."""
    if not buckets:  # a header-only file, or one whose every row was malformed
        return []
    workers = max(1, min(len(buckets), math.ceil(split.rows / rows_per_worker)))
    size = math.ceil(len(buckets) / workers)
    return [buckets[at : at + size] for at in range(0, len(buckets), size)]


def process_buckets(
    services: Services,
    sync: SyncDefinition,
    plan: RunPlan,
    run_id: str,
    buckets: list[int],
    in_memory: HeldWork | None,
    *,
    destination: Destination | None = None,
    checkpoints: CheckpointLog | None = None,
    unchanged: UnchangedIndex | None = None,
    record_results: bool = True,
) -> list[BucketResult]:
    """Run a group of buckets (one worker's share) to completion; skips finished ones.
    `unchanged`: what this process read for the split (its state listing, suppression
    list and the snapshots fetched meanwhile, stopped when done), rather than reading it
    again. Returns the buckets' results; with `record_results` (a fanned-out run's
    workers: the last one sums them) they are written to `bucketresults` too. A run
    processed in one invocation hands them to `finalize` instead: if it is retried after a
    crash, a bucket whose state it committed finds its result in the state (as a worker's
    does), and one that changed no state runs again, to the same end."""
    storage = services.storage
    owned = destination is None  # built here: closed here (its budget share given back)
    destination = destination or destination_for(
        sync, services.settings, services.storage, run_id=run_id
    )
    states = StateStore(
        storage, sync.id, destination.name, mapping_fingerprint(sync), sync.processing.state_buckets
    )
    results: EntityTable[BucketResult] = storage.tables.get(BucketResult)
    run_key = safe_key(run_id)
    kind = identity_kind(sync.identity.destination_key)
    # Exclusions are written before anything marks their bucket finished: its state's
    # commit (the pack's hook) or its result (the results' hook).
    audit = AuditBuffer(storage, audit_source(sync), run_id, kind)
    indexes = states.index_writer(run_id)
    recorded = _Results(results, record_results, before_write=audit.flush)
    pack = states.pack_writer(run_id, before_commit=audit.flush)
    writer = _BucketWriter()

    def bucket_done(work: BucketWork) -> None:
        reject_blocks, stage_rejects, rejects_kept = work.rejects.finish_small(_REJECTS_KEPT_BYTES)
        preview_blocks, stage_preview = work.preview.finish() if work.preview else ([], None)
        result = BucketResult(
            partition_key=run_key,
            row_key=f"{work.number:04d}",
            outcomes=dict(work.counts.outcomes),
            reasons=dict(work.counts.reasons),
            stats=vars(work.stats),
            reject_blocks=reject_blocks,
            rejects_kept=rejects_kept,
            diff=dict(work.diff),
            preview_blocks=preview_blocks,
        )
        snapshot = None
        if plan.sends and work.state.dirty:  # a dry or blocked run changes no state
            snapshot = states.snapshot(
                work.number, work.state, run_id=run_id, result=result.model_dump()
            )
        etag = work.state.etag
        loaded = etag is not None and snapshot is None and plan.sends
        loaded_index = work.state.index() if loaded else None
        # `committed` waits for the pack's next commit, with the buckets before it: it
        # holds the bucket's number and index, not its state or text.
        number = work.number
        index = snapshot.index if snapshot is not None else (b"", b"")

        def committed(state_etag: str) -> None:
            indexes.add(number, state_etag, index)
            recorded.add(result)

        exclusions = work.exclusions if not plan.preview else []

        def write() -> None:
            # In this order: the result marks the bucket finished, so it goes last, once
            # the bucket's state is committed.
            if exclusions:
                audit.add(exclusions)
            stage_rejects()
            if stage_preview is not None:
                stage_preview()
            if snapshot is not None:
                pack.add(snapshot, committed)
                return
            if loaded_index is not None and etag:
                indexes.add(number, etag, loaded_index)
            recorded.add(result)

        writer.submit(write)

    runner: SegmentChunkRunner | None = None
    try:
        runner = SegmentChunkRunner(
            storage, sync, RowMapper(sync, plan.columns), destination,
            _suppressions(services, destination, unchanged),
            run_id=run_id, worker=f"w{buckets[0] if buckets else 0:04d}",
            on_bucket_done=bucket_done, dry_run=plan.preview, blocked_by=plan.blocked_by,
            checkpoints=checkpoints, native=services.settings.sync_native_buckets,
        )  # fmt: skip
        with writer:
            _run_buckets(
                storage, sync, plan, run_id, buckets, in_memory, states, results, recorded,
                runner, unchanged,
            )  # fmt: skip
    finally:
        if runner is not None:
            runner.close()  # after an error: no send goes on behind the failed run
        if owned:
            destination.close()
        if unchanged is not None:
            unchanged.stop()
        pack.close()  # the buckets finished before an error count too
    audit.flush()  # before the results go to whoever finalizes the run
    recorded.flush()
    if plan.sends:
        indexes.close()  # after every write is done: it names the snapshots written
        states.collect_garbage()
    return recorded.results


class _Results:
    """Bucket results, kept, and (`write`) written a transaction of up to 100 at a time
    rather than one by one (a request each). A bucket's result goes after its state: a
    crash before it leaves the bucket to its retry, which finds the result in the snapshot
    it committed."""

    def __init__(
        self, table: EntityTable[BucketResult], write: bool, before_write: Callable[[], None]
    ) -> None:
        self._table = table
        self._write = write
        self._before_write = before_write
        self.results: list[BucketResult] = []
        self._pending: list[BucketResult] = []
        self._lock = threading.Lock()

    def add(self, result: BucketResult) -> None:
        with self._lock:
            self.results.append(result)
            if not self._write:
                return
            self._pending.append(result)
            full = len(self._pending) >= _RESULTS_PER_TRANSACTION
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        if pending:  # upserts: a concurrent redelivery may have finished a bucket too
            self._before_write()
            self._table.write_batch(pending)


class _BucketWriter:
    """Writes finished buckets (rejects, state, result) on threads while the next buckets
    run, up to `_WRITERS` at a time: each write is a few requests whose latency, not the
    bytes, is the cost. It is handed bytes, never a bucket's state objects, so memory
    holds at most that many buckets' texts; an error surfaces at the next bucket or at the
    end. A crash before a write is done leaves that bucket unfinished, and its retry
    resumes from checkpoints."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(_WRITERS, thread_name_prefix="bucket-writer")
        self._pending: deque[Future[None]] = deque()

    def submit(self, write: Callable[[], None]) -> None:
        while len(self._pending) >= _WRITERS:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(write))

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> _BucketWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def _run_buckets(
    storage: Storage, sync: SyncDefinition, plan: RunPlan, run_id: str, buckets: list[int],
    in_memory: HeldWork | None, states: StateStore, results: EntityTable[BucketResult],
    recorded: _Results, runner: SegmentChunkRunner, unchanged: UnchangedIndex | None,
) -> None:  # fmt: skip
    run_key = safe_key(run_id)
    finished = {row.row_key for row in results.query_partition(run_key)}  # one request
    todo = [bucket for bucket in buckets if f"{bucket:04d}" not in finished]

    def fetch(bucket: int) -> tuple[SyncState, bytes]:
        """A bucket's state, decoded, and its work lines, inflated; runs on `_FETCHERS`
        threads up to `_FETCH_AHEAD` buckets ahead (and `_FETCH_AHEAD_BYTES` of state text
        and work lines), so their I/O, decompressing and decoding overlap with the buckets
        before them. With few changes a bucket's own work is short, and one bucket ahead
        left the main thread waiting for the GIL-bound parts of its fetch. A bucket whose
        rows the split all settled needs no state (unless in mirror mode)."""
        name = plan.work_blobs.get(str(bucket)) if in_memory is None else None
        if in_memory is not None:
            lines = in_memory.take(bucket)
        else:
            lines = inflate_work(fetch_work_blob(storage, name)) if name else b""
        stored = None
        if sync.mode == SyncMode.MIRROR or lines.startswith(b"["):  # rows, not settled
            stored = states.inflate(reader.take(bucket))
        else:
            reader.skip(bucket)
        return states.decode_text(stored, native=runner.native is not None), lines

    def work_bytes(bucket: int) -> int:
        return plan.work_bytes[bucket] if bucket < len(plan.work_bytes) else 0

    reader = unchanged.reader if unchanged else states.reader(states.stored_buckets(), todo)
    with ThreadPoolExecutor(_FETCHERS, thread_name_prefix="fetch-bucket") as fetcher:
        sizes = [reader.text_size(bucket) + work_bytes(bucket) for bucket in todo]
        fetched = fetched_ahead(fetcher, fetch, todo, sizes, _FETCH_AHEAD, _FETCH_AHEAD_BYTES)
        for bucket, (state, lines) in zip(todo, fetched, strict=True):
            if state.last_run == run_id:  # committed before a crash, not yet recorded
                recorded.add(BucketResult.model_validate(state.last_result))
                continue
            rejects = RejectsPart(
                storage.blobs, sync.id, run_id, plan.columns, part=bucket + 1,
                label=lambda line: line_label(line, plan.inputs),
                delimiter=sync.input.field_delimiter,
            )  # fmt: skip
            preview = (
                PreviewPart(storage.blobs, sync.id, run_id, part=bucket) if plan.preview else None
            )
            runner.run_bucket(BucketWork(bucket, state, rejects, preview=preview), lines)
    runner.finish()


def fetched_ahead(
    pool: Executor, fetch: Callable[[int], _Fetched], keys: list[int], sizes: list[int],
    most: int, most_bytes: int,
) -> Iterator[_Fetched]:  # fmt: skip
    """`fetch(key)` of each key in order, run on `pool` up to `most` keys ahead and
    `most_bytes` of their `sizes` (one at least): memory stays flat as buckets grow (four
    buckets of a 5M-row first run's work read ahead took 23 MB more than one)."""
    upcoming: deque[tuple[int, Future[_Fetched]]] = deque()
    ahead = 0  # keys submitted
    for _ in keys:
        while ahead < len(keys) and (
            not upcoming
            or (len(upcoming) < most and sum(size for size, _ in upcoming) < most_bytes)
        ):
            upcoming.append((sizes[ahead], pool.submit(fetch, keys[ahead])))
            ahead += 1
        yield upcoming.popleft()[1].result()


def finalize(
    services: Services, sync: SyncDefinition, plan: RunPlan, run_id: str, blob: BlobRef,
    finished: list[BucketResult] | None = None,
) -> RunRecord:  # fmt: skip
    """Sum the buckets' results (`finished`: those process_buckets returned, else those
    the run's workers recorded) into the run's report, and commit its rejects file."""
    counts = OutcomeCounts()
    stats = BatchStats()
    diff: Counter[str] = Counter()
    preview_blocks: list[str] = []
    reject_parts: list[list[str] | str] = [list(plan.split_reject_blocks)]
    counts.reasons.update(plan.split_counts)
    if plan.split_counts:
        counts.outcomes["rejected"] += sum(plan.split_counts.values())
    if finished is None:
        finished = list(services.storage.tables.get(BucketResult).query_partition(safe_key(run_id)))
    for result in sorted(finished, key=lambda r: r.row_key):
        counts.outcomes.update(result.outcomes)
        counts.reasons.update(result.reasons)
        stats.add(BatchStats(**result.stats))
        reject_parts.append(result.rejects_kept or result.reject_blocks)
        diff.update(result.diff)
        preview_blocks += result.preview_blocks
    rejects = commit_rejects(services.storage.blobs, sync.id, run_id, reject_parts)
    delete_work(services.storage, run_id)
    started = services.runs.get(run_id)
    seconds = (datetime.now(UTC) - started.started_at).total_seconds() if started else 0.0
    governed = services.syncs().governed(sync.id)
    kept_back = {v.sent.source for v in governed.verdict.dropped} if governed else set()
    detail: dict[str, Any] = {
        "rejects": rejects,
        "batches_sent": stats.sent,
        "batches_resumed": stats.resumed,
        "requests": stats.requests,
        "rate_limited_waits": stats.rate_limited_waits,
        "retries": stats.retries,
        "buckets_in_c": stats.native,
        "rows_settled_in_split": plan.settled_in_split,
        "rows_settled_by_line": plan.settled_by_line,
        "rows_per_second": round(counts.rows / seconds) if seconds > 0 else None,
        **columns_report(sync, plan.columns, kept_back),
    }
    if plan.preview:
        detail["preview"] = {
            "diff": dict(sorted(diff.items())),
            "objects": commit_preview(services.storage.blobs, sync.id, run_id, preview_blocks),
        }
    if governed is not None and governed.verdict.report():
        detail["governance"] = governed.verdict.report()
    log.info("segment sync finished", extra={"run_id": run_id, **counts.outcomes})
    if plan.blocked_by is not None:
        blocked = governed.verdict.blocked if governed is not None else ()
        reasons = "; ".join(v.sentence() for v in blocked) or f"policy {plan.blocked_by!r}"
        return _close(
            services, blob, run_id, RunStatus.FAILED, counts=counts.as_dict(), detail=detail,
            error=f"blocked by policy, nothing was sent: {reasons}",
            error_code="blocked_by_policy",
        )  # fmt: skip
    return _close(
        services, blob, run_id, RunStatus.SUCCEEDED, counts=counts.as_dict(), detail=detail
    )


_COLUMNS_REPORTED = 100


def columns_report(
    sync: SyncDefinition, columns: list[str], kept_back: set[str] | None = None
) -> dict[str, list[str]]:
    """What the file held that the sync does not read (less the columns a policy keeps
    back: they are reported with it), and the audience columns the sync declares that the
    file lacks (an export may carry some of its audiences only). A JSON Lines file has no
    header: its keys are not listed."""
    if sync.input.format == FileFormat.JSONL:
        return {}
    read = set(RowMapper.wanted_columns(sync)) | (kept_back or set())
    present = set(columns)
    unmapped = [c for c in columns if c not in read]
    missing = [s.column for s in sync.audiences.segments if s.column not in present]
    report = {"unmapped_columns": unmapped[:_COLUMNS_REPORTED]}
    if missing:
        report["missing_optional_columns"] = missing[:_COLUMNS_REPORTED]
    return report


def _close(
    services: Services,
    blob: BlobRef,
    run_id: str,
    status: RunStatus,
    *,
    counts: dict[str, int] | None = None,
    detail: dict[str, object] | None = None,
    error: str | None = None,
    error_code: str | None = None,
) -> RunRecord:
    def close(record: RunRecord) -> None:
        if record.status.ended:
            return  # a concurrent finisher closed it first
        record.status = status
        record.finished_at = datetime.now(UTC)
        record.counts = counts or record.counts
        record.detail = {**record.detail, **(detail or {})}
        record.error = error
        record.error_code = error_code
        record.idle_until = None

    record = services.runs.update(run_id, close)
    arrival.mark_completed(services, blob)
    return record
