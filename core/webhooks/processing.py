"""The working side: one kept delivery becomes events and suppression changes, once.

    claim (table row, expiring) -> read the kept body -> provider.events
    -> one event segment per delivery (`webhook-{provider}-{digest}`), deduplicated on the
       provider's event ids across deliveries -> suppression changes (core/events/effects.py,
       the same rules as Currents) -> row done, with counts

A crash anywhere before `done` leaves the claim to expire; the next attempt writes the
same segment again (the event store finds its own claims) and offers the same changes
(the suppression list keeps the latest change per address, so again is the same).
A kept body its provider cannot read (it could when it was answered: a provider changed
its format, or the module did) is not retried: it fails its run at once and stays kept.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from core.errors import ConfigError, TransientError
from core.events.effects import SuppressionBatch
from core.events.store import EventStore
from core.runs import RunKind
from core.services import Services
from core.storage.tables import EntityTable
from core.suppression import SuppressionList
from core.webhooks.deliveries import (
    WEBHOOKS_CONTAINER,
    DeliveryMessage,
    DeliveryRecord,
    delivery_from,
)
from core.webhooks.hook import Malformed, WebhookProvider

log = logging.getLogger(__name__)
CLAIM = timedelta(minutes=5)


@dataclass
class DeliveryReport:
    outcome: str
    """done, skipped (done before, or held by another worker), gone, failed."""
    counts: Counter[str] = field(default_factory=Counter)


def process_delivery(
    services: Services,
    providers: Mapping[str, WebhookProvider],
    message: DeliveryMessage,
    *,
    now: datetime | None = None,
) -> DeliveryReport:
    provider = providers.get(message.provider)
    if provider is None:
        raise ConfigError(f"webhook provider {message.provider!r} is no longer configured")
    table: EntityTable[DeliveryRecord] = services.storage.tables.get(DeliveryRecord)
    moment = now or datetime.now(UTC)
    claimed = _claim(table, message, moment)
    if claimed is None:
        return DeliveryReport("skipped")
    found = services.storage.blobs.read_with_metadata(WEBHOOKS_CONTAINER, message.blob)
    if found is None:  # erased, or past retention, before it was processed
        _finish(table, message, "gone", Counter())
        return DeliveryReport("gone")
    delivery = delivery_from(message.provider, found[0], found[2])
    try:
        parsed = provider.events(delivery)
    except Malformed as exc:
        _finish(table, message, "failed", Counter(), str(exc))
        run = services.runs.start(RunKind.WEBHOOK_DELIVERY, run_id=message.run_id,
                                  source=f"webhook {message.provider}")  # fmt: skip
        services.runs.fail(run.run_id, "malformed_delivery", str(exc),
                           detail={"blob": f"{WEBHOOKS_CONTAINER}/{message.blob}"})  # fmt: skip
        return DeliveryReport("failed")
    try:
        counts = _store(services, message, parsed.events)
    except Exception:
        _release(table, message)
        raise
    counts.update({f"invalid.{k}": v for k, v in parsed.invalid.items()})
    _finish(table, message, "done", counts)
    return DeliveryReport("done", counts)


def _store(
    services: Services, message: DeliveryMessage, events: list[dict[str, object]]
) -> Counter[str]:
    store = EventStore(services.storage)
    source = f"webhook-{message.provider}"
    writer = store.writer(source, f"{source}-{message.digest}")
    suppressions = SuppressionBatch()
    for event in events:
        if writer.add(event):
            suppressions.offer(event)
    placed = writer.place()
    counts: Counter[str] = Counter(events=len(events), stored=placed.stats.stored)
    counts["duplicates"] = placed.stats.duplicates_in_segment + placed.stats.duplicates_in_store
    counts["suppression.changes"] = len(suppressions.latest)
    counts["suppression.rows_changed"] = suppressions.apply(SuppressionList(services.storage))
    return counts


def _claim(
    table: EntityTable[DeliveryRecord], message: DeliveryMessage, now: datetime
) -> DeliveryRecord | None:
    """The row, now ours for CLAIM; None when it is done. TransientError while another
    worker holds it (the message comes back after the host's visibility timeout)."""
    taken: list[DeliveryRecord] = []

    def take(current: DeliveryRecord | None) -> DeliveryRecord | None:
        taken.clear()
        if current is not None and current.status in ("done", "failed", "gone"):
            return None
        if current is not None and current.claimed_until and current.claimed_until > now:
            raise TransientError("another worker is processing this delivery")
        row = current or DeliveryRecord(
            partition_key=message.provider, row_key=message.digest, blob=message.blob
        )
        updated = row.model_copy(
            update={"status": "processing", "attempts": row.attempts + 1,
                    "claimed_until": now + CLAIM}
        )  # fmt: skip
        taken.append(updated)
        return updated

    table.mutate(message.provider, message.digest, take)
    return taken[0] if taken else None


def _release(table: EntityTable[DeliveryRecord], message: DeliveryMessage) -> None:
    def release(current: DeliveryRecord | None) -> DeliveryRecord | None:
        if current is None or current.status != "processing":
            return None
        return current.model_copy(update={"claimed_until": None})

    try:
        table.mutate(message.provider, message.digest, release)
    except Exception:  # the claim expires by itself
        log.exception("could not release a webhook delivery claim")


def _finish(
    table: EntityTable[DeliveryRecord],
    message: DeliveryMessage,
    status: str,
    counts: Counter[str],
    error: str | None = None,
) -> None:
    def finish(current: DeliveryRecord | None) -> DeliveryRecord:
        row = current or DeliveryRecord(
            partition_key=message.provider, row_key=message.digest, blob=message.blob
        )
        return row.model_copy(
            update={"status": status, "claimed_until": None, "processed_at": datetime.now(UTC),
                    "counts": dict(counts), "error": error}
        )  # fmt: skip

    table.mutate(message.provider, message.digest, finish)
    log.info(
        "webhook delivery processed",
        extra={"provider": message.provider, "digest": message.digest, "status": status,
               **{k: v for k, v in counts.items() if "." not in k}},
    )  # fmt: skip
