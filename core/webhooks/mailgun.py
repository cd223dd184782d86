"""Mailgun webhooks.

Signature: hex HMAC-SHA256 (key: the Webhook Signing Key) over `timestamp` + `token` from the
body's `signature` object. Only those two are signed, not `event-data`, so the token is the
delivery's id and a one-time value: the same token with other bytes is a captured signature
replayed over a forged body and is refused (`Verified.replay_guarded`); the same token with
the same bytes is Mailgun's retry and is answered as a duplicate. Mailgun retries any answer
but 200 and 406 for 8 hours, so a refusal is 401, never 406 (real events survive a key
mix-up while it is fixed).

    accepted -> dispatched     failed, severity permanent -> bounced_hard
    delivered -> delivered     failed, severity temporary -> bounced_soft
    opened / clicked           complained -> spam_complaint
    unsubscribed -> unsubscribed
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta
from typing import Any, ClassVar

from core.events.model import EventChannel, EventType
from core.webhooks.hook import (
    Forged,
    InboundRequest,
    Malformed,
    Parsed,
    ProviderDefaults,
    StoredDelivery,
    Verified,
    any_digest_matches,
    epoch_seconds,
    json_body,
    keys_of,
    text,
    within,
)

_T = EventType
_TYPES = {
    "accepted": _T.DISPATCHED, "delivered": _T.DELIVERED, "opened": _T.OPENED,
    "clicked": _T.CLICKED, "unsubscribed": _T.UNSUBSCRIBED, "complained": _T.SPAM_COMPLAINT,
}  # fmt: skip
_MAPPED = frozenset({"event", "timestamp", "id", "recipient", "url", "severity", "reason"})


def _document(body: bytes) -> dict[str, Any]:
    document = json_body(body)
    if not isinstance(document, dict):
        raise Malformed("the body is not a JSON object")
    return document


class Mailgun(ProviderDefaults):
    name: ClassVar[str] = "mailgun"
    max_body_bytes: ClassVar[int] = 1 << 20

    def __init__(self, signing_keys: str, tolerance: timedelta) -> None:
        self._keys = [k.encode() for k in keys_of(signing_keys)]
        if not self._keys:
            raise ValueError("no signing key")
        self._tolerance = tolerance

    def verify(self, request: InboundRequest, now: datetime) -> Verified:
        signature = _document(request.body).get("signature")
        if not isinstance(signature, dict):
            raise Forged("the body has no signature object")
        stamp, token, given = (signature.get(k) for k in ("timestamp", "token", "signature"))
        if not all(isinstance(v, str) and v for v in (stamp, token, given)):
            raise Forged("the signature object lacks timestamp, token or signature")
        assert isinstance(stamp, str) and isinstance(token, str) and isinstance(given, str)
        message = (stamp + token).encode()
        expected = [hmac.new(k, message, hashlib.sha256).hexdigest().encode() for k in self._keys]
        if not any_digest_matches(expected, given.lower().encode()):
            raise Forged("no configured signing key verifies the signature")
        moment = epoch_seconds(stamp)
        if moment is None:
            raise Forged("the signed timestamp is not a Unix time")
        within(moment, now, self._tolerance)
        return Verified(delivery_id=token, replay_guarded=True)

    def events(self, delivery: StoredDelivery) -> Parsed:
        data = _document(delivery.body).get("event-data")
        if not isinstance(data, dict):
            raise Malformed("the body has no event-data object")
        parsed = Parsed()
        event_id, name = text(data.get("id")), text(data.get("event"))
        moment = epoch_seconds(data.get("timestamp"))
        if event_id is None or name is None or moment is None:
            parsed.skip("missing_id_event_or_timestamp")
            return parsed
        kind = _TYPES.get(name, _T.OTHER)
        if name == "failed":
            permanent = data.get("severity") == "permanent"
            kind = _T.BOUNCED_HARD if permanent else _T.BOUNCED_SOFT
        message = data.get("message")
        headers = message.get("headers") if isinstance(message, dict) else None
        variables = data.get("user-variables")
        status = data.get("delivery-status")
        reason = text(data.get("reason"))
        if isinstance(status, dict) and text(status.get("description") or status.get("message")):
            reason = text(status.get("description") or status.get("message"))
        parsed.add(
            # Mailgun's ids are unique within a day: qualified by the event's day.
            event_id=f"mailgun:{moment:%Y%m%d}:{event_id}", source="webhook:mailgun",
            source_type=name, type=kind, channel=EventChannel.EMAIL, occurred_at=moment,
            email=text(data.get("recipient")),
            external_id=text(variables.get("external_id")) if isinstance(variables, dict) else None,
            send_id=text(headers.get("message-id")) if isinstance(headers, dict) else None,
            url=text(data.get("url"), 2000),
            bounce_reason=reason if kind in (_T.BOUNCED_HARD, _T.BOUNCED_SOFT) else None,
            raw={k: v for k, v in data.items() if k not in _MAPPED},
        )  # fmt: skip
        return parsed
