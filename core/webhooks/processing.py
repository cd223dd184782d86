"""The working side: kept deliveries become suppression changes at once, and events in
batches.

Per delivery (a queue message each, any number at once):

    read the kept body -> provider.events -> suppression changes (core/events/effects.py,
    the same rules as Currents) -> a row in the pending index (with the events, when small)

Each step is safe to repeat (suppression changes carry their event's time; the row is
create-only), so a delivery handled twice, or again after a crash, changes nothing more.

Then, in batches, from the batcher's timer (every few seconds; one batcher at a time, under
a blob lease, since the run sweeper batches too):

    pending rows (up to BATCH) -> each row marked with the batch id -> one event segment
    `webhooks-{batch id}` of their events (deduplicated on the providers' event ids)
    -> ledger rows `done` (transactions of 100) -> pending rows deleted (the same)

A batch that crashed is finished under the same id with the same rows (they carry it), so
the event store finds its own claims. Per-delivery segments were the first design: the
event store's placement is one guarded transaction per segment and its dedup shards are
shared by an hour's segments, so thousands of one-event segments from concurrent workers
spent their time in retries. The second had each worker run the batcher after its delivery:
a lease attempt and two partition reads per delivery, four times the storage calls of the
delivery itself (`bench/RESULTS.md`, webhooks). Per delivery it is now a blob read, an
insert and (for a few) a suppression transaction; a batch of hundreds costs a handful.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
from pydantic import Field

from core.errors import ConcurrencyConflict, ConfigError, EntityExists, LeaseUnavailable
from core.events.effects import SuppressionBatch
from core.events.store import EventStore
from core.runs import RunKind
from core.services import Services
from core.storage.tables import EntityTable, TableEntity
from core.suppression import SuppressionList
from core.webhooks.deliveries import (
    WEBHOOKS_CONTAINER,
    DeliveryMessage,
    DeliveryRecord,
    delivery_from,
)
from core.webhooks.hook import Malformed, WebhookProvider

log = logging.getLogger(__name__)
BATCH = 500
BATCHER_LEASE = "_batcher/lease"
"""Held by whoever moves pending deliveries into the event store (and by an erasure)."""
_PARALLEL_READS = 8
_PENDING = "pending"
_MAX_BATCHES_PER_HOLD = 20
_INLINE_EVENTS = 32 << 10  # table string properties hold 64 KiB


class PendingDelivery(TableEntity):
    """Table `webhookpending`: PK `pending`, RK `{provider}:{digest}`; the batch it is in."""

    table_name: ClassVar[str] = "webhookpending"

    provider: str
    digest: str
    blob: str
    batch: str | None = None
    events: str | None = None
    """The delivery's events as JSON Lines when small (else read again from the blob)."""
    counts: dict[str, int] = Field(default_factory=dict)


@dataclass
class DeliveryReport:
    outcome: str
    """pending (its effects applied, its events to a batch), gone (erased or past
    retention before it was handled), failed (unreadable)."""
    counts: Counter[str] = field(default_factory=Counter)


def process_delivery(
    services: Services, providers: Mapping[str, WebhookProvider], message: DeliveryMessage
) -> DeliveryReport:
    """Queue worker: one delivery's effects; its events wait for the batcher."""
    provider = providers.get(message.provider)
    if provider is None:
        raise ConfigError(f"webhook provider {message.provider!r} is no longer configured")
    ledger: EntityTable[DeliveryRecord] = services.storage.tables.get(DeliveryRecord)
    found = services.storage.blobs.read_with_metadata(WEBHOOKS_CONTAINER, message.blob)
    if found is None:  # erased, or past retention, before it was handled
        _record(ledger, message, "gone", Counter())
        return DeliveryReport("gone")
    delivery = delivery_from(message.provider, found[0], found[2])
    try:
        parsed = provider.events(delivery)
    except Malformed as exc:
        _record(ledger, message, "failed", Counter(), str(exc))
        run = services.runs.start(RunKind.WEBHOOK_DELIVERY, run_id=message.run_id,
                                  source=f"webhook {message.provider}")  # fmt: skip
        services.runs.fail(run.run_id, "malformed_delivery", str(exc),
                           detail={"blob": f"{WEBHOOKS_CONTAINER}/{message.blob}",
                                   "delivery": message.model_dump()})  # fmt: skip
        return DeliveryReport("failed")
    suppressions = SuppressionBatch()
    for event in parsed.events:
        suppressions.offer(event)
    counts: Counter[str] = Counter(events=len(parsed.events))
    counts["suppression.changes"] = len(suppressions.latest)
    counts["suppression.rows_changed"] = suppressions.apply(SuppressionList(services.storage))
    counts.update({f"invalid.{k}": v for k, v in parsed.invalid.items()})
    lines = b"".join(orjson.dumps(e) + b"\n" for e in parsed.events).decode()
    pending: EntityTable[PendingDelivery] = services.storage.tables.get(PendingDelivery)
    with contextlib.suppress(EntityExists):  # handled before: the same row
        pending.insert(PendingDelivery(
            partition_key=_PENDING, row_key=f"{message.provider}:{message.digest}",
            provider=message.provider, digest=message.digest, blob=message.blob,
            events=lines if len(lines) <= _INLINE_EVENTS else None, counts=dict(counts),
        ))  # fmt: skip
    return DeliveryReport("pending", counts)


def _record(
    ledger: EntityTable[DeliveryRecord],
    message: DeliveryMessage,
    status: str,
    counts: Counter[str],
    error: str | None = None,
) -> None:
    row = DeliveryRecord(
        partition_key=message.provider, row_key=message.digest, blob=message.blob,
        status=status, processed_at=datetime.now(UTC), counts=dict(counts), error=error,
    )  # fmt: skip
    try:
        ledger.insert(row)
    except EntityExists:
        return  # handled by another worker meanwhile
    log.info(
        "webhook delivery handled",
        extra={"provider": message.provider, "digest": message.digest, "status": status,
               **{k: v for k, v in counts.items() if "." not in k}},
    )  # fmt: skip


def run_batches(services: Services, providers: Mapping[str, WebhookProvider]) -> int:
    """Batches of pending deliveries into the event store while the lease is ours (none
    when another batcher holds it: the timer's next tick looks again); returns the
    deliveries batched."""
    pending: EntityTable[PendingDelivery] = services.storage.tables.get(PendingDelivery)
    batched = 0
    try:
        with services.storage.blobs.lease(WEBHOOKS_CONTAINER, BATCHER_LEASE, seconds=60):
            for _ in range(_MAX_BATCHES_PER_HOLD):
                done = _one_batch(services, providers, pending)
                batched += done
                if done < BATCH:
                    break
    except LeaseUnavailable:
        pass
    return batched


def _one_batch(
    services: Services,
    providers: Mapping[str, WebhookProvider],
    pending: EntityTable[PendingDelivery],
) -> int:
    rows = []
    for row in pending.query_partition(_PENDING):
        rows.append(row)
        if len(rows) >= BATCH:
            break
    if not rows:
        return 0
    unfinished = sorted({r.batch for r in rows if r.batch})
    if unfinished:  # a batch that crashed: the same id, the same rows
        batch_id = unfinished[0]
        rows = [r for r in pending.query_partition(_PENDING) if r.batch == batch_id]
    else:
        batch_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        rows = [r.model_copy(update={"batch": batch_id}) for r in rows]
        pending.write_batch(rows)
    counts = _store(services, providers, batch_id, rows)
    now = datetime.now(UTC)
    ledger: EntityTable[DeliveryRecord] = services.storage.tables.get(DeliveryRecord)
    ledger.write_batch(
        DeliveryRecord(partition_key=r.provider, row_key=r.digest, blob=r.blob, status="done",
                       processed_at=now, counts=r.counts, batch=batch_id)
        for r in rows
    )  # fmt: skip
    for start in range(0, len(rows), 100):
        chunk = rows[start : start + 100]
        try:
            pending.transact([("delete", r, None) for r in chunk])
        except ConcurrencyConflict:  # some went with an earlier attempt
            for r in chunk:
                pending.delete(r.partition_key, r.row_key)
    log.info("webhook batch stored", extra={"batch": batch_id, "deliveries": len(rows), **counts})
    return len(rows)


def _store(
    services: Services,
    providers: Mapping[str, WebhookProvider],
    batch_id: str,
    rows: list[PendingDelivery],
) -> dict[str, Any]:
    blobs = services.storage.blobs

    def events_of(row: PendingDelivery) -> list[dict[str, Any]]:
        if row.events is not None:
            return [orjson.loads(line) for line in row.events.splitlines()]
        provider = providers.get(row.provider)
        found = blobs.read_with_metadata(WEBHOOKS_CONTAINER, row.blob)
        if provider is None or found is None:  # not configured now, or erased meanwhile
            return []
        try:
            return provider.events(delivery_from(row.provider, found[0], found[2])).events
        except Malformed:
            return []

    writer = EventStore(services.storage).writer("webhooks", f"webhooks-{batch_id}")
    with ThreadPoolExecutor(_PARALLEL_READS) as pool:
        for events in pool.map(events_of, rows):
            for event in events:
                writer.add(event)
    stats = writer.place().stats
    return {"stored": stats.stored,
            "duplicates": stats.duplicates_in_segment + stats.duplicates_in_store}  # fmt: skip
