"""Amazon SES notifications through an SNS HTTPS subscription.

The SNS envelope is verified, not the SES message inside it: SignatureVersion 1 (RSA
SHA-1) or 2 (RSA SHA-256) over `Key\\nValue\\n` of the type's signed keys in byte order,
with the certificate at `SigningCertURL`. That URL comes from the request, so it is checked
against a pattern (a setting; by default https on an `sns.<region>.amazonaws.com` host and a
`.pem` path) before anything is fetched; certificates are fetched without redirects,
bounded in size and cached by URL. Only the configured topic ARNs are accepted.
A subscription confirmation is confirmed by fetching its `SubscribeURL`, which must be on
the certificate URL's own origin. SNS counts any answer from 200 to 499 as delivered and
retries 5xx (by default 3 times, 20 s apart), each retry with the same MessageId, the
delivery's id; the signed `Timestamp` is the first attempt's, so its tolerance is the
subscription's retry window (SWITCHBOARD_WEBHOOK_SNS_MAX_AGE_SECONDS), not 5 minutes.

    Bounce Permanent -> bounced_hard (each bounced recipient)
    Bounce Transient / Undetermined -> bounced_soft
    Complaint -> spam_complaint (each complained recipient; feedback type not-spam: other)
    Delivery -> delivered; with event publishing also Send, Reject, Open, Click,
    DeliveryDelay, Subscription
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import urlsplit

import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

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
    json_body,
    keys_of,
    text,
    within,
)

_SIGNED_KEYS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token",
                                 "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token",
                                "TopicArn", "Type"),
}  # fmt: skip
_HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}
_MAX_CERT_BYTES = 64 << 10
_T = EventType
_SIMPLE = {
    "delivery": _T.DELIVERED, "send": _T.SENT, "reject": _T.REJECTED, "open": _T.OPENED,
    "click": _T.CLICKED, "deliverydelay": _T.DEFERRED, "subscription": _T.SUBSCRIPTION_CHANGED,
}  # fmt: skip

Fetch = Callable[[str], bytes]


def fetch_https(url: str) -> bytes:
    """GET without redirects, bounded in time and size."""
    with requests.get(url, timeout=5, allow_redirects=False, stream=True) as answer:
        if answer.status_code != 200:
            raise OSError(f"fetching a certificate answered {answer.status_code}")
        data = answer.raw.read(_MAX_CERT_BYTES + 1, decode_content=True)
    if len(data) > _MAX_CERT_BYTES:
        raise OSError("the certificate is larger than expected")
    return bytes(data)


def string_to_sign(envelope: dict[str, Any]) -> bytes:
    keys = _SIGNED_KEYS[str(envelope["Type"])]
    present = [k for k in keys if envelope.get(k) is not None]
    return "".join(f"{k}\n{envelope[k]}\n" for k in sorted(present)).encode()


def _envelope(body: bytes) -> dict[str, Any]:
    envelope = json_body(body)
    if not isinstance(envelope, dict) or envelope.get("Type") not in _SIGNED_KEYS:
        raise Malformed("the body is not an SNS message")
    if not all(isinstance(envelope.get(k), str) for k in ("MessageId", "Timestamp", "TopicArn")):
        raise Malformed("the SNS message lacks MessageId, Timestamp or TopicArn")
    return envelope


class AmazonSes(ProviderDefaults):
    name: ClassVar[str] = "ses"
    max_body_bytes: ClassVar[int] = 320 << 10  # SNS: 256 KB of message, and its envelope

    def __init__(
        self,
        topic_arns: str,
        max_age: timedelta,
        cert_url_pattern: str,
        fetch: Fetch = fetch_https,
    ) -> None:
        self._topics = frozenset(keys_of(topic_arns))
        if not self._topics:
            raise ValueError("no topic ARN")
        self._pattern = re.compile(cert_url_pattern)
        self._max_age = max_age
        self._fetch = fetch
        self._certs: dict[str, rsa.RSAPublicKey] = {}
        self._lock = threading.Lock()

    def verify(self, request: InboundRequest, now: datetime) -> Verified:
        envelope = _envelope(request.body)
        if envelope["TopicArn"] not in self._topics:
            raise Forged("the topic is not one of SWITCHBOARD_WEBHOOK_SNS_TOPIC_ARNS")
        version = str(envelope.get("SignatureVersion", ""))
        if version not in _HASHES:
            raise Forged("unknown SignatureVersion")
        cert_url = envelope.get("SigningCertURL")
        if not isinstance(cert_url, str) or not self._pattern.fullmatch(cert_url):
            raise Forged("SigningCertURL is not an allowed certificate URL")
        try:
            signature = base64.b64decode(str(envelope.get("Signature", "")), validate=True)
        except binascii.Error:
            raise Forged("the signature is not base64") from None
        key = self._key(cert_url)
        try:
            key.verify(signature, string_to_sign(envelope), padding.PKCS1v15(), _HASHES[version]())
        except (InvalidSignature, ValueError):
            raise Forged("the certificate does not verify the signature") from None
        try:
            moment = datetime.fromisoformat(envelope["Timestamp"])
        except ValueError:
            raise Malformed("the Timestamp is not an ISO time") from None
        within(moment, now, self._max_age)
        if envelope["Type"] == "SubscriptionConfirmation":
            return Verified(delivery_id=envelope["MessageId"], reply=self._confirm(envelope))
        if envelope["Type"] == "UnsubscribeConfirmation":
            return Verified(delivery_id=envelope["MessageId"], reply={"unsubscribed": True})
        return Verified(delivery_id=envelope["MessageId"])

    def _key(self, url: str) -> rsa.RSAPublicKey:
        with self._lock:
            cached = self._certs.get(url)
        if cached is not None:
            return cached
        try:
            pem = self._fetch(url)
        except requests.RequestException as exc:  # answered with retry_status: SNS sends again
            raise OSError("the signing certificate could not be fetched") from exc
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise Forged("the signing certificate could not be read") from None
        key = certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise Forged("the signing certificate has no RSA key")
        with self._lock:
            self._certs[url] = key
        return key

    def _confirm(self, envelope: dict[str, Any]) -> dict[str, Any]:
        subscribe = envelope.get("SubscribeURL")
        cert = urlsplit(str(envelope["SigningCertURL"]))
        target = urlsplit(subscribe) if isinstance(subscribe, str) else None
        if target is None or (target.scheme, target.netloc) != (cert.scheme, cert.netloc):
            raise Forged("SubscribeURL is not on the certificate's host")
        try:
            self._fetch(str(subscribe))  # OSError: answered with retry_status, SNS sends again
        except requests.RequestException as exc:
            raise OSError("confirming the subscription failed") from exc
        return {"confirmed": True, "topic": envelope["TopicArn"]}

    def events(self, delivery: StoredDelivery) -> Parsed:
        envelope = _envelope(delivery.body)
        message = json_body(str(envelope.get("Message", "")), "the SNS Message")
        if not isinstance(message, dict):
            raise Malformed("the SNS Message is not an SES notification")
        parsed = Parsed()
        kind = str(message.get("notificationType") or message.get("eventType") or "")
        mail = message.get("mail") if isinstance(message.get("mail"), dict) else {}
        assert isinstance(mail, dict)
        common = {
            "source": "webhook:ses", "source_type": kind, "channel": EventChannel.EMAIL,
            "send_id": text(mail.get("messageId")),
        }  # fmt: skip
        base = f"ses:{envelope['MessageId']}"
        for n, (recipient, event_type, detail) in enumerate(_recipients(kind, message, mail)):
            moment = _moment(detail.get("timestamp")) or _moment(mail.get("timestamp"))
            if moment is None:
                parsed.skip("missing_timestamp")
                continue
            parsed.add(
                **common, event_id=f"{base}:{n}:{digest(recipient or '')[:12]}",
                type=event_type, occurred_at=moment, email=text(recipient),
                bounce_reason=text(detail.get("reason")), url=text(detail.get("url"), 2000),
                subscription_status=text(detail.get("status")),
                raw={k: v for k, v in detail.items() if k not in ("reason", "url", "timestamp")},
            )  # fmt: skip
        if not parsed.events and not parsed.invalid:
            parsed.skip(f"no_recipients_in_{kind.lower() or 'notification'}")
        return parsed


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _recipients(
    kind: str, message: dict[str, Any], mail: dict[str, Any]
) -> list[tuple[str | None, EventType, dict[str, Any]]]:
    """(recipient, type, detail) per person the notification is about."""
    key = kind[:1].lower() + kind[1:] if kind else ""
    section = message.get(key) if isinstance(message.get(key), dict) else {}
    assert isinstance(section, dict)
    destination = [d for d in mail.get("destination", []) if isinstance(d, str)]
    if kind == "Bounce":
        hard = section.get("bounceType") == "Permanent"
        detail = {"timestamp": section.get("timestamp"), "bounceType": section.get("bounceType"),
                  "bounceSubType": section.get("bounceSubType")}  # fmt: skip
        found = []
        for item in section.get("bouncedRecipients", []):
            if isinstance(item, dict):
                reason = item.get("diagnosticCode") or item.get("status")
                found.append((text(item.get("emailAddress")),
                              _T.BOUNCED_HARD if hard else _T.BOUNCED_SOFT,
                              {**detail, "reason": reason}))  # fmt: skip
        return found
    if kind == "Complaint":
        feedback = section.get("complaintFeedbackType")
        event_type = _T.OTHER if feedback == "not-spam" else _T.SPAM_COMPLAINT
        detail = {"timestamp": section.get("timestamp"), "complaintFeedbackType": feedback}
        return [
            (text(item.get("emailAddress")), event_type, detail)
            for item in section.get("complainedRecipients", []) if isinstance(item, dict)
        ]  # fmt: skip
    event_type = _SIMPLE.get(kind.lower(), _T.OTHER)
    recipients = section.get("recipients") if kind == "Delivery" else None
    people = [r for r in recipients if isinstance(r, str)] if isinstance(recipients, list) else None
    detail = {"timestamp": section.get("timestamp")}
    if kind == "Click":
        detail["url"] = section.get("link")
    if kind == "Reject":
        detail["reason"] = section.get("reason")
    return [(person, event_type, detail) for person in (people or destination)]
