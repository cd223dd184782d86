"""APNs provider API over HTTP/2 with token auth: `POST /3/device/<token>`.

One ES256 provider token per team, key and environment, minted on first use and reused
for 40 minutes (Apple: refresh no more than every 20 and no less than every 60 minutes);
a 403 ExpiredProviderToken mints a new one and retries once. Requests multiplex as
streams over the client's HTTP/2 connections (httpx; the client is injectable). Answers:

    200                                               -> sent (`apns-id` kept)
    410 Unregistered (with `timestamp`)               -> dead token, if registered before
    400 BadDeviceToken / DeviceTokenNotForTopic /
        TopicDisallowed                               -> dead token
    403 other (InvalidProviderToken, ...)             -> ConfigError: this app's setup
    429, 5xx, dropped streams                         -> retried with backoff, bounded
    any other 4xx                                     -> failed (a bug in the request)
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from typing import Any

import httpx
import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from core.errors import ConfigError, TransientError
from core.push.outcome import SendOutcome

PRODUCTION = "https://api.push.apple.com"
SANDBOX = "https://api.sandbox.push.apple.com"
TOKEN_LIFETIME_SECONDS = 40 * 60
_DEAD_400 = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic", "TopicDisallowed"})
_MAX_BACKOFF_SECONDS = 30.0


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
            self.mints += 1
        return self._token


class ApnsSender:
    def __init__(
        self,
        topic: str,
        provider_token: ProviderToken,
        *,
        endpoint: str = PRODUCTION,
        client: httpx.AsyncClient | None = None,
        max_attempts: int = 5,
    ) -> None:
        self.topic = topic
        self._token = provider_token
        self._endpoint = endpoint.rstrip("/")
        self._client = client or httpx.AsyncClient(http2=True, timeout=30.0)
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
        headers = {"apns-topic": self.topic, "apns-push-type": push_type,
                   "apns-priority": str(priority)}  # fmt: skip
        if expiration is not None:
            headers["apns-expiration"] = str(expiration)
        if collapse_id:
            headers["apns-collapse-id"] = collapse_id
        if apns_id:
            headers["apns-id"] = apns_id
        url = f"{self._endpoint}/3/device/{device_token}"
        retries = waits = 0
        refreshed = False
        while True:
            headers["authorization"] = f"bearer {self._token.get(fresh=refreshed)}"
            try:
                response = await self._client.post(url, content=payload, headers=headers)
            except httpx.TransportError as exc:
                retries += 1
                await self._backoff(retries, f"{type(exc).__name__} calling APNs")
                continue
            reason = _reason(response)
            status = response.status_code
            if status == 200:
                return SendOutcome("sent", message_id=response.headers.get("apns-id", ""),
                                   retries=retries, rate_limited_waits=waits)  # fmt: skip
            if status == 403 and reason == "ExpiredProviderToken" and not refreshed:
                refreshed = True
                continue
            if status == 403:
                raise ConfigError(f"APNs refuses this app's provider token: {reason}")
            if status == 429 or status >= 500:
                waits += status == 429
                retries += status != 429
                await self._backoff(retries + waits, f"APNs answered {status} {reason}")
                continue
            return _outcome(response, reason, registered_at_ms, retries, waits)

    async def _backoff(self, attempt: int, why: str) -> None:
        if attempt >= self.max_attempts:
            raise TransientError(f"{why}; gave up after {attempt} attempts")
        await asyncio.sleep(random.uniform(0, min(_MAX_BACKOFF_SECONDS, 0.05 * 2**attempt)))


def _reason(response: httpx.Response) -> str:
    if not response.content:
        return ""
    try:
        body: Any = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return ""
    return str(body.get("reason", "")) if isinstance(body, dict) else ""


def _outcome(
    response: httpx.Response, reason: str, registered_at_ms: int | None, retries: int, waits: int
) -> SendOutcome:
    if response.status_code == 410:
        try:
            stopped = int(orjson.loads(response.content).get("timestamp"))
        except (TypeError, ValueError, orjson.JSONDecodeError):
            stopped = None
        # A token registered after APNs saw it die is a new registration: keep it.
        dead = registered_at_ms is None or stopped is None or registered_at_ms < stopped
        return SendOutcome("dead_token" if dead else "failed", reason or "Unregistered",
                           retries=retries, rate_limited_waits=waits,
                           unregistered_at_ms=stopped)  # fmt: skip
    status = "dead_token" if response.status_code == 400 and reason in _DEAD_400 else "failed"
    return SendOutcome(status, reason or str(response.status_code), retries=retries,
                       rate_limited_waits=waits)  # fmt: skip
