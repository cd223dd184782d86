"""Firebase Cloud Messaging HTTP v1: `POST {endpoint}/v1/projects/{project}/messages:send`.

Auth: an OAuth2 access token from the app's service account (google-auth signs the JWT
and exchanges it at the account's `token_uri`), cached until five minutes before it
expires; a 401 refreshes it once. Requests go over HTTP/2 (core/push/h2client.py);
429 (`QUOTA_EXCEEDED`, `Retry-After`) waits and 5xx (`UNAVAILABLE`, `INTERNAL`) retries
follow core/push/retry.py. Each answer becomes a SendOutcome:

    200                                           -> sent (FCM's message name kept)
    UNREGISTERED, INVALID_ARGUMENT about the token -> dead token (the caller deactivates it)
    SENDER_ID_MISMATCH, THIRD_PARTY_AUTH_ERROR     -> ConfigError: this app's setup is wrong
    any other 4xx                                  -> failed (a bug in the request, no retry)
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import requests
from google.auth.exceptions import GoogleAuthError
from google.auth.transport.requests import Request
from google.oauth2 import service_account

from core.errors import ConfigError, TransientError
from core.http import retry_after_seconds
from core.push.h2client import H2Client, H2Response, StreamNotProcessed
from core.push.outcome import SendOutcome
from core.push.provider import PushProvider
from core.push.retry import Attempts
from core.push.templates import PushTemplate, RenderedMessage, fcm_message
from core.push.tokens import Device

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
ENDPOINT = "https://fcm.googleapis.com"
_JSON = (b"content-type", b"application/json; charset=UTF-8")
_REFRESH_BEFORE = timedelta(minutes=5)
_DEAD_TOKEN_CODES = frozenset({"UNREGISTERED"})
_CONFIG_CODES = frozenset({"SENDER_ID_MISMATCH", "THIRD_PARTY_AUTH_ERROR"})


class FcmCredentials:
    """An app's service account, exchanged for access tokens that are reused until near
    their expiry (thread-safe: the senders of one app share it)."""

    @classmethod
    def from_json(cls, text: str, session: requests.Session) -> FcmCredentials:
        """From the service account JSON as an app setting holds it."""
        try:
            info = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ConfigError("the FCM service account setting is not JSON") from None
        if not isinstance(info, dict):
            raise ConfigError("the FCM service account setting is not a JSON object")
        return cls(info, session)

    def __init__(self, service_account_info: dict[str, Any], session: requests.Session) -> None:
        try:
            self._credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                service_account_info, scopes=[SCOPE]
            )
        except (ValueError, KeyError, GoogleAuthError) as exc:
            raise ConfigError(f"the FCM service account does not load: {exc}") from None
        self._request = Request(session)
        self._lock = threading.Lock()
        self._header = b""
        self._fresh_until = 0.0
        self.refreshes = 0

    async def authorization(self, *, rejected: bytes = b"") -> bytes:
        """`Bearer <access token>`, refreshed near expiry or when FCM `rejected` this one.

        The exchange blocks (google-auth), so it runs in a worker thread; concurrent
        callers wait on one lock and reuse the first caller's fresh token."""
        header = self._header
        if header and header != rejected and time.monotonic() < self._fresh_until:
            return header
        return await asyncio.to_thread(self._refresh, rejected)

    def token(self) -> str:
        """The current access token, refreshed if needed (blocking)."""
        return self._refresh(b"").decode().removeprefix("Bearer ")

    def _refresh(self, rejected: bytes) -> bytes:
        with self._lock:
            if self._header and self._header != rejected and time.monotonic() < self._fresh_until:
                return self._header
            try:
                self._credentials.refresh(self._request)
            except GoogleAuthError as exc:
                raise ConfigError(f"FCM refused the service account: {exc}") from None
            self.refreshes += 1
            expiry = self._credentials.expiry
            lifetime = (
                (expiry.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
                if expiry is not None else 0.0
            )  # fmt: skip
            self._fresh_until = time.monotonic() + lifetime - _REFRESH_BEFORE.total_seconds()
            self._header = f"Bearer {self._credentials.token}".encode()
            return self._header


class FcmSender:
    def __init__(
        self,
        project_id: str,
        credentials: FcmCredentials,
        *,
        endpoint: str = ENDPOINT,
        client: H2Client | None = None,
        max_attempts: int = 5,
        max_rate_limited_waits: int = 20,
    ) -> None:
        self.project_id = project_id
        self._credentials = credentials
        self._client = client or H2Client(endpoint)
        self._path = f"/v1/projects/{project_id}/messages:send"
        self.max_attempts = max_attempts
        self.max_rate_limited_waits = max_rate_limited_waits

    async def aclose(self) -> None:
        await self._client.aclose()

    async def validate(self) -> None:
        """Obtain an access token now: bad credentials stop this app before its first send."""
        await self._credentials.authorization()

    async def send(self, body: bytes) -> SendOutcome:
        """One `messages:send` call (body from core.push.templates.fcm_message)."""
        attempts = Attempts("FCM", max_attempts=self.max_attempts,
                            max_rate_limited_waits=self.max_rate_limited_waits)  # fmt: skip
        rejected = b""
        while True:
            authorization = await self._credentials.authorization(rejected=rejected)
            try:
                response = await self._client.post(
                    self._path, [(b"authorization", authorization), _JSON], body
                )
            except StreamNotProcessed as exc:
                await attempts.after_not_processed(str(exc))  # it never reached the server
                continue
            except TransientError as exc:
                await attempts.after_failure(str(exc))
                continue
            status = response.status
            if status == 200:
                name = str(orjson.loads(response.body).get("name", ""))
                return SendOutcome("sent", message_id=name, retries=attempts.retries,
                                   rate_limited_waits=attempts.rate_limited_waits)  # fmt: skip
            if status == 401 and not rejected:
                rejected = authorization  # expired early or revoked: refresh once
                continue
            code, message = _error_code(response)
            wait = retry_after_seconds({"Retry-After": response.header("retry-after")}, time.time())
            if status == 429:
                await attempts.after_rate_limit(f"429 {code}", wait)
                continue
            if status >= 500:
                await attempts.after_failure(f"answered {status} {code}", wait)
                continue
            return _outcome(status, code, message, attempts)


def _error_code(response: H2Response) -> tuple[str, str]:
    try:
        error = orjson.loads(response.body).get("error", {})
    except (orjson.JSONDecodeError, AttributeError):
        return str(response.status), ""
    message = str(error.get("message", ""))
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("errorCode"):
            return str(detail["errorCode"]), message
    return str(error.get("status") or response.status), message


def _outcome(status: int, code: str, message: str, attempts: Attempts) -> SendOutcome:
    if code in _CONFIG_CODES or status == 401:
        raise ConfigError(f"FCM rejects this app's configuration: {code}")
    dead = code in _DEAD_TOKEN_CODES or (
        code == "INVALID_ARGUMENT" and "registration token" in message.lower()
    )
    return SendOutcome("dead_token" if dead else "failed", reason=code, retries=attempts.retries,
                       rate_limited_waits=attempts.rate_limited_waits)  # fmt: skip


class FcmProvider(PushProvider):
    """A dispatch's template on FCM HTTP v1 (Android notification messages)."""

    platform = "android"

    def __init__(
        self, project_id: str, credentials: FcmCredentials, template: PushTemplate, *,
        client: H2Client,
    ) -> None:  # fmt: skip
        self._sender = FcmSender(project_id, credentials, client=client)
        self._template = template

    async def validate(self) -> None:
        await self._sender.validate()

    def encode(self, message: RenderedMessage, device: Device) -> bytes:
        return fcm_message(message, self._template, device.token)

    async def send(self, device: Device, body: bytes) -> SendOutcome:
        return await self._sender.send(body)

    async def aclose(self) -> None:
        await self._sender.aclose()
