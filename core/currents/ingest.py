"""One Currents file version, from S3 to stored events and suppression updates.

    claim (receipt) -> stream from S3 (pinned to the listed ETag) -> fastavro with the
    file's own writer schema -> map -> dedup -> segment placed in the event store
    -> suppression changes -> receipt done

Nothing becomes visible before the segment is placed, so a crash or a corrupt block
anywhere in the file leaves no partial effect; the retry writes the same segment again.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fastavro
from botocore.exceptions import BotoCoreError, ClientError

from core.currents.files import FileLedger, FileReceipt
from core.currents.mapping import (
    SOURCE,
    InvalidRecord,
    event_type_from_schema,
    kind_of,
    to_event,
)
from core.currents.s3 import CurrentsObject, classify, error_code
from core.errors import ConfigError, StorageError, TransientError
from core.events.effects import SuppressionBatch
from core.events.store import EventStore
from core.storage import Storage
from core.suppression import SuppressionList

log = logging.getLogger(__name__)


class UnreadableFile(Exception):
    """The object cannot be read as Currents Avro: corrupt, truncated, not Avro, gone."""


@dataclass
class FileReport:
    key: str
    event_type: str
    outcome: str = "ingested"
    """ingested, skipped (finished or held by another worker), failed, quarantined."""
    counts: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    hour: str | None = None
    generic_type: bool = False


@dataclass
class IngestContext:
    storage: Storage
    s3: Any
    max_attempts: int
    store: EventStore
    ledger: FileLedger

    @classmethod
    def create(
        cls, storage: Storage, s3: Any, *, max_attempts: int, claim_seconds: int
    ) -> IngestContext:
        ledger = FileLedger(storage, claim_seconds=claim_seconds)
        return cls(storage, s3, max_attempts, EventStore(storage), ledger)


def ingest_file(context: IngestContext, obj: CurrentsObject) -> FileReport:
    """Ingest one object version once; safe to call again, concurrently or after a crash."""
    report = FileReport(obj.key, obj.event_type)
    now = datetime.now(UTC)
    receipt = context.ledger.take(obj, now)
    if receipt is None:
        report.outcome = "skipped"
        return report
    try:
        _ingest(context, obj, receipt, report)
    except UnreadableFile as exc:
        failed = context.ledger.fail(receipt, str(exc), context.max_attempts, datetime.now(UTC))
        report.outcome = failed.status.value
        report.error = str(exc)
        log.warning(
            "currents file unreadable",
            extra={"key": obj.key, "attempt": failed.attempts, "status": failed.status.value},
        )
        return report
    except (TransientError, StorageError, ConfigError):
        context.ledger.release(receipt)
        raise
    context.ledger.finish(receipt, dict(report.counts), datetime.now(UTC))
    return report


MAX_BLOCK_BYTES = 64 << 20
"""An Avro block (its bytes as stored, before any codec) larger than this is corruption,
not data: Braze writes blocks of a few MB at most. The file is quarantined rather than
read, so a bad length field cannot make a worker allocate gigabytes."""


class _BoundedReads:
    """The object's stream, refusing a single read larger than `MAX_BLOCK_BYTES` (fastavro
    reads a block, or a string, in one call of its declared length)."""

    def __init__(self, body: Any, most: int = MAX_BLOCK_BYTES) -> None:
        self._body = body
        self._most = most

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._most:
            raise UnreadableFile(
                f"a block or value declares {size} bytes, more than {self._most}: corrupt Avro"
            )
        data: bytes = self._body.read(size)
        return data

    def close(self) -> None:
        self._body.close()


def _open(context: IngestContext, obj: CurrentsObject) -> Any:
    try:
        response = context.s3.get_object(Bucket=obj.bucket, Key=obj.key, IfMatch=obj.etag)
    except ClientError as exc:
        code = error_code(exc)
        if code in ("NoSuchKey", "AccessDenied", "PreconditionFailed", "InvalidObjectState"):
            raise UnreadableFile(f"cannot read the object: {code}") from None
        raise classify(exc, f"reading s3://{obj.bucket}/{obj.key}") from exc
    except BotoCoreError as exc:
        raise classify(exc, f"reading s3://{obj.bucket}/{obj.key}") from exc
    return _BoundedReads(response["Body"])


def _ingest(
    context: IngestContext, obj: CurrentsObject, receipt: FileReceipt, report: FileReport
) -> None:
    body = _open(context, obj)
    counts = report.counts
    writer = context.store.writer(SOURCE, receipt.segment_id())
    suppressions = SuppressionBatch()
    try:
        try:
            reader = fastavro.reader(body)
        except UnreadableFile:
            raise
        except Exception as exc:
            raise UnreadableFile(f"not an Avro file: {type(exc).__name__}: {exc}"[:300]) from None
        schema = reader.writer_schema if isinstance(reader.writer_schema, dict) else {}
        event_type = obj.event_type or event_type_from_schema(schema) or ""
        kind = kind_of(event_type)
        report.generic_type = kind.generic
        add = writer.add
        offer = suppressions.offer
        try:
            for record in reader:
                counts["records"] += 1
                try:
                    if not isinstance(record, dict):
                        raise InvalidRecord("record is not an Avro record")
                    event = to_event(record, event_type, kind)
                except InvalidRecord as exc:
                    counts[f"invalid.{exc}".replace(" ", "_")] += 1
                    continue
                if add(event):
                    offer(event)
        except (TransientError, StorageError):
            raise
        except (BotoCoreError, ClientError) as exc:
            raise classify(exc, f"reading s3://{obj.bucket}/{obj.key}") from exc
        except UnreadableFile:
            raise
        except Exception as exc:
            raise UnreadableFile(
                f"corrupt Avro after {counts['records']} records: {type(exc).__name__}: {exc}"[:300]
            ) from None
    finally:
        body.close()
    placed = writer.place()
    stats = placed.stats
    report.hour = placed.hour
    counts["stored"] = stats.stored
    counts["duplicates.in_file"] = stats.duplicates_in_segment
    counts["duplicates.in_store"] = stats.duplicates_in_store
    if kind.generic:
        counts["generic"] = stats.stored
    counts["suppression.changes"] = len(suppressions.latest)
    counts["suppression.rows_changed"] = suppressions.apply(SuppressionList(context.storage))
