"""Engagement events (stored form) as XDM ExperienceEvent records for the CDP.

    broadLog     one record per delivery attempt outcome (sent, delivered, bounced, ...)
    trackingLog  one record per interaction (open, click, unsubscribe, spam complaint, ...)

`segment_lines` writes a segment's records as JSON Lines: through the C speedups
(`native/switchboard_speedups.c`) when they are built, else through the functions below,
which are the reference: both give the same bytes (the tests compare them).

Shapes follow `schemas/xdm/*.schema.json` (the files' contract, checked by the tests):
`_id` (deterministic from the source event), `timestamp`, `eventType` from the XDM enum
where one fits (`message.feedback` / `message.tracking` otherwise), an `identityMap` with
the configured namespaces, the `_experience.customerJourneyManagement` field groups
(messageDeliveryfeedback, messageInteraction, messageProfile), the Campaign delivery and
tracking-log fields (`_experience.campaign`), and a tenant block with where it came from.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from core.events.model import EventType
from core.export.quarantine import ADDRESS_FIELDS, delivery_matters

BROADLOG = "broadLog"
TRACKINGLOG = "trackingLog"
NON_DELIVERABLE = "nonDeliverableAddresses"

CHANNEL_URIS = {
    "email": "https://ns.adobe.com/xdm/channels/email",
    "push": "https://ns.adobe.com/xdm/channels/push",
    "sms": "https://ns.adobe.com/xdm/channels/sms",
    "whatsapp": "https://ns.adobe.com/xdm/channels/whatsapp",
    "rcs": "https://ns.adobe.com/xdm/channels/rcs",
    "line": "https://ns.adobe.com/xdm/channels/line",
    "in_app": "https://ns.adobe.com/xdm/channels/inApp",
    "content_card": "https://ns.adobe.com/xdm/channels/contentCard",
    "banner": "https://ns.adobe.com/xdm/channels/banner",
    "webhook": "https://ns.adobe.com/xdm/channels/webhook",
}

# Event type -> (feedbackStatus, failure type or None) for the delivery log.
DELIVERY_OUTCOMES: dict[str, tuple[str, str | None]] = {
    EventType.SENT: ("sent", None),
    EventType.DISPATCHED: ("sent", None),
    EventType.DELIVERED: ("delivered", None),
    EventType.DEFERRED: ("delay", None),
    EventType.BOUNCED_SOFT: ("bounce", "soft"),
    EventType.BOUNCED_HARD: ("bounce", "hard"),
    EventType.DELIVERY_FAILED: ("error", "soft"),
    EventType.REJECTED: ("error", "hard"),
    EventType.ABORTED: ("exclude", None),
}
_EMAIL_DELIVERY_TYPES = {
    EventType.SENT: "directMarketing.emailSent",
    EventType.DELIVERED: "directMarketing.emailDelivered",
    EventType.BOUNCED_HARD: "directMarketing.emailBounced",
    EventType.BOUNCED_SOFT: "directMarketing.emailBouncedSoft",
}
# Event type -> interactionType for the tracking log.
INTERACTIONS: dict[str, str] = {
    EventType.OPENED: "open",
    EventType.CLICKED: "click",
    EventType.UNSUBSCRIBED: "unsubscribe",
    EventType.SPAM_COMPLAINT: "spam_complaint",
    EventType.READ: "read",
}
_EMAIL_TRACKING_TYPES = {
    "open": "directMarketing.emailOpened",
    "bot_open": "directMarketing.emailOpened",
    "click": "directMarketing.emailClicked",
    "bot_click": "directMarketing.emailClicked",
    "unsubscribe": "directMarketing.emailUnsubscribed",
}
_SMTP_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
_SMTP_BASIC = re.compile(r"^\s*([245]\d\d)\b")


@dataclass(frozen=True)
class XdmOptions:
    tenant: str
    """The tenant id without the leading underscore (`_<tenant>` holds Switchboard's fields)."""
    profile_namespace: str
    """Identity namespace of the CDP's profile id (the events' `external_id`)."""

    @property
    def tenant_key(self) -> str:
        return f"_{self.tenant}"


def _message_profile(channel: str) -> dict[str, Any]:
    """Shared per channel: serialised many times, never changed."""
    found = _PROFILES.get(channel)
    if found is None:
        found = _PROFILES[channel] = {"channel": {"_id": CHANNEL_URIS.get(channel, channel)}}
    return found


_PROFILES: dict[str, dict[str, Any]] = {}


def record_id(log: str, event_id: str) -> str:
    """`_id`: the same for the same source event in the same log, on every export."""
    return hashlib.sha256(f"{log}|{event_id}".encode()).hexdigest()


def iso(moment_ms: int) -> str:
    """`2026-11-24T07:52:38.000Z` (XDM date-time, UTC, milliseconds)."""
    seconds, millis = divmod(moment_ms, 1000)
    return f"{_iso_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=65_536)
def _iso_second(seconds: int) -> str:
    # Events of a window share few distinct seconds; formatting is the costly part.
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def identity_map(event: dict[str, Any], options: XdmOptions) -> dict[str, list[dict[str, Any]]]:
    identities: dict[str, list[dict[str, Any]]] = {}
    primary_taken = False
    external_id = event.get("external_id")
    if external_id:
        identities[options.profile_namespace] = [{"id": external_id, "primary": True}]
        primary_taken = True
    for namespace, field in (("Email", "email"), ("Phone", "phone")):
        value = event.get(field)
        if value:
            identities[namespace] = [{"id": value, "primary": not primary_taken}]
            primary_taken = True
    return identities


def failure_code(reason: str | None) -> str | None:
    """The SMTP status in a bounce text: enhanced (`5.1.1`) if present, else basic (`550`)."""
    if not reason:
        return None
    found = _SMTP_ENHANCED.search(reason) or _SMTP_BASIC.search(reason)
    return found.group(1) if found else None


def _hub(event: dict[str, Any], ingested_at: str) -> dict[str, Any]:
    return {
        "sourceSystem": event["source"],
        "sourceEventId": event["event_id"],
        "sourceType": event["source_type"],
        "ingestedAt": ingested_at,
    }


def _campaign(event: dict[str, Any]) -> dict[str, Any]:
    fields = {
        "deliveryID": event.get("dispatch_id") or event.get("send_id"),
        "campaignID": event.get("campaign_id") or event.get("canvas_id"),
        "campaignName": event.get("campaign_name") or event.get("canvas_name"),
        "externalID": event.get("external_id"),
        "channel": event["channel"],
    }
    return {k: v for k, v in fields.items() if v is not None}


def broadlog_record(event: dict[str, Any], ingested_at: str, options: XdmOptions) -> dict[str, Any]:
    """The delivery-log record of a delivery outcome event (see DELIVERY_OUTCOMES)."""
    kind = event["type"]
    status, failure = DELIVERY_OUTCOMES[kind]
    channel = event["channel"]
    feedback: dict[str, Any] = {"feedbackStatus": status}
    campaign = _campaign(event)
    campaign["broadlogID"] = event["event_id"]
    campaign["status"] = status
    if failure is not None:
        reason = event.get("bounce_reason") or str(_raw(event).get("error") or "") or None
        message_failure: dict[str, Any] = {
            "type": failure,
            "category": "async"
            if kind in (EventType.BOUNCED_SOFT, EventType.BOUNCED_HARD)
            else "sync",
        }
        if reason:
            message_failure["reason"] = reason[:500]
            campaign["reasonMessage"] = reason[:500]
        code = failure_code(reason)
        if code:
            message_failure["code"] = code
        feedback["messageFailure"] = message_failure
        campaign["quarantine"] = failure == "hard"
    event_type = (
        _EMAIL_DELIVERY_TYPES.get(kind, "message.feedback")
        if channel == "email"
        else "message.feedback"
    )
    return _experience_event(
        BROADLOG, event, event_type, ("messageDeliveryfeedback", feedback), campaign,
        ingested_at, options,
    )  # fmt: skip


def _raw(event: dict[str, Any]) -> dict[str, Any]:
    """The source's own fields (an object; anything else counts as none)."""
    raw = event.get("raw")
    return raw if isinstance(raw, dict) else {}


def _is_bot(event: dict[str, Any]) -> bool:
    raw = _raw(event)
    return (
        str(raw.get("machine_open", "")).lower() == "true"
        or raw.get("is_suspected_bot_click") is True
    )


def trackinglog_record(
    event: dict[str, Any], ingested_at: str, options: XdmOptions
) -> dict[str, Any]:
    """The tracking-log record of an interaction event (see INTERACTIONS)."""
    interaction = INTERACTIONS[event["type"]]
    bot = _is_bot(event)
    if bot and interaction in ("open", "click"):
        interaction = f"bot_{interaction}"
    channel = event["channel"]
    details: dict[str, Any] = {"interactionType": interaction, "isBot": bot}
    campaign = _campaign(event)
    campaign["trackinglogID"] = event["event_id"]
    url = event.get("url")
    if url:
        details["url"] = url
        campaign["url"] = url
        campaign["urlCategory"] = channel
    if channel == "email":
        event_type = _EMAIL_TRACKING_TYPES.get(interaction, "message.tracking")
    elif channel == "push" and interaction == "open":
        event_type = "pushTracking.applicationOpened"
    else:
        event_type = "message.tracking"
    return _experience_event(
        TRACKINGLOG, event, event_type, ("messageInteraction", details), campaign,
        ingested_at, options,
    )  # fmt: skip


def _experience_event(
    log: str, event: dict[str, Any], event_type: str, group: tuple[str, dict[str, Any]],
    campaign: dict[str, Any], ingested_at: str, options: XdmOptions,
) -> dict[str, Any]:  # fmt: skip
    """What both logs' records share; `group` is their customerJourneyManagement field
    group (name and fields)."""
    return {
        "_id": record_id(log, event["event_id"]),
        "timestamp": iso(event["occurred_at"]),
        "eventType": event_type,
        "identityMap": identity_map(event, options),
        "_experience": {
            "customerJourneyManagement": {
                group[0]: group[1],
                "messageProfile": _message_profile(event["channel"]),
            },
            "campaign": campaign,
        },
        options.tenant_key: {"hub": _hub(event, ingested_at)},
    }


@dataclass(frozen=True)
class NotableEvents:
    """The events a caller also wants back (as their lines): every event of `types`, and
    deliveries to addresses in `with_errors` (named by `quarantine.with_errors_key`)."""

    types: frozenset[str]
    with_errors: frozenset[str] | None = None

    def wants(self, event: dict[str, Any]) -> bool:
        kind = event["type"]
        if kind in self.types:
            return True
        return (
            kind == EventType.DELIVERED
            and self.with_errors is not None
            and delivery_matters(event, self.with_errors)
        )

    def wants_line(self, line: bytes) -> bool:
        return self.wants(orjson.loads(line))


def reference_line(
    line: bytes, ingested_at: str, options: XdmOptions, notable: NotableEvents
) -> tuple[int, bytes, bool]:
    """One stored event's record: (0 broadLog, 1 trackingLog or -1 none, the record's JSON,
    whether the event is `notable`)."""
    event = orjson.loads(line)
    kind = event["type"]
    wanted = notable.wants(event)
    if kind in DELIVERY_OUTCOMES:
        return 0, orjson.dumps(broadlog_record(event, ingested_at, options)), wanted
    if kind in INTERACTIONS:
        return 1, orjson.dumps(trackinglog_record(event, ingested_at, options)), wanted
    return -1, b"", wanted


@dataclass(frozen=True)
class SegmentLines:
    """Records of a run of a segment's events: JSON Lines per log, each line with its newline."""

    next_offset: int
    """Where the next run of events starts in the segment's data."""
    events: int
    broadlog: bytes
    broadlog_count: int
    trackinglog: bytes
    trackinglog_count: int
    notable: list[bytes]
    """The lines of events whose type the caller named, in order (for the quarantine book)."""


def _load_speedups() -> Any:
    try:
        return importlib.import_module("switchboard_speedups")
    except ImportError:  # not built (e.g. no compiler where it was installed): the reference
        return None


SPEEDUPS = _load_speedups()


def segment_lines(
    data: bytes,
    start: int,
    max_events: int,
    ingested_at: str,
    options: XdmOptions,
    notable: NotableEvents,
    *,
    native: bool = True,
) -> SegmentLines:
    """Records of the next `max_events` events of a segment's JSON Lines (stored form) from
    byte `start`, in event order. Empty lines are skipped, as the store reads them."""
    if native and SPEEDUPS is not None and options.profile_namespace not in ("Email", "Phone"):
        # (A namespace named like an address's replaces it in the map: the reference's rule.)
        written = SPEEDUPS.experience_lines(
            data, start, max_events, DELIVERY_OUTCOMES, INTERACTIONS, _EMAIL_DELIVERY_TYPES,
            _EMAIL_TRACKING_TYPES, CHANNEL_URIS, failure_code, notable.types,
            ADDRESS_FIELDS, notable.with_errors, notable.wants_line,
            functools.partial(
                reference_line, ingested_at=ingested_at, options=options, notable=notable
            ),
            options.profile_namespace, options.tenant_key, ingested_at,
        )  # fmt: skip
        return SegmentLines(*written)
    logs: tuple[list[bytes], list[bytes]] = ([], [])
    found: list[bytes] = []
    events, position = 0, start
    while position < len(data) and events < max_events:
        newline = data.find(b"\n", position)
        end = len(data) if newline < 0 else newline
        line, position = data[position:end], end + 1
        if not line or (newline < 0 and not line.strip()):
            continue
        events += 1
        log, record, wanted = reference_line(line, ingested_at, options, notable)
        if log >= 0:
            logs[log].append(record + b"\n")
        if wanted:
            found.append(line)
    return SegmentLines(
        min(position, len(data)), events, b"".join(logs[0]), len(logs[0]),
        b"".join(logs[1]), len(logs[1]), found,
    )  # fmt: skip
