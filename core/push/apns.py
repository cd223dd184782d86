"""APNs provider API over HTTP/2 with token auth: `POST /3/device/<token>`.

One ES256 provider token per team, key and environment, minted on first use and reused
for 40 minutes (Apple: refresh no more than every 20 and no less than every 60 minutes);
a 403 ExpiredProviderToken mints a new one and retries once. Requests multiplex as
streams over a few HTTP/2 connections (core/push/h2client.py; the client is injectable). Answers:

    200                                               -> sent (`apns-id` kept)
    410 Unregistered (with `timestamp`)               -> dead token, if registered before
    400 BadDeviceToken / DeviceTokenNotForTopic /
        TopicDisallowed                               -> dead token
    403 other (InvalidProviderToken, ...)             -> ConfigError: this app's setup
    429, 5xx, dropped streams                         -> retried with backoff, bounded
    any other 4xx                                     -> failed (a bug in the request)
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from core.errors import ConfigError, TransientError
from core.events.model import epoch_millis
from core.push.apps import PushApp
from core.push.h2client import H2Client, StreamNotProcessed
from core.push.outcome import SendOutcome
from core.push.provider import PushProvider
from core.push.retry import Attempts
from core.push.templates import PushTemplate, RenderedMessage, apns_payload
from core.push.tokens import Device

PRODUCTION = "https://api.push.apple.com"
SANDBOX = "https://api.sandbox.push.apple.com"
TOKEN_LIFETIME_SECONDS = 40 * 60
_DEAD_400 = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic", "TopicDisallowed"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ProviderToken:
    """The ES256 JWT APNs wants, cached for TOKEN_LIFETIME_SECONDS."""

    def __init__(self, team_id: str, key_id: str, private_key_pem: str) -> None:
        try:
            key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"the APNs signing key does not load: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("the APNs signing key is not an EC (P-256) key")
        self._key = key
        self._header = _b64(orjson.dumps({"alg": "ES256", "kid": key_id}))
        self._team_id = team_id
        self._token = ""
        self._header_value = b""
        self._issued_at = 0.0
        self.mints = 0

    def get(self, *, fresh: bool = False) -> str:
        now = time.time()
        if fresh or not self._token or now - self._issued_at >= TOKEN_LIFETIME_SECONDS:
            claims = _b64(orjson.dumps({"iss": self._team_id, "iat": int(now)}))
            signing_input = f"{self._header}.{claims}".encode()
            r, s = decode_dss_signature(self._key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            signature = _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
            self._token, self._issued_at = f"{self._header}.{claims}.{signature}", now
            self._header_value = f"bearer {self._token}".encode()
            self.mints += 1
        return self._token

    def header(self, *, rejected: bytes = b"") -> bytes:
        """The `authorization` header value. When APNs `rejected` the current one as
        expired, a new token is minted once, however many streams saw the rejection."""
        self.get(fresh=bool(rejected) and rejected == self._header_value)
        return self._header_value


class ApnsSender:
    def __init__(
        self,
        topic: str,
        provider_token: ProviderToken,
        *,
        endpoint: str = PRODUCTION,
        client: H2Client | None = None,
        max_attempts: int = 5,
    ) -> None:
        self.topic = topic
        self._token = provider_token
        self._client = client or H2Client(endpoint)
        self._topic = topic.encode()
        self.max_attempts = max_attempts

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(
        self,
        device_token: str,
        payload: bytes,
        *,
        push_type: str = "alert",
        priority: int = 10,
        expiration: int | None = None,
        collapse_id: str | None = None,
        apns_id: str | None = None,
        registered_at_ms: int | None = None,
    ) -> SendOutcome:
        headers = [
            (b"apns-topic", self._topic),
            (b"apns-push-type", push_type.encode()),
            (b"apns-priority", str(priority).encode()),
        ]
        if expiration is not None:
            headers.append((b"apns-expiration", str(expiration).encode()))
        if collapse_id:
            headers.append((b"apns-collapse-id", collapse_id.encode()))
        if apns_id:
            headers.append((b"apns-id", apns_id.encode()))
        path = f"/3/device/{device_token}"
        attempts = Attempts("APNs", max_attempts=self.max_attempts)
        rejected = b""
        while True:
            authorization = (b"authorization", self._token.header(rejected=rejected))
            try:
                response = await self._client.post(path, [*headers, authorization], payload)
            except StreamNotProcessed as exc:
                await attempts.after_not_processed(str(exc))  # it never reached the server
                continue
            except TransientError as exc:
                await attempts.after_failure(str(exc))
                continue
            status = response.status
            if status == 200:
                return SendOutcome("sent", message_id=response.header("apns-id"),
                                   retries=attempts.retries,
                                   rate_limited_waits=attempts.rate_limited_waits)  # fmt: skip
            reason = _reason(response.body)
            if status == 403 and reason == "ExpiredProviderToken" and not rejected:
                rejected = authorization[1]
                continue
            if status == 403:
                raise ConfigError(f"APNs refuses this app's provider token: {reason}")
            if status == 429:
                await attempts.after_rate_limit(f"429 {reason}")
                continue
            if status >= 500:
                await attempts.after_failure(f"answered {status} {reason}")
                continue
            return _outcome(status, response.body, reason, registered_at_ms, attempts)


def _reason(body: bytes) -> str:
    if not body:
        return ""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    return str(parsed.get("reason", "")) if isinstance(parsed, dict) else ""


def _outcome(
    status: int, body: bytes, reason: str, registered_at_ms: int | None, attempts: Attempts
) -> SendOutcome:
    retries, waits = attempts.retries, attempts.rate_limited_waits
    if status == 410:
        try:
            stopped = int(orjson.loads(body).get("timestamp"))
        except (TypeError, ValueError, orjson.JSONDecodeError):
            stopped = None
        # A token registered after APNs saw it die is a new registration: keep it.
        dead = registered_at_ms is None or stopped is None or registered_at_ms < stopped
        return SendOutcome("dead_token" if dead else "failed", reason or "Unregistered",
                           retries=retries, rate_limited_waits=waits,
                           unregistered_at_ms=stopped)  # fmt: skip
    outcome = "dead_token" if status == 400 and reason in _DEAD_400 else "failed"
    return SendOutcome(outcome, reason or str(status), retries=retries,
                       rate_limited_waits=waits)  # fmt: skip


class ApnsProvider(PushProvider):
    """A dispatch's template on APNs: alert pushes with its priority, expiry and collapse id."""

    platform = "ios"

    def __init__(
        self, topic: str, token: ProviderToken, template: PushTemplate, *, client: H2Client
    ) -> None:
        self._token = token
        self._sender = ApnsSender(topic, token, client=client)
        self._template = template
        self._priority = 10 if template.priority == "high" else 5
        self._expiration = (
            int(time.time()) + template.ttl_seconds if template.ttl_seconds is not None else None
        )

    @staticmethod
    def origin_for(app: PushApp) -> str:
        assert app.apns is not None
        return SANDBOX if app.apns.environment == "sandbox" else PRODUCTION

    async def validate(self) -> None:
        self._token.get()  # the key parsed when the token was made; this proves it signs

    def encode(self, message: RenderedMessage, device: Device) -> bytes:
        return apns_payload(message, self._template)

    async def send(self, device: Device, body: bytes) -> SendOutcome:
        return await self._sender.send(
            device.token, body, priority=self._priority, expiration=self._expiration,
            collapse_id=self._template.collapse_id,
            registered_at_ms=epoch_millis(device.registered_at),
        )  # fmt: skip

    async def aclose(self) -> None:
        await self._sender.aclose()
