"""A fake APNs provider API: HTTP/2 over TLS (h2 on asyncio), for tests, demo and bench.

`POST /3/device/<hex token>` with `authorization: bearer <ES256 JWT>`, `apns-topic`,
`apns-push-type`, optional `apns-id`, `apns-priority`, `apns-expiration`,
`apns-collapse-id`. Like APNs it verifies the JWT (key id, team, signature, not older
than an hour, than `tokens_expire_before`, or the token current when `expire_next_token`
was set: 403 ExpiredProviderToken; bad: 403
InvalidProviderToken), the topic (400
TopicDisallowed / DeviceTokenNotForTopic), the token (400 BadDeviceToken), the payload
(413 PayloadTooLarge over 4 KB), answers 410 Unregistered with a `timestamp` for tokens
in `unregistered`, 429 TooManyRequests every `limit_every`-th request and 503 every
`fail_every`-th, and returns `apns-id` on success. Each stream is answered on its own
task, so a fixed `latency_seconds` overlaps across concurrent streams as on APNs.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from devhost.fakes.tls_http import Answer, TlsHttpFake

MAX_PAYLOAD_BYTES = 4096


@dataclass
class FakeApnsState:
    team_id: str = "ABCDE12345"
    key_id: str = "KEY1234567"
    topic: str = "com.example.shop"
    public_key_pem: str = ""
    unregistered: dict[str, int] = field(default_factory=dict)
    """token -> the millisecond timestamp APNs reports it stopped being valid."""
    limit_every: int = 0
    fail_every: int = 0
    latency_seconds: float = 0.0
    max_token_age_seconds: int = 3600
    tokens_expire_before: int = 0
    goaway_after_streams: int = 0
    """Send GOAWAY on each connection after this many requests (0: never)."""
    record_deliveries: bool = True
    """False for benchmarks: count requests without keeping each delivery."""
    expire_next_token: bool = False
    """The next provider token seen is answered (now and later) as ExpiredProviderToken."""
    expired_tokens: set[str] = field(default_factory=set)
    """Provider tokens issued (`iat`) before this Unix second count as expired."""
    requests: int = 0
    delivered: list[dict[str, Any]] = field(default_factory=list)


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class FakeApns(TlsHttpFake):
    http1_control_only = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        super().__init__(host, port, FakeApnsState(**config))
        self._verified: dict[tuple[str, str], tuple[str, str, float]] = {}

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        status, reply, apns_id = self._decide(headers, body)
        reply_headers = [("apns-id", apns_id)]
        if reply:
            reply_headers.append(("content-type", "application/json"))
        return status, reply_headers, json.dumps(reply).encode() if reply else b""

    def _decide(self, headers: dict[str, str], body: bytes) -> tuple[int, Any, str]:
        apns_id = headers.get("apns-id") or str(uuid.uuid4()).upper()
        with self.lock:
            state = self.state
            state.requests += 1
            if state.limit_every and state.requests % state.limit_every == 0:
                return 429, {"reason": "TooManyRequests"}, apns_id
            if state.fail_every and state.requests % state.fail_every == 0:
                return 503, {"reason": "ServiceUnavailable"}, apns_id
            auth = self._check_jwt(headers.get("authorization", ""))
            if auth:
                return 403, {"reason": auth}, apns_id
            path = headers.get(":path", "")
            token = path.removeprefix("/3/device/")
            if headers.get(":method") != "POST" or not path.startswith("/3/device/"):
                return 405, {"reason": "MethodNotAllowed"}, apns_id
            if headers.get("apns-topic") != state.topic:
                return 400, {"reason": "TopicDisallowed"}, apns_id
            if len(token) < 64 or any(c not in "0123456789abcdefABCDEF" for c in token):
                return 400, {"reason": "BadDeviceToken"}, apns_id
            if len(body) > MAX_PAYLOAD_BYTES:
                return 413, {"reason": "PayloadTooLarge"}, apns_id
            if token in state.unregistered:
                return (
                    410,
                    {"reason": "Unregistered", "timestamp": state.unregistered[token]},
                    apns_id,
                )
            try:
                payload = json.loads(body)
            except ValueError:
                return 400, {"reason": "BadPayload"}, apns_id
            if state.record_deliveries:
                push_type = headers.get("apns-push-type")
                state.delivered.append({"token": token, "payload": payload, "apns_id": apns_id,
                                        "push_type": push_type})  # fmt: skip
            return 200, None, apns_id

    def _check_jwt(self, authorization: str) -> str | None:
        """None if the provider token is good, else APNs' reason."""
        state = self.state
        if not authorization.lower().startswith("bearer "):
            return "MissingProviderToken"
        jwt = authorization[7:]
        known = self._verified.get((jwt, state.public_key_pem))  # verified once, as APNs does
        if known is None:
            try:
                header_part, claims_part, signature_part = jwt.split(".")
                header, claims = json.loads(_b64(header_part)), json.loads(_b64(claims_part))
                signature = _b64(signature_part)
                key = serialization.load_pem_public_key(state.public_key_pem.encode())
                assert isinstance(key, ec.EllipticCurvePublicKey)
                der = encode_dss_signature(
                    int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
                )
                key.verify(der, f"{header_part}.{claims_part}".encode(), ec.ECDSA(hashes.SHA256()))
            except (ValueError, InvalidSignature, AssertionError, KeyError):
                return "InvalidProviderToken"
            known = (str(header.get("alg")) + "/" + str(header.get("kid")),
                     str(claims.get("iss")), float(claims.get("iat", 0)))  # fmt: skip
            self._verified[(jwt, state.public_key_pem)] = known
        if state.expire_next_token:
            state.expire_next_token = False
            state.expired_tokens.add(jwt)
        if jwt in state.expired_tokens:
            return "ExpiredProviderToken"
        key_ref, issuer, issued = known
        if key_ref != f"ES256/{state.key_id}" or issuer != state.team_id:
            return "InvalidProviderToken"
        if (
            time.time() - issued > state.max_token_age_seconds
            or issued < state.tokens_expire_before
        ):
            return "ExpiredProviderToken"
        return None


def signing_key_pair() -> tuple[str, str]:
    """A new APNs-style P-256 key: the .p8 (PKCS#8 PEM) for the app settings, and the
    public key PEM for the fake."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()  # fmt: skip
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public
