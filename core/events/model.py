"""The engagement event: one thing that happened to one person on one channel.

Every source (Braze Currents, push feedback, app interactions, provider webhooks) maps its
records to this one shape; the log export reads only this shape. `event_id` is
source-qualified (`braze:<Currents id>`, `push:<...>`) and is the deduplication key.

Stored form (`StoredEvent`): the model dumped to JSON with `None` fields left out and
`occurred_at` as epoch milliseconds. Hot paths (Currents decoding) build that stored dict
directly for speed; `tests/test_events.py` checks every mapped type validates as this model.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_serializer


class EventType(StrEnum):
    """What happened, independent of channel (`push sent` is SENT on PUSH)."""

    SENT = "sent"
    DISPATCHED = "dispatched"
    """Handed to a carrier or provider (SMS `CarrierSend`), not yet delivered."""
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    OPENED = "opened"
    CLICKED = "clicked"
    BOUNCED_SOFT = "bounced_soft"
    BOUNCED_HARD = "bounced_hard"
    DELIVERY_FAILED = "delivery_failed"
    REJECTED = "rejected"
    UNSUBSCRIBED = "unsubscribed"
    SPAM_COMPLAINT = "spam_complaint"
    ABORTED = "aborted"
    RETRIED = "retried"
    READ = "read"
    INBOUND_RECEIVED = "inbound_received"
    IMPRESSION = "impression"
    DISMISSED = "dismissed"
    FOREGROUND = "foreground"
    SUBSCRIPTION_CHANGED = "subscription_changed"
    SUBSCRIPTION_GROUP_CHANGED = "subscription_group_changed"
    PUSH_TOKEN_CHANGED = "push_token_changed"  # noqa: S105 - an event type, not a secret
    CUSTOM_EVENT = "custom_event"
    PURCHASE = "purchase"
    OTHER = "other"
    """A source type Switchboard does not map (yet): stored and counted, never dropped."""


class EventChannel(StrEnum):
    EMAIL = "email"
    PUSH = "push"
    SMS = "sms"
    WHATSAPP = "whatsapp"
    RCS = "rcs"
    LINE = "line"
    IN_APP = "in_app"
    CONTENT_CARD = "content_card"
    BANNER = "banner"
    WEBHOOK = "webhook"
    NONE = "none"


class EngagementEvent(BaseModel):
    """The canonical engagement event (see module docstring for the stored form)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(min_length=3, max_length=300)
    source: str = Field(min_length=1, max_length=60)
    """The system it came from: `braze_currents`, `push`, `app`, `webhook:<provider>`."""
    source_type: str = Field(min_length=1, max_length=200)
    """The source's own type name, e.g. `users.messages.email.Open`."""
    type: EventType
    channel: EventChannel
    occurred_at: datetime
    ingested_at: datetime | None = None
    """Set by the event store when read: the hour partition the event was committed in."""

    external_id: str | None = None
    braze_id: str | None = None
    email: str | None = None
    phone: str | None = None
    push_token: str | None = None
    app_id: str | None = None
    platform: str | None = None

    campaign_id: str | None = None
    campaign_name: str | None = None
    canvas_id: str | None = None
    canvas_name: str | None = None
    canvas_step_id: str | None = None
    message_variation_id: str | None = None
    send_id: str | None = None
    dispatch_id: str | None = None

    url: str | None = None
    bounce_reason: str | None = None
    subscription_status: str | None = None
    subscription_group_id: str | None = None

    raw: dict[str, Any] = Field(default_factory=dict)
    """The source's remaining fields, kept as delivered for fidelity."""

    @field_serializer("occurred_at", "ingested_at")
    def _epoch_millis(self, value: datetime | None) -> int | None:
        return None if value is None else round(value.timestamp() * 1000)

    def stored(self) -> dict[str, Any]:
        """The stored form: JSON-ready, `None` fields and empty `raw` left out."""
        data = self.model_dump(mode="json", exclude_none=True, exclude={"ingested_at"})
        if not data.get("raw"):
            data.pop("raw", None)
        return data

    @classmethod
    def from_stored(cls, data: dict[str, Any], ingested_at: datetime | None = None) -> Self:
        event = cls.model_validate(data)
        return event.model_copy(update={"ingested_at": ingested_at}) if ingested_at else event


def epoch_millis(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def from_epoch_millis(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)
