"""Where webhook deliveries are kept between the answer and the work, and their ledger.

    blob  webhooks/{provider}/{digest}    the body's exact bytes; metadata:
          received time, the URL, the headers the provider needs again, the body's SHA-256
          and the delivery id (base64url)
    table webhookdeliveries  PK provider, RK digest: done / gone / failed, with counts and
          the batch (written by the worker only: the answer costs one blob write and one
          queue message); table webhookpending holds the deliveries whose effects are
          applied and whose events wait for a batch (core/webhooks/processing.py)
    queue webhook-deliveries  {provider, digest, blob, run_id}

Processed deliveries are deleted by the run sweeper after SWITCHBOARD_WEBHOOK_RETENTION_DAYS.

`digest` is the SHA-256 of the provider and its delivery id, so the blob name is the
idempotency key: a second delivery with the same id finds the first one's blob.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from pydantic import BaseModel, Field

from core.storage import Storage
from core.storage.tables import TableEntity
from core.webhooks.hook import StoredDelivery

log = logging.getLogger(__name__)
WEBHOOKS_CONTAINER = "webhooks"
DELIVERY_QUEUE = "webhook-deliveries"


class DeliveryMessage(BaseModel):
    provider: str
    digest: str
    blob: str
    run_id: str
    """The run a poisoned delivery is recorded as (created only then)."""


class DeliveryRecord(TableEntity):
    """Table `webhookdeliveries`: one delivery's processing (PK provider, RK digest)."""

    table_name: ClassVar[str] = "webhookdeliveries"

    status: str = "done"
    """done (in the event store), gone (erased before it was handled), failed."""
    blob: str = ""
    processed_at: datetime | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    """The delivery's events, suppression changes and invalid items."""
    batch: str | None = None
    """The event segment its events went into (`webhooks-{batch}`)."""
    error: str | None = None


def blob_name(provider: str, digest: str) -> str:
    return f"{provider}/{digest}"


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def metadata_for(
    delivery_id: str, received_at: datetime, url: str, headers: dict[str, str], body: bytes
) -> dict[str, str]:
    """Blob metadata (ASCII only): what the worker needs besides the body."""
    return {
        "received_at": received_at.astimezone(UTC).isoformat(),
        "url": json.dumps(url),
        "headers": json.dumps(headers),
        "body_sha256": body_sha256(body),
        "delivery": base64.urlsafe_b64encode(delivery_id.encode()).decode(),
    }


def delivery_from(provider: str, body: bytes, metadata: dict[str, Any]) -> StoredDelivery:
    return StoredDelivery(
        provider=provider,
        delivery_id=base64.urlsafe_b64decode(metadata["delivery"]).decode(),
        received_at=datetime.fromisoformat(metadata["received_at"]),
        url=json.loads(metadata["url"]),
        headers=json.loads(metadata["headers"]),
        body=body,
    )


def purge_processed(storage: Storage, *, retention_days: int, now: datetime | None = None) -> int:
    """Kept deliveries processed longer ago than the retention, and their rows, deleted
    (one not processed yet, or failed, is never purged). Returns how many went."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    table = storage.tables.get(DeliveryRecord)
    purged = 0
    query = "processed_at lt @cutoff and (status eq 'done' or status eq 'gone')"
    for row in list(table.query(query, {"cutoff": cutoff})):
        storage.blobs.delete(WEBHOOKS_CONTAINER, row.blob)
        table.delete(row.partition_key, row.row_key)
        purged += 1
    if purged:
        log.info("webhook deliveries past retention deleted", extra={"deliveries": purged})
    return purged
