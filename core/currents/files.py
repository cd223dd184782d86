"""Which Currents files are done, in progress, failing or quarantined, and where to scan.

Table `currentsfiles`: one row per object version (key + ETag). PartitionKey is the
`date=` hour folder (hashed with its event type folder), so one query answers "which
files of this folder are finished". Table `currentscheckpoints`: per event type folder,
the oldest `date=` folder still scanned.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import ClassVar

from pydantic import Field

from core.currents.s3 import CurrentsObject
from core.storage import Storage
from core.storage.tables import EntityTable, TableEntity

_DATE_FORMAT = "%Y-%m-%d-%H"


class FileStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    """Failed fewer than the allowed attempts: picked up again by the next discovery."""
    QUARANTINED = "quarantined"
    """Failed every allowed attempt: left alone until an operator deletes its row."""


FINISHED = frozenset({FileStatus.DONE, FileStatus.QUARANTINED})


def _hash(text: str, size: int = 16) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


class FileReceipt(TableEntity):
    table_name: ClassVar[str] = "currentsfiles"

    bucket: str
    key: str
    etag: str
    size: int
    event_type: str
    date: str
    status: FileStatus
    attempts: int = 0
    last_error: str | None = None
    claimed_until: datetime | None = None
    finished_at: datetime | None = None
    counts: dict[str, int] = Field(default_factory=dict)

    @staticmethod
    def partition_for(obj: CurrentsObject) -> str:
        return f"{obj.date}-{_hash(obj.bucket + '/' + obj.event_folder, 12)}"

    @staticmethod
    def row_for(obj: CurrentsObject) -> str:
        return _hash(f"{obj.key}\n{obj.etag}")

    @classmethod
    def new(cls, obj: CurrentsObject, status: FileStatus) -> FileReceipt:
        return cls(
            partition_key=cls.partition_for(obj), row_key=cls.row_for(obj), bucket=obj.bucket,
            key=obj.key, etag=obj.etag, size=obj.size, event_type=obj.event_type,
            date=obj.date, status=status,
        )  # fmt: skip

    def segment_id(self) -> str:
        """The event store segment of this file version (the same on every retry)."""
        return "currents-" + _hash(f"{self.bucket}/{self.key}\n{self.etag}")


class ScanCheckpoint(TableEntity):
    table_name: ClassVar[str] = "currentscheckpoints"

    folder: str
    scan_from: str
    """`date=` folders from this hour on are listed; older ones are settled."""
    updated_at: datetime


class FileLedger:
    def __init__(self, storage: Storage, *, claim_seconds: int = 900) -> None:
        self.claim = timedelta(seconds=claim_seconds)
        """How long a worker owns a file it started; then discovery may hand it out again."""
        self.receipts: EntityTable[FileReceipt] = storage.tables.get(FileReceipt)
        self.checkpoints: EntityTable[ScanCheckpoint] = storage.tables.get(ScanCheckpoint)

    def receipts_of_folder(self, obj: CurrentsObject) -> dict[str, FileReceipt]:
        rows = self.receipts.query_partition(FileReceipt.partition_for(obj))
        return {row.row_key: row for row in rows}

    def scan_from(self, bucket: str, folder: str, default: datetime) -> str:
        found = self.checkpoints.get(bucket, _hash(folder))
        return found.entity.scan_from if found else default.strftime(_DATE_FORMAT)

    def advance(self, bucket: str, folder: str, scan_from: str, now: datetime) -> None:
        self.checkpoints.upsert(
            ScanCheckpoint(
                partition_key=bucket, row_key=_hash(folder), folder=folder,
                scan_from=scan_from, updated_at=now,
            )
        )  # fmt: skip

    def take(self, obj: CurrentsObject, now: datetime) -> FileReceipt | None:
        """Take a file for processing; None if it is finished or another worker holds it."""
        return self._take(obj, now, FileStatus.PROCESSING, queued_ok=True)

    def receipt(self, obj: CurrentsObject) -> FileReceipt | None:
        found = self.receipts.get(FileReceipt.partition_for(obj), FileReceipt.row_for(obj))
        return found.entity if found else None

    def finished(self, obj: CurrentsObject) -> bool:
        receipt = self.receipt(obj)
        return receipt is not None and receipt.status in FINISHED

    def reopen(self, obj: CurrentsObject) -> None:
        """An operator's retry: a failed or quarantined file is due again, attempts reset."""

        def change(current: FileReceipt | None) -> FileReceipt | None:
            if current is None or current.status == FileStatus.DONE:
                return None
            return current.model_copy(
                update={"status": FileStatus.FAILED, "attempts": 0, "claimed_until": None}
            )

        self.receipts.mutate(FileReceipt.partition_for(obj), FileReceipt.row_for(obj), change)

    def mark_queued(self, obj: CurrentsObject, now: datetime) -> bool:
        """Record that a queue message goes out for the file, unless one is out already."""
        return self._take(obj, now, FileStatus.QUEUED, queued_ok=False) is not None

    def _take(
        self, obj: CurrentsObject, now: datetime, status: FileStatus, *, queued_ok: bool
    ) -> FileReceipt | None:
        taken: FileReceipt | None = None

        def change(current: FileReceipt | None) -> FileReceipt | None:
            nonlocal taken
            taken = None
            # A worker may start a file its own queue message announced; nobody else may.
            announced = queued_ok and current is not None and current.status == FileStatus.QUEUED
            if current is not None and not announced and not due(current, now):
                return None
            receipt = current or FileReceipt.new(obj, status)
            taken = receipt.model_copy(update={"status": status, "claimed_until": now + self.claim})
            return taken

        self.receipts.mutate(FileReceipt.partition_for(obj), FileReceipt.row_for(obj), change)
        return taken

    def finish(self, receipt: FileReceipt, counts: dict[str, int], now: datetime) -> None:
        self.receipts.upsert(
            receipt.model_copy(
                update={
                    "status": FileStatus.DONE, "counts": counts, "finished_at": now,
                    "claimed_until": None, "last_error": None,
                }
            )
        )  # fmt: skip

    def fail(
        self, receipt: FileReceipt, error: str, max_attempts: int, now: datetime
    ) -> FileReceipt:
        attempts = receipt.attempts + 1
        failed = receipt.model_copy(
            update={
                "attempts": attempts,
                "status": FileStatus.QUARANTINED if attempts >= max_attempts else FileStatus.FAILED,
                "last_error": error[:500],
                "claimed_until": None,
                "finished_at": now,
            }
        )
        self.receipts.upsert(failed)
        return failed

    def release(self, receipt: FileReceipt) -> None:
        """Give a claimed file back after a transient error, without counting an attempt."""
        self.receipts.upsert(
            receipt.model_copy(update={"status": FileStatus.FAILED, "claimed_until": None})
        )


def due(receipt: FileReceipt | None, now: datetime) -> bool:
    """Whether discovery should hand this file (version) out."""
    if receipt is None:
        return True
    if receipt.status in FINISHED:
        return False
    if receipt.status in (FileStatus.QUEUED, FileStatus.PROCESSING):
        return receipt.claimed_until is None or receipt.claimed_until <= now
    return True  # FAILED with attempts left


def parse_date_folder(date: str) -> datetime | None:
    try:
        return datetime.strptime(date, _DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def format_date_folder(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_DATE_FORMAT)
