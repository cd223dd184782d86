"""Accepting a segment file: receipts make every (blob name, ETag) count exactly once.

Triggers deliver at least once (polling re-scans, Event Grid redelivery, host retries), so
the first thing done with a file is a create-only receipt keyed by its name and ETag. The
run id is derived from that key, which makes a redelivery find the same run instead of
starting a second one. A receipt for a finished run turns a redelivery into a counted no-op.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

from core.containers import SEGMENTS
from core.errors import EntityExists
from core.runs import RunKind, RunRecord, RunStatus, new_run_id
from core.services import Services
from core.storage import BlobRef
from core.storage.tables import TableEntity, safe_key
from core.verdicts import RunRef, json_body

log = logging.getLogger(__name__)


class SegmentReceipt(TableEntity):
    """Table `receipts`: PartitionKey = sync id, RowKey = hash of blob name and ETag."""

    table_name: ClassVar[str] = "receipts"

    blob_name: str
    etag: str
    size: int
    run_id: str
    first_seen: datetime
    deliveries: int = 1
    completed: bool = False


@dataclass(frozen=True)
class Arrival:
    run: RunRecord
    duplicate: bool


def sync_id_of(blob_name: str) -> str:
    """`{sync_id}/{anything}` within the segments container."""
    sync_id, sep, rest = blob_name.partition("/")
    if not sep or not sync_id or not rest:
        raise ValueError(f"segment blob {blob_name!r} is not under a sync prefix")
    return sync_id


def receipt_key(blob: BlobRef) -> str:
    return hashlib.sha256(f"{blob.path}\n{blob.etag}".encode()).hexdigest()


def accept(services: Services, blob: BlobRef, *, now: datetime | None = None) -> Arrival:
    """Record a delivered segment file; repeated deliveries return the same run."""
    sync_id = sync_id_of(blob.name)
    receipts = services.storage.tables.get(SegmentReceipt)
    seen_at = now or datetime.now(UTC)
    key = receipt_key(blob)
    receipt = SegmentReceipt(
        partition_key=safe_key(sync_id),
        row_key=key,
        blob_name=blob.name,
        etag=blob.etag,
        size=blob.size,
        run_id=new_run_id(seen_at, seed=key),
        first_seen=seen_at,
    )
    try:
        receipts.insert(receipt)
        duplicate = False
    except EntityExists:

        def count_delivery(current: SegmentReceipt | None) -> SegmentReceipt | None:
            assert current is not None  # receipts are never deleted by the app
            return current.model_copy(update={"deliveries": current.deliveries + 1})

        stored = receipts.mutate(receipt.partition_key, key, count_delivery)
        assert stored is not None
        receipt = stored.entity
        duplicate = receipt.completed
    # Creating the run is idempotent, so a crash between the two writes heals on redelivery.
    run = services.runs.start(
        RunKind.SEGMENT_SYNC,
        run_id=receipt.run_id,
        status=RunStatus.RECEIVED,
        sync_id=sync_id,
        source=blob.path,
        detail={"etag": blob.etag, "size": blob.size},
        now=receipt.first_seen,
    )
    if duplicate:
        log.info(
            "segment file redelivered, nothing to do",
            extra={"run_id": run.run_id, "sync_id": sync_id, "deliveries": receipt.deliveries},
        )
    return Arrival(run=run, duplicate=duplicate)


def mark_completed(services: Services, blob: BlobRef) -> None:
    """Close the receipt so later deliveries of this version are no-ops."""
    receipts = services.storage.tables.get(SegmentReceipt)

    def complete(current: SegmentReceipt | None) -> SegmentReceipt | None:
        if current is None or current.completed:
            return None
        return current.model_copy(update={"completed": True})

    receipts.mutate(safe_key(sync_id_of(blob.name)), receipt_key(blob), complete)


def reopen(services: Services, blob: BlobRef) -> None:
    """An operator's retry: the next delivery of this version runs again (same run)."""
    receipts = services.storage.tables.get(SegmentReceipt)

    def reopened(current: SegmentReceipt | None) -> SegmentReceipt | None:
        if current is None or not current.completed:
            return None
        return current.model_copy(update={"completed": False})

    receipts.mutate(safe_key(sync_id_of(blob.name)), receipt_key(blob), reopened)


def run_of_blob(services: Services, blob: BlobRef) -> RunRef:
    """The run of a segment blob version: its receipt's (recorded now if it has none)."""
    run = accept(services, blob).run
    return RunRef(run.run_id, run.kind, run.source or blob.path, run.sync_id, run.started_at)


def run_of_poisoned_blob(services: Services, body: bytes) -> RunRef | None:
    """The run of a blob the host gave up on (`webjobs-blobtrigger-poison`:
    `{"FunctionId", "BlobType", "ContainerName", "BlobName", "ETag"}`)."""
    message = json_body(body)
    if message.get("ContainerName") != SEGMENTS:
        return None
    name, etag = message.get("BlobName"), message.get("ETag")
    if not isinstance(name, str) or not isinstance(etag, str):
        raise ValueError("a blob poison message names its blob and ETag")
    # The storage SDK quotes ETags; the host's message may not.
    return run_of_blob(services, BlobRef(SEGMENTS, name, f'"{etag.strip(chr(34))}"', 0))
