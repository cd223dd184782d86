"""Twilio SendGrid Event Webhook (Signed Event Webhook).

Signature: ECDSA P-256 / SHA-256 over the timestamp header's text followed by the raw body
bytes, no separator (`X-Twilio-Email-Event-Webhook-Signature`, base64 DER; key: the base64
DER public key from Mail Settings, without PEM armour). The body is a JSON array of events;
each event's `sg_event_id` is its deduplication key; the delivery's id is its body's digest
(a retry sends the same batch). SendGrid retries any non-2xx for 24 hours.

    processed -> sent            bounce (type bounce)  -> bounced_hard
    dropped   -> rejected        bounce (type blocked) -> bounced_soft
    delivered -> delivered       spamreport            -> spam_complaint
    deferred  -> deferred        unsubscribe           -> unsubscribed
    open / click -> opened / clicked
    group_unsubscribe / group_resubscribe -> subscription_group_changed
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timedelta
from typing import Any, ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from core.events.model import EventChannel, EventType
from core.webhooks.hook import (
    Forged,
    InboundRequest,
    Malformed,
    Parsed,
    ProviderDefaults,
    StoredDelivery,
    Verified,
    digest,
    epoch_seconds,
    json_body,
    keys_of,
    text,
    within,
)

SIGNATURE = "x-twilio-email-event-webhook-signature"
TIMESTAMP = "x-twilio-email-event-webhook-timestamp"
_T = EventType
_TYPES = {
    "processed": _T.SENT, "dropped": _T.REJECTED, "delivered": _T.DELIVERED,
    "deferred": _T.DEFERRED, "open": _T.OPENED, "click": _T.CLICKED,
    "spamreport": _T.SPAM_COMPLAINT, "unsubscribe": _T.UNSUBSCRIBED,
    "group_unsubscribe": _T.SUBSCRIPTION_GROUP_CHANGED,
    "group_resubscribe": _T.SUBSCRIPTION_GROUP_CHANGED,
}  # fmt: skip
_GROUP_STATUS = {"group_unsubscribe": "unsubscribed", "group_resubscribe": "subscribed"}
# Fields mapped to the event's own; everything else stays in `raw`.
_MAPPED = frozenset({"email", "timestamp", "event", "sg_event_id", "sg_message_id", "url",
                     "reason", "asm_group_id", "external_id"})  # fmt: skip


def public_key(encoded: str) -> ec.EllipticCurvePublicKey:
    """A key as SendGrid shows it (base64 DER SubjectPublicKeyInfo); ValueError if not one."""
    try:
        key = load_der_public_key(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError("not a base64 DER public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an elliptic-curve public key")
    return key


class SendGrid(ProviderDefaults):
    name: ClassVar[str] = "sendgrid"
    # SendGrid posts at 768 KB per batch; twice that leaves room without buffering a flood.
    max_body_bytes: ClassVar[int] = 2 << 20

    def __init__(self, public_keys: str, tolerance: timedelta) -> None:
        self._keys = [public_key(k) for k in keys_of(public_keys)]
        if not self._keys:
            raise ValueError("no public key")
        self._tolerance = tolerance

    def verify(self, request: InboundRequest, now: datetime) -> Verified:
        signature, stamp = request.header(SIGNATURE), request.header(TIMESTAMP)
        if not signature or not stamp:
            raise Forged("the signature or timestamp header is missing")
        moment = epoch_seconds(stamp)
        if moment is None:
            raise Forged("the timestamp header is not a Unix time")
        try:
            signed = base64.b64decode(signature, validate=True)
        except binascii.Error:
            raise Forged("the signature is not base64") from None
        payload = stamp.encode() + request.body
        if not any(self._verifies(key, signed, payload) for key in self._keys):
            raise Forged("no configured public key verifies the signature")
        within(moment, now, self._tolerance)  # after the signature: a forged date says nothing
        return Verified(delivery_id=digest(request.body))

    @staticmethod
    def _verifies(key: ec.EllipticCurvePublicKey, signature: bytes, payload: bytes) -> bool:
        try:
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def events(self, delivery: StoredDelivery) -> Parsed:
        items = json_body(delivery.body)
        if not isinstance(items, list):
            raise Malformed("the body is not a JSON array of events")
        parsed = Parsed()
        for item in items:
            if not isinstance(item, dict):
                parsed.skip("not_an_object")
                continue
            self._event(item, parsed)
        return parsed

    @staticmethod
    def _event(item: dict[str, Any], parsed: Parsed) -> None:
        event_id, name = text(item.get("sg_event_id")), text(item.get("event"))
        moment = epoch_seconds(item.get("timestamp"))
        if event_id is None or name is None or moment is None:
            parsed.skip("missing_sg_event_id_event_or_timestamp")
            return
        kind = _TYPES.get(name, _T.OTHER)
        if name == "bounce":
            kind = _T.BOUNCED_SOFT if item.get("type") == "blocked" else _T.BOUNCED_HARD
        raw = {k: v for k, v in item.items() if k not in _MAPPED}
        parsed.add(
            event_id=f"sendgrid:{event_id}", source="webhook:sendgrid", source_type=name,
            type=kind, channel=EventChannel.EMAIL, occurred_at=moment,
            email=text(item.get("email")), external_id=text(item.get("external_id")),
            send_id=text(item.get("sg_message_id")), url=text(item.get("url"), 2000),
            bounce_reason=text(item.get("reason")) if kind != _T.OPENED else None,
            subscription_status=_GROUP_STATUS.get(name),
            subscription_group_id=text(item.get("asm_group_id")), raw=raw,
        )  # fmt: skip
