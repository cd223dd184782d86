"""A fake FCM: the OAuth2 token endpoint and HTTP v1 `messages:send`, for tests and demo.

`POST /token` takes the JWT-bearer grant google-auth sends (`grant_type`, `assertion`),
verifies the RS256 signature against the service account's public key, the audience,
issuer, scope and lifetime, and issues an access token (`expires_in` configurable).
`POST /v1/projects/{project}/messages:send` wants a live access token (401
UNAUTHENTICATED otherwise), a known project (403 SENDER_ID_MISMATCH for a token of
another project), and answers FCM's error shape (`error.status`, `details[].errorCode`):
404 UNREGISTERED for tokens in `unregistered`, 400 INVALID_ARGUMENT for malformed ones,
429 QUOTA_EXCEEDED with Retry-After every `limit_every`-th send, 503 UNAVAILABLE every
`fail_every`-th. `GET /_fake/sent` lists what was delivered. HTTPS, HTTP/2 or HTTP/1.1
(devhost/fakes/tls_http.py), as on fcm.googleapis.com and oauth2.googleapis.com.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from devhost.fakes.tls_http import Answer, TlsHttpFake

Reply = tuple[int, Any, dict[str, str]]

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
# FCM HTTP v1 accepts either scope (the Admin SDK asks for cloud-platform).
ACCEPTED_SCOPES = {SCOPE, "https://www.googleapis.com/auth/cloud-platform"}


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@dataclass
class FakeFcmState:
    project_id: str = "example-shop"
    public_key_pem: str = ""
    client_email: str = "switchboard@example-shop.iam.gserviceaccount.com"
    token_lifetime: int = 3600
    unregistered: set[str] = field(default_factory=set)
    limit_every: int = 0
    fail_every: int = 0
    latency_seconds: float = 0.0
    goaway_after_streams: int = 0
    """Send GOAWAY on each connection after this many requests (0: never)."""
    record_deliveries: bool = True
    """False for benchmarks: count sends without keeping each message."""
    sends: int = 0
    tokens_issued: int = 0
    access_tokens: dict[str, float] = field(default_factory=dict)
    sent: list[dict[str, Any]] = field(default_factory=list)


def service_account_for(fake_url: str, project_id: str) -> tuple[dict[str, Any], str]:
    """A new RSA key pair: the service account JSON for the client, the public key PEM
    for the fake."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": private,
        "client_email": f"switchboard@{project_id}.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": f"{fake_url}/token",
    }
    return info, public


class FakeFcm(TlsHttpFake):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        super().__init__(host, port, FakeFcmState(**config))

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        route = {"GET": self._get, "POST": self._post}.get(method)
        status, reply, reply_headers = (
            route(path, headers, body) if route else (405, {"error": {"code": 405}}, {})
        )
        return (status, [("content-type", "application/json; charset=UTF-8"),
                         *reply_headers.items()], json.dumps(reply).encode())  # fmt: skip

    def expire_access_tokens(self) -> None:
        with self.lock:
            self.state.access_tokens.clear()

    def _get(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path == "/_fake/sent":
            with self.lock:
                return 200, self.state.sent, {}
        return 404, {"error": {"code": 404, "status": "NOT_FOUND"}}, {}

    def _post(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path == "/token":
            return self._token(body)
        prefix = f"/v1/projects/{self.state.project_id}/messages:send"
        if path.startswith("/v1/projects/") and path.endswith("/messages:send"):
            return self._send(path == prefix, headers, body)
        return 404, {"error": {"code": 404, "status": "NOT_FOUND"}}, {}

    def _token(self, body: bytes) -> Reply:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return 400, {"error": "unsupported_grant_type"}, {}
        try:
            header_part, claims_part, signature = form["assertion"].split(".")
            key = serialization.load_pem_public_key(self.state.public_key_pem.encode())
            assert isinstance(key, rsa.RSAPublicKey)
            key.verify(
                _b64(signature), f"{header_part}.{claims_part}".encode(),
                padding.PKCS1v15(), hashes.SHA256(),
            )  # fmt: skip
            claims = json.loads(_b64(claims_part))
        except (KeyError, ValueError, InvalidSignature, AssertionError):
            return (
                400,
                {"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
                {},
            )
        now = time.time()
        valid = (
            claims.get("iss") == self.state.client_email
            and ACCEPTED_SCOPES & set(str(claims.get("scope", "")).split())
            and claims.get("aud", "").endswith("/token")
            and claims.get("iat", 0) - 300 <= now <= claims.get("exp", 0)
            and claims["exp"] - claims["iat"] <= 3600
        )
        if not valid:
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT claims."}, {}
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        with self.lock:
            self.state.tokens_issued += 1
            self.state.access_tokens[token] = now + self.state.token_lifetime
        return 200, {"access_token": token, "expires_in": self.state.token_lifetime,
                     "token_type": "Bearer"}, {}  # fmt: skip

    def _send(self, own_project: bool, headers: dict[str, str], body: bytes) -> Reply:
        bearer = headers.get("authorization", "")
        with self.lock:
            state = self.state
            expiry = state.access_tokens.get(bearer.removeprefix("Bearer "))
            if expiry is None or expiry < time.time():
                return _error(401, "UNAUTHENTICATED", "Request had invalid credentials.")
            state.sends += 1
            if state.limit_every and state.sends % state.limit_every == 0:
                return (*_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED")[:2],
                        {"Retry-After": "0.05"})  # fmt: skip
            if state.fail_every and state.sends % state.fail_every == 0:
                return _error(503, "UNAVAILABLE", "The service is unavailable.", "UNAVAILABLE")
            if not own_project:
                return _error(403, "PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH")
            try:
                message = json.loads(body)["message"]
                token = str(message["token"])
            except (ValueError, KeyError, TypeError):
                return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
            if len(token) < 100:
                return _error(400, "INVALID_ARGUMENT",
                              "The registration token is not a valid FCM registration token",
                              "INVALID_ARGUMENT")  # fmt: skip
            if token in state.unregistered:
                return _error(404, "NOT_FOUND", "Requested entity was not found.", "UNREGISTERED")
            name = f"projects/{state.project_id}/messages/{secrets.token_hex(8)}"
            if state.record_deliveries:
                state.sent.append({"name": name, "message": message})
        return 200, {"name": name}, {}


def _error(status: int, grpc_status: str, message: str, fcm_code: str | None = None) -> Reply:
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    if fcm_code:
        error["details"] = [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": fcm_code}
        ]
    return status, {"error": error}, {}
