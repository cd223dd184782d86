"""Standard Webhooks (spec v1): any sender that follows it, our own included.

Verification is the `standardwebhooks` package's (HMAC-SHA256 over
`{webhook-id}.{webhook-timestamp}.{body}`, `v1,` signatures, several at once while a secret
is rotated, compared in constant time); each configured `whsec_` secret is tried. Every
exception its verify raises (a missing header, a signature entry without a comma, bad
base64) is a forgery here. The tolerance is checked first with this app's clock and
setting (the package's own ±5 minutes still applies on top). `webhook-id` is the same on
every retry: the delivery's id.

The payload Switchboard reads (the spec leaves the body to each sender):

    {"type": "<channel>.<event type>", "timestamp": "<ISO 8601>",
     "data": {"id": "...", "email" | "phone" | "external_id": "...", ...}}

`<channel>` and `<event type>` are the canonical names of core/events/model.py, e.g.
`email.bounced_hard`, `sms.unsubscribed`, `email.opened`; `data` may also carry
`campaign_id`, `send_id`, `url`, `bounce_reason`, `subscription_status`; the rest of
`data` is kept as the event's `raw`. The event id is `data.id`, or the webhook-id.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, ClassVar

from standardwebhooks.webhooks import Webhook

from core.events.model import EventChannel, EventType
from core.webhooks.hook import (
    Forged,
    InboundRequest,
    Malformed,
    Parsed,
    ProviderDefaults,
    StoredDelivery,
    Verified,
    epoch_seconds,
    json_body,
    keys_of,
    text,
    within,
)

_FIELDS = ("email", "phone", "external_id", "campaign_id", "send_id", "dispatch_id", "url",
           "bounce_reason", "subscription_status", "subscription_group_id")  # fmt: skip


class StandardWebhooks(ProviderDefaults):
    name: ClassVar[str] = "standard"
    max_body_bytes: ClassVar[int] = 1 << 20
    kept_headers: ClassVar[tuple[str, ...]] = ("webhook-id",)

    def __init__(self, secrets: str, tolerance: timedelta) -> None:
        self._hooks = [Webhook(secret) for secret in keys_of(secrets)]
        if not self._hooks:
            raise ValueError("no secret")
        self._tolerance = tolerance

    def verify(self, request: InboundRequest, now: datetime) -> Verified:
        headers = {k: request.header(k) or "" for k in ("webhook-id", "webhook-timestamp",
                                                        "webhook-signature")}  # fmt: skip
        if not all(headers.values()):
            raise Forged("a webhook-id, webhook-timestamp or webhook-signature header is missing")
        moment = epoch_seconds(headers["webhook-timestamp"])
        if moment is None:
            raise Forged("webhook-timestamp is not a Unix time")
        within(moment, now, self._tolerance)
        for hook in self._hooks:
            try:
                hook.verify(request.body, headers, json_parse=False)
            except Exception:  # noqa: S112 - anything it raises is a failed check
                continue
            return Verified(delivery_id=headers["webhook-id"])
        raise Forged("no configured secret verifies the signature")

    def events(self, delivery: StoredDelivery) -> Parsed:
        document = json_body(delivery.body)
        if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
            raise Malformed('the body is not {"type", "timestamp", "data": {...}}')
        parsed = Parsed()
        channel, kind = _type(document.get("type"))
        moment = _moment(document.get("timestamp"))
        if channel is None or kind is None:
            parsed.skip("unknown_type")
            return parsed
        if moment is None:
            parsed.skip("missing_timestamp")
            return parsed
        data: dict[str, Any] = document["data"]
        event_id = text(data.get("id")) or delivery.delivery_id
        parsed.add(
            event_id=f"standard:{event_id}", source="webhook:standard",
            source_type=str(document["type"])[:200], type=kind, channel=channel,
            occurred_at=moment, **{f: text(data.get(f), 2000) for f in _FIELDS},
            raw={k: v for k, v in data.items() if k not in _FIELDS and k != "id"},
        )  # fmt: skip
        return parsed


def _type(value: Any) -> tuple[EventChannel | None, EventType | None]:
    channel, _, kind = str(value or "").partition(".")
    try:
        return EventChannel(channel), EventType(kind)
    except ValueError:
        return None, None


def _moment(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return epoch_seconds(value)
        return moment if moment.tzinfo is not None else None
    return epoch_seconds(value)
