"""Twilio Messaging: status callbacks and incoming messages (SMS and WhatsApp).

Signature (`X-Twilio-Signature`): base64 HMAC-SHA1, key the Auth Token, over the URL exactly
as configured at Twilio (scheme, host, path, query) followed by every POST parameter's name
and value, sorted by name, no separators. Behind a proxy the URL Twilio called is not the
one this app sees, so it is a setting (SWITCHBOARD_WEBHOOK_TWILIO_URL), never taken from the
request; the request's query string is appended when the setting has none. Like Twilio's
own validator, the URL is also tried with and without its default port. For a JSON body
Twilio signs the URL with `bodySHA256` (the body's SHA-256) in its query instead.

Twilio signs no timestamp: a callback is accepted once by (MessageSid, MessageStatus), or by
`I-Twilio-Idempotency-Token` when it sends one. Callbacks carry no event time either; the
time received stands in for it.

    MessageStatus sent -> dispatched, delivered -> delivered, read -> read,
                  canceled -> aborted, failed / undelivered with ErrorCode
                      21610 (the person replied STOP)           -> unsubscribed
                      30005, 30006, 21211, 21614, 21635 (a number
                      that cannot take messages)                -> rejected (hard)
                      anything else                             -> delivery_failed (soft)
    incoming message -> inbound_received; an opt-out keyword (STOP, ... or Twilio's
                        OptOutType) unsubscribes the sender's number, an opt-in lifts it
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from typing import ClassVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

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
    keys_of,
    text,
)

SIGNATURE = "x-twilio-signature"
IDEMPOTENCY = "i-twilio-idempotency-token"
_T = EventType
_STATUS = {
    "sent": _T.DISPATCHED, "delivered": _T.DELIVERED, "read": _T.READ, "canceled": _T.ABORTED,
    "received": _T.INBOUND_RECEIVED, "receiving": _T.INBOUND_RECEIVED,
}  # fmt: skip
_OPTED_OUT = "21610"
_BAD_NUMBER = frozenset({"30005", "30006", "21211", "21614", "21635"})
# Twilio's default keywords (Advanced Opt-Out sends OptOutType instead).
_STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT",
                         "REVOKE"})  # fmt: skip
_START_WORDS = frozenset({"START", "YES", "UNSTOP"})
_MAPPED = frozenset({"MessageSid", "SmsSid", "MessageStatus", "SmsStatus", "To", "From",
                     "ErrorCode", "Body"})  # fmt: skip


def _url_variants(url: str) -> list[str]:
    """The URL as configured, and with its default port added or taken away."""
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    variants = [url]
    if default is not None:
        if parts.port is None:
            variants.append(urlunsplit(parts._replace(netloc=f"{host}:{default}")))
        elif parts.port == default:
            variants.append(urlunsplit(parts._replace(netloc=host)))
    return variants


def signed_url(configured: str, query: str) -> str:
    """The URL Twilio signed: the setting, with the request's query when it has none."""
    if "?" in configured or not query:
        return configured
    return f"{configured}?{query}"


def form_payload(url: str, body: bytes) -> bytes:
    """What is signed for a form body: the URL, then each name and value, sorted."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise Malformed("the form body is not UTF-8") from None
    return (url + "".join(k + v for k, v in sorted(pairs))).encode()


class Twilio(ProviderDefaults):
    name: ClassVar[str] = "twilio"
    max_body_bytes: ClassVar[int] = 64 << 10  # a message of 1,600 characters and its fields
    kept_headers: ClassVar[tuple[str, ...]] = ("content-type",)

    def __init__(self, auth_tokens: str, public_url: str) -> None:
        self._keys = [k.encode() for k in keys_of(auth_tokens)]
        if not self._keys:
            raise ValueError("no auth token")
        if not public_url.startswith(("https://", "http://")):
            raise ValueError("the public URL is not an http(s) URL")
        self._url = public_url

    def verify(self, request: InboundRequest, now: datetime) -> Verified:
        given = request.header(SIGNATURE)
        if not given:
            raise Forged("the X-Twilio-Signature header is missing")
        try:
            signature = base64.b64decode(given, validate=True)
        except ValueError:
            raise Forged("the signature is not base64") from None
        url = signed_url(self._url, urlsplit(request.url).query)
        body_hash = dict(parse_qsl(urlsplit(url).query)).get("bodySHA256")
        if body_hash is not None:  # a JSON body: the URL carries the body's hash
            if not hmac.compare_digest(body_hash, hashlib.sha256(request.body).hexdigest()):
                raise Forged("the body does not match bodySHA256")
            payloads = [v.encode() for v in _url_variants(url)]
        else:
            payloads = [form_payload(v, request.body) for v in _url_variants(url)]
        expected = [hmac.new(k, p, hashlib.sha1).digest() for k in self._keys for p in payloads]
        if not any_digest_matches(expected, signature):
            raise Forged("no configured auth token verifies the signature for the configured URL")
        token = request.header(IDEMPOTENCY)
        if token:
            return Verified(delivery_id=f"token:{token}")
        params = self._params(request.body)
        sid = params.get("MessageSid") or params.get("SmsSid")
        if not sid:
            raise Malformed("the callback has no MessageSid")
        status = params.get("MessageStatus") or params.get("SmsStatus") or ""
        return Verified(delivery_id=f"{sid}:{status}")

    @staticmethod
    def _params(body: bytes) -> dict[str, str]:
        try:
            return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            raise Malformed("the form body is not UTF-8") from None

    def events(self, delivery: StoredDelivery) -> Parsed:
        params = self._params(delivery.body)
        sid = text(params.get("MessageSid") or params.get("SmsSid"))
        if sid is None:
            raise Malformed("the callback has no MessageSid")
        status = (params.get("MessageStatus") or params.get("SmsStatus") or "").lower()
        inbound = status in ("received", "receiving") or (not status and "Body" in params)
        person = params.get("From" if inbound else "To", "")
        channel = EventChannel.SMS
        if person.startswith("whatsapp:"):
            channel, person = EventChannel.WHATSAPP, person.removeprefix("whatsapp:")
        error = params.get("ErrorCode", "")
        raw: dict[str, object] = {k: v for k, v in params.items() if k not in _MAPPED}
        reason = None
        if inbound:
            kind = _T.INBOUND_RECEIVED
            action = _keyword_action(params)
            if action:
                raw["action"] = action  # read by core/events/effects.py, as for Currents
        elif status in ("failed", "undelivered"):
            kind = _T.DELIVERY_FAILED
            if error == _OPTED_OUT:
                kind = _T.UNSUBSCRIBED
            elif error in _BAD_NUMBER:
                kind = _T.REJECTED
            reason = f"twilio error {error}" if error else status
        else:
            kind = _STATUS.get(status, _T.OTHER)
        if error:
            raw["error_code"] = error
        parsed = Parsed()
        parsed.add(
            event_id=f"twilio:{sid}:{status or 'inbound'}", source="webhook:twilio",
            source_type=status or "inbound", type=kind, channel=channel,
            occurred_at=delivery.received_at, phone=text(person), send_id=sid,
            bounce_reason=reason, raw=raw,
        )  # fmt: skip
        return parsed


def _keyword_action(params: dict[str, str]) -> str | None:
    opt = params.get("OptOutType", "").strip().upper()
    word = params.get("Body", "").strip().upper()
    if opt == "STOP" or (not opt and word in _STOP_WORDS):
        return "unsubscribed"
    if opt == "START" or (not opt and word in _START_WORDS):
        return "subscribed"
    return None
