"""Braze Currents records to engagement events (stored form, see core.events.model).

The event type comes from the key's `event_type=` folder (Braze's own name, e.g.
`users.messages.email.Open`), or from the writer schema's namespace and name when a key
does not carry it. Known fields map to the canonical ones; every other non-null field is
kept in `raw` as delivered, so fields Braze adds later are stored without a code change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.events.model import EventChannel, EventType

SOURCE = "braze_currents"
_T = EventType
_C = EventChannel


@dataclass(frozen=True)
class EventKind:
    type: EventType
    channel: EventChannel
    generic: bool = False
    """A type Switchboard stores without a specific mapping (counted in the report)."""

    # Precomputed: `to_event` runs once per record.
    type_name: str = field(init=False)
    channel_name: str = field(init=False)
    names_its_channel: bool = field(init=False)
    """Subscription changes carry their channel (and its address) in the record."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "type_name", self.type.value)
        object.__setattr__(self, "channel_name", self.channel.value)
        subscription = (EventType.SUBSCRIPTION_CHANGED, EventType.SUBSCRIPTION_GROUP_CHANGED)
        object.__setattr__(self, "names_its_channel", self.type in subscription)


def _group(prefix: str, channel: EventChannel, names: dict[str, EventType]) -> dict[str, EventKind]:
    return {f"{prefix}.{name}": EventKind(kind, channel) for name, kind in names.items()}


_MESSAGING_COMMON = {"Send": _T.SENT, "Abort": _T.ABORTED, "Retry": _T.RETRIED}
KNOWN_TYPES: dict[str, EventKind] = {
    **_group("users.messages.email", _C.EMAIL, {
        **_MESSAGING_COMMON, "Delivery": _T.DELIVERED, "Open": _T.OPENED, "Click": _T.CLICKED,
        "Bounce": _T.BOUNCED_HARD, "SoftBounce": _T.BOUNCED_SOFT, "Deferral": _T.DEFERRED,
        "MarkAsSpam": _T.SPAM_COMPLAINT, "Unsubscribe": _T.UNSUBSCRIBED,
    }),
    **_group("users.messages.pushnotification", _C.PUSH, {
        **_MESSAGING_COMMON, "Open": _T.OPENED, "Bounce": _T.BOUNCED_HARD,
        "IosForeground": _T.FOREGROUND, "InfluencedOpen": _T.OPENED,
    }),
    **_group("users.messages.sms", _C.SMS, {
        **_MESSAGING_COMMON, "CarrierSend": _T.DISPATCHED, "Delivery": _T.DELIVERED,
        "DeliveryFailure": _T.DELIVERY_FAILED, "Rejection": _T.REJECTED,
        "InboundReceive": _T.INBOUND_RECEIVED, "ShortLinkClick": _T.CLICKED,
    }),
    **_group("users.messages.whatsapp", _C.WHATSAPP, {
        **_MESSAGING_COMMON, "Delivery": _T.DELIVERED, "Read": _T.READ, "Click": _T.CLICKED,
        "Failure": _T.DELIVERY_FAILED, "InboundReceive": _T.INBOUND_RECEIVED,
    }),
    **_group("users.messages.rcs", _C.RCS, {
        **_MESSAGING_COMMON, "Delivery": _T.DELIVERED, "Read": _T.READ, "Click": _T.CLICKED,
        "Rejection": _T.REJECTED, "InboundReceive": _T.INBOUND_RECEIVED,
    }),
    **_group("users.messages.line", _C.LINE, {
        **_MESSAGING_COMMON, "Click": _T.CLICKED, "InboundReceive": _T.INBOUND_RECEIVED,
    }),
    **_group("users.messages.inappmessage", _C.IN_APP, {
        "Impression": _T.IMPRESSION, "Click": _T.CLICKED, "Abort": _T.ABORTED,
    }),
    **_group("users.messages.contentcard", _C.CONTENT_CARD, {
        "Send": _T.SENT, "Impression": _T.IMPRESSION, "Click": _T.CLICKED,
        "Dismiss": _T.DISMISSED, "Abort": _T.ABORTED,
    }),
    **_group("users.messages.banner", _C.BANNER, {
        "Impression": _T.IMPRESSION, "Click": _T.CLICKED, "Dismiss": _T.DISMISSED,
        "Abort": _T.ABORTED,
    }),
    **_group("users.messages.webhook", _C.WEBHOOK, {
        **_MESSAGING_COMMON, "Failure": _T.DELIVERY_FAILED,
    }),
    "users.behaviors.subscription.GlobalStateChange": EventKind(_T.SUBSCRIPTION_CHANGED, _C.NONE),
    "users.behaviors.subscriptiongroup.StateChange":
        EventKind(_T.SUBSCRIPTION_GROUP_CHANGED, _C.NONE),
    "users.behaviors.pushnotification.TokenStateChange":
        EventKind(_T.PUSH_TOKEN_CHANGED, _C.PUSH),
    # The name in the v10 writer schemas (braze.md lists it under behaviors).
    "users.messages.pushnotification.TokenStateChange":
        EventKind(_T.PUSH_TOKEN_CHANGED, _C.PUSH),
    "users.behaviors.CustomEvent": EventKind(_T.CUSTOM_EVENT, _C.NONE),
    "users.behaviors.Purchase": EventKind(_T.PURCHASE, _C.NONE),
}  # fmt: skip
_GENERIC = EventKind(EventType.OTHER, EventChannel.NONE, generic=True)
_SUBSCRIPTION_CHANNELS = {
    "email": _C.EMAIL,
    "sms": _C.SMS,
    "push": _C.PUSH,
    "whatsapp": _C.WHATSAPP,
}

# Currents field -> canonical field (string values only; anything else stays in raw).
_CANONICAL = {
    "user_id": "braze_id",
    "external_user_id": "external_id",
    "email_address": "email",
    # The person's number in each family (currents-avro-fields.md, addendum):
    # `to_phone_number` on messages sent to them, `user_phone_number` on what they sent or
    # clicked, `phone_number` on subscription and profile changes. `inbound_phone_number` and
    # `from_phone_number` are the brand's own numbers: kept in raw, never the person's.
    "phone_number": "phone",
    "to_phone_number": "phone",
    "user_phone_number": "phone",
    "push_token": "push_token",
    "app_id": "app_id",
    "platform": "platform",
    "campaign_id": "campaign_id",
    "campaign_name": "campaign_name",
    "canvas_id": "canvas_id",
    "canvas_name": "canvas_name",
    "canvas_step_id": "canvas_step_id",
    "message_variation_id": "message_variation_id",
    "send_id": "send_id",
    "dispatch_id": "dispatch_id",
    "url": "url",
    "bounce_reason": "bounce_reason",
    "subscription_status": "subscription_status",
    "subscription_group_id": "subscription_group_id",
}
_NOT_KEPT = frozenset({"id", "time"})
_MILLIS_FIELD = "time_ms"


def kind_of(event_type: str) -> EventKind:
    return KNOWN_TYPES.get(event_type, _GENERIC)


def event_type_from_schema(schema: dict[str, Any]) -> str | None:
    """`dataexport.S3.inner.users.messages.email` + `Open` -> `users.messages.email.Open`."""
    namespace, name = schema.get("namespace"), schema.get("name")
    if not isinstance(name, str):
        return None
    if "." in name and not namespace:
        namespace, _, name = name.rpartition(".")
    marker = ".inner."
    if isinstance(namespace, str) and marker in namespace:
        return f"{namespace.split(marker, 1)[1]}.{name}"
    return None


class InvalidRecord(ValueError):
    """A record without the fields every Currents event has (`id`, `time`)."""


def to_event(record: dict[str, Any], event_type: str, kind: EventKind) -> dict[str, Any]:
    """One Currents record as an engagement event in stored form."""
    source_id = record.get("id")
    moment = record.get("time")
    if not isinstance(source_id, str) or not source_id:
        raise InvalidRecord("record has no id")
    if not isinstance(moment, int) or isinstance(moment, bool):
        raise InvalidRecord("record has no integer time")
    event: dict[str, Any] = {
        "event_id": "braze:" + source_id,
        "source": SOURCE,
        "source_type": event_type,
        "type": kind.type_name,
        "channel": kind.channel_name,
        "occurred_at": _millis(moment, record.get(_MILLIS_FIELD)),
    }
    raw: dict[str, Any] = {}
    canonical = _CANONICAL
    for name, value in record.items():
        if value is None or name in _NOT_KEPT:
            continue
        target = canonical.get(name)
        if target is not None and type(value) is str:
            event[target] = value
        else:
            raw[name] = value
    if kind.names_its_channel:
        _subscription_address(event, raw)
    if raw.get(_MILLIS_FIELD) == event["occurred_at"]:
        del raw[_MILLIS_FIELD]  # it is the event's time
    if raw:
        event["raw"] = raw
    return event


def _millis(seconds: int, millis: object) -> int:
    """The event's time in epoch milliseconds: `time_ms` where a type has it and it is the
    same second as `time` (a `time_ms` that disagrees stays in raw), else `time` x 1000."""
    if type(millis) is int and millis // 1000 == seconds:
        return millis
    return seconds * 1000


def _subscription_address(event: dict[str, Any], raw: dict[str, Any]) -> None:
    """Subscription changes name their channel; `channel_identifier` is its address."""
    channel = _SUBSCRIPTION_CHANNELS.get(str(raw.get("channel", "")).lower())
    if channel is None:
        return
    event["channel"] = channel.value
    address = raw.get("channel_identifier")
    if isinstance(address, str) and address:
        if channel == EventChannel.EMAIL:
            event.setdefault("email", address)
        elif channel in (EventChannel.SMS, EventChannel.WHATSAPP):
            event.setdefault("phone", address)
