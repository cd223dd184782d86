"""Webhook senders for tests, the demo and the bench: each provider's requests, signed for
real with test keys made here, so the app's verification is the one that runs.

    StandardSender   Standard Webhooks headers (whsec_ secret, v1 HMAC), via the package
    SendGridSender   ECDSA P-256 over timestamp + body; its public key as SendGrid shows it
    MailgunSender    HMAC-SHA256 over timestamp + token inside the JSON body
    TwilioSender     HMAC-SHA1 over the configured URL + sorted form parameters
    SnsSender        SNS envelopes signed with an RSA key (SignatureVersion 1 or 2) whose
                     self-signed certificate a loopback server hands out, with a
                     SubscribeURL that records confirmations

Each `request(...)` returns (headers, body) for `POST /api/webhooks/<provider>`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from standardwebhooks.webhooks import Webhook

Request = tuple[dict[str, str], bytes]


def _now_seconds() -> int:
    return int(time.time())


class StandardSender:
    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret or "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()

    def request(
        self, event: dict[str, Any], *, webhook_id: str | None = None, at: int | None = None,
        body: bytes | None = None,
    ) -> Request:  # fmt: skip
        payload = body if body is not None else orjson.dumps(event)
        msg_id = webhook_id or f"msg_{uuid.uuid4().hex}"
        stamp = at if at is not None else _now_seconds()
        signature = Webhook(self.secret).sign(msg_id, datetime.fromtimestamp(stamp, UTC), payload)
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(stamp),
                   "webhook-signature": signature, "content-type": "application/json"}  # fmt: skip
        return headers, payload

    @staticmethod
    def event(kind: str, data: dict[str, Any], at: datetime | None = None) -> dict[str, Any]:
        moment = at or datetime.now(UTC)
        return {"type": kind, "timestamp": moment.isoformat(), "data": data}


class SendGridSender:
    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key = base64.b64encode(der).decode()

    def request(
        self, events: list[dict[str, Any]] | None = None, *, at: int | None = None,
        body: bytes | None = None,
    ) -> Request:  # fmt: skip
        payload = body if body is not None else orjson.dumps(events or []) + b"\r\n"
        stamp = str(at if at is not None else _now_seconds())
        signature = self._key.sign(stamp.encode() + payload, ec.ECDSA(hashes.SHA256()))
        headers = {
            "x-twilio-email-event-webhook-signature": base64.b64encode(signature).decode(),
            "x-twilio-email-event-webhook-timestamp": stamp,
            "content-type": "application/json",
        }
        return headers, payload

    @staticmethod
    def event(kind: str, email: str, **fields: Any) -> dict[str, Any]:
        return {"email": email, "timestamp": _now_seconds(), "event": kind,
                "sg_event_id": base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="),
                "sg_message_id": f"{uuid.uuid4().hex[:22]}.filter0001", **fields}  # fmt: skip


class MailgunSender:
    def __init__(self, key: str | None = None) -> None:
        self.key = key or secrets.token_hex(16)

    def request(
        self, event_data: dict[str, Any], *, token: str | None = None, at: int | None = None,
        body: bytes | None = None,
    ) -> Request:  # fmt: skip
        stamp = str(at if at is not None else _now_seconds())
        token = token or secrets.token_hex(25)
        signature = hmac.new(self.key.encode(), (stamp + token).encode(), hashlib.sha256)
        document = {
            "signature": {"timestamp": stamp, "token": token, "signature": signature.hexdigest()},
            "event-data": event_data,
        }
        return {"content-type": "application/json"}, body or orjson.dumps(document)

    @staticmethod
    def event(kind: str, recipient: str, **fields: Any) -> dict[str, Any]:
        return {"event": kind, "timestamp": time.time(), "id": secrets.token_urlsafe(16),
                "recipient": recipient, **fields}  # fmt: skip


class TwilioSender:
    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.token = token or secrets.token_hex(16)

    def request(self, params: dict[str, str], *, url: str | None = None) -> Request:
        signed = (url or self.url) + "".join(k + v for k, v in sorted(params.items()))
        digest = hmac.new(self.token.encode(), signed.encode(), hashlib.sha1).digest()
        headers = {"x-twilio-signature": base64.b64encode(digest).decode(),
                   "content-type": "application/x-www-form-urlencoded"}  # fmt: skip
        return headers, urlencode(params).encode()

    @staticmethod
    def status(
        to: str, status: str, error: str | None = None, sid: str | None = None
    ) -> dict[str, str]:
        params = {
            "MessageSid": sid or "SM" + secrets.token_hex(16), "MessageStatus": status,
            "SmsStatus": status, "To": to, "From": "+15005550006",
            "AccountSid": "AC" + "0" * 32, "ApiVersion": "2010-04-01",
        }  # fmt: skip
        if error:
            params["ErrorCode"] = error
        return params

    @staticmethod
    def inbound(sender: str, body: str, opt_out: str | None = None) -> dict[str, str]:
        params = {"MessageSid": "SM" + secrets.token_hex(16), "SmsStatus": "received",
                  "From": sender, "To": "+15005550006", "Body": body, "NumMedia": "0",
                  "AccountSid": "AC" + "0" * 32}  # fmt: skip
        if opt_out:
            params["OptOutType"] = opt_out
        return params


class _CertHandler(BaseHTTPRequestHandler):
    server: _CertServer

    def do_GET(self) -> None:
        if self.path.endswith(".pem"):
            body, status = self.server.pem, 200
        elif "Action=ConfirmSubscription" in self.path:
            self.server.confirmations.append(self.path)
            body, status = b"<ConfirmSubscriptionResponse/>", 200
        else:
            body, status = b"not found", 404
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


class _CertServer(ThreadingHTTPServer):
    daemon_threads = True
    pem: bytes
    confirmations: list[str]


class SnsSender:
    """Signs like SNS; `start()` serves the certificate on loopback (`cert_url`)."""

    CERT_URL_PATTERN = r"http://127\.0\.0\.1:[0-9]+/[^?#]+\.pem"

    def __init__(self, topic_arn: str = "arn:aws:sns:eu-west-1:123456789012:ses-events") -> None:
        self.topic_arn = topic_arn
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.test.amazonaws.com")])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
            .sign(self._key, hashes.SHA256())
        )  # fmt: skip
        self._server = _CertServer(("127.0.0.1", 0), _CertHandler)
        self._server.pem = certificate.public_bytes(serialization.Encoding.PEM)
        self._server.confirmations = []
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.cert_url = f"{self.base}/SimpleNotificationService-test.pem"

    @property
    def confirmations(self) -> list[str]:
        return self._server.confirmations

    def start(self) -> SnsSender:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def envelope(
        self, message: dict[str, Any] | str, *, kind: str = "Notification", version: str = "2",
        at: datetime | None = None, message_id: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        text = message if isinstance(message, str) else orjson.dumps(message).decode()
        envelope: dict[str, Any] = {
            "Type": kind, "MessageId": message_id or str(uuid.uuid4()),
            "TopicArn": self.topic_arn, "Message": text,
            "Timestamp": (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "SignatureVersion": version, "SigningCertURL": self.cert_url,
        }  # fmt: skip
        if kind != "Notification":
            envelope["Token"] = secrets.token_hex(32)
            envelope["SubscribeURL"] = (
                f"{self.base}/?Action=ConfirmSubscription&TopicArn={self.topic_arn}"
                f"&Token={envelope['Token']}"
            )
        keys = ("Message", "MessageId", "Subject", "SubscribeURL", "Timestamp", "Token",
                "TopicArn", "Type")  # fmt: skip
        signed = "".join(f"{k}\n{envelope[k]}\n" for k in sorted(keys) if k in envelope)
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()  # noqa: S303 - SNS v1
        signature = self._key.sign(signed.encode(), padding.PKCS1v15(), algorithm)
        envelope["Signature"] = base64.b64encode(signature).decode()
        return envelope

    def request(self, envelope: dict[str, Any]) -> Request:
        headers = {"x-amz-sns-message-type": str(envelope["Type"]),
                   "x-amz-sns-message-id": str(envelope["MessageId"]),
                   "x-amz-sns-topic-arn": self.topic_arn,
                   "content-type": "text/plain; charset=UTF-8"}  # fmt: skip
        return headers, orjson.dumps(envelope)

    @staticmethod
    def bounce(recipients: list[str], permanent: bool = True) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat()
        return {
            "notificationType": "Bounce",
            "bounce": {
                "bounceType": "Permanent" if permanent else "Transient",
                "bounceSubType": "General", "timestamp": now, "feedbackId": uuid.uuid4().hex,
                "bouncedRecipients": [
                    {"emailAddress": r, "action": "failed", "status": "5.1.1",
                     "diagnosticCode": "smtp; 550 5.1.1 user unknown"} for r in recipients
                ],
            },
            "mail": {"timestamp": now, "messageId": uuid.uuid4().hex, "source": "news@shop.test",
                     "destination": recipients},
        }  # fmt: skip

    @staticmethod
    def complaint(recipients: list[str]) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat()
        return {
            "notificationType": "Complaint",
            "complaint": {"complainedRecipients": [{"emailAddress": r} for r in recipients],
                          "timestamp": now, "feedbackId": uuid.uuid4().hex,
                          "complaintFeedbackType": "abuse"},
            "mail": {"timestamp": now, "messageId": uuid.uuid4().hex, "source": "news@shop.test",
                     "destination": recipients},
        }  # fmt: skip
