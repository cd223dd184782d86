"""`POST /api/push/events`: opens, actions and dismissals reported by apps.

Each request's events become one segment of the event store, so they are deduplicated on
their ids like every other source (`app:{app id}:{id}`) and flow into the log export.
The segment id is derived from the request's event ids: a client retrying the same batch
finds its earlier segment instead of adding another.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from core.events.model import EventChannel, EventType, epoch_millis
from core.events.store import EventStore
from core.push.apps import APP_ID_PATTERN

SOURCE = "app"
MAX_EVENTS = 500
_KINDS = {
    "open": EventType.OPENED,
    "action": EventType.CLICKED,
    "dismiss": EventType.DISMISSED,
}
_FUTURE_TOLERANCE = timedelta(minutes=10)


class AppEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=8, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    """Unique per app: the SDK's event id (a retry sends the same id)."""
    type: Literal["open", "action", "dismiss"]
    occurred_at: AwareDatetime
    profile_id: str | None = Field(default=None, max_length=256)
    token: str | None = Field(default=None, max_length=4096)
    dispatch_id: str | None = Field(default=None, max_length=128)
    campaign_id: str | None = Field(default=None, max_length=128)
    action_id: str | None = Field(default=None, max_length=128)
    """The tapped button (`action` events)."""
    url: str | None = Field(default=None, max_length=2048)

    @field_validator("occurred_at")
    @classmethod
    def _not_in_the_future(cls, value: datetime) -> datetime:
        if value > datetime.now(UTC) + _FUTURE_TOLERANCE:
            raise ValueError("occurred_at is in the future")
        return value


class AppEventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    app_id: str = Field(pattern=APP_ID_PATTERN)
    platform: Literal["ios", "android"] | None = None
    events: list[AppEvent] = Field(min_length=1, max_length=MAX_EVENTS)


def to_stored(batch: AppEventBatch, event: AppEvent) -> dict[str, Any]:
    stored: dict[str, Any] = {
        "event_id": f"app:{batch.app_id}:{event.id}",
        "source": SOURCE,
        "source_type": f"push.{event.type}",
        "type": _KINDS[event.type].value,
        "channel": EventChannel.PUSH.value,
        "occurred_at": epoch_millis(event.occurred_at),
        "app_id": batch.app_id,
    }
    for target, value in (
        ("external_id", event.profile_id), ("push_token", event.token),
        ("dispatch_id", event.dispatch_id), ("campaign_id", event.campaign_id),
        ("url", event.url), ("platform", batch.platform),
    ):  # fmt: skip
        if value is not None:
            stored[target] = value
    if event.action_id is not None:
        stored["raw"] = {"action_id": event.action_id}
    return stored


def record_app_events(store: EventStore, batch: AppEventBatch) -> dict[str, int]:
    """Store a batch once; the counts say what was new and what was seen before."""
    ids = sorted(f"{batch.app_id}:{e.id}" for e in batch.events)
    segment_id = "app-" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]
    writer = store.writer(SOURCE, segment_id)
    for event in batch.events:
        writer.add(to_stored(batch, event))
    placed = writer.place()
    stats = placed.stats
    return {
        "received": len(batch.events),
        "stored": stats.stored,
        "duplicates": stats.duplicates_in_segment + stats.duplicates_in_store,
    }
