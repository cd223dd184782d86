"""Firebase Cloud Messaging HTTP v1: `POST {endpoint}/v1/projects/{project}/messages:send`.

Auth: an OAuth2 access token from the app's service account (google-auth signs the JWT
and exchanges it at the account's `token_uri`), cached until five minutes before it
expires; a 401 refreshes it once. Pacing, 429 (`QUOTA_EXCEEDED`, `Retry-After`) waits and
5xx (`UNAVAILABLE`, `INTERNAL`) retries: core/http.py. Each answer becomes a SendOutcome:

    200                                           -> sent (FCM's message name kept)
    UNREGISTERED, INVALID_ARGUMENT about the token -> dead token (the caller deactivates it)
    SENDER_ID_MISMATCH, THIRD_PARTY_AUTH_ERROR     -> ConfigError: this app's setup is wrong
    any other 4xx                                  -> failed (a bug in the request, no retry)
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import requests
from google.auth.exceptions import GoogleAuthError
from google.auth.transport.requests import Request
from google.oauth2 import service_account

from core.errors import ConfigError
from core.http import PoliteSender
from core.push.outcome import SendOutcome

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_REFRESH_BEFORE = timedelta(minutes=5)
_DEAD_TOKEN_CODES = frozenset({"UNREGISTERED"})
_CONFIG_CODES = frozenset({"SENDER_ID_MISMATCH", "THIRD_PARTY_AUTH_ERROR"})


class FcmCredentials:
    """An app's service account, exchanged for access tokens that are reused until near
    their expiry (thread-safe: the senders of one app share it)."""

    def __init__(self, service_account_info: dict[str, Any], session: requests.Session) -> None:
        try:
            self._credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                service_account_info, scopes=[SCOPE]
            )
        except (ValueError, KeyError, GoogleAuthError) as exc:
            raise ConfigError(f"the FCM service account does not load: {exc}") from None
        self._request = Request(session)
        self._lock = threading.Lock()
        self.refreshes = 0

    def token(self, *, force: bool = False) -> str:
        with self._lock:
            expiry = self._credentials.expiry
            stale = expiry is None or expiry.replace(tzinfo=UTC) - _REFRESH_BEFORE <= datetime.now(
                UTC
            )
            if force or stale or not self._credentials.token:
                try:
                    self._credentials.refresh(self._request)
                except GoogleAuthError as exc:
                    raise ConfigError(f"FCM refused the service account: {exc}") from None
                self.refreshes += 1
            return str(self._credentials.token)


class FcmSender:
    def __init__(
        self,
        project_id: str,
        credentials: FcmCredentials,
        *,
        endpoint: str = "https://fcm.googleapis.com",
        session: requests.Session | None = None,
        requests_per_second: float = 500.0,
        max_attempts: int = 5,
        **sender_options: Any,
    ) -> None:
        self.project_id = project_id
        self._credentials = credentials
        url = f"{endpoint.rstrip('/')}/v1/projects/{project_id}/messages:send"
        headers = {"Content-Type": "application/json; charset=UTF-8"}
        self._sender = PoliteSender(
            "FCM", url, headers, requests_per_second=requests_per_second,
            max_attempts=max_attempts, session=session, **sender_options,
        )  # fmt: skip

    def validate(self) -> None:
        """Obtain an access token now: bad credentials stop this app before its first send."""
        self._credentials.token()

    def send(self, body: bytes) -> SendOutcome:
        """One `messages:send` call (body from core.push.templates.fcm_message)."""
        for refreshed in (False, True):
            token = self._credentials.token(force=refreshed)
            delivered = self._sender.post(body, headers={"Authorization": f"Bearer {token}"})
            response = delivered.response
            if response.status_code == 401 and not refreshed:
                continue  # the access token expired early or was revoked: refresh once
            return _outcome(response, delivered.retries, delivered.rate_limited_waits)
        raise ConfigError("FCM refused a freshly issued access token (401)")


def _error_code(response: requests.Response) -> tuple[str, str]:
    try:
        error = orjson.loads(response.content).get("error", {})
    except (ValueError, AttributeError):
        return str(response.status_code), ""
    message = str(error.get("message", ""))
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and detail.get("errorCode"):
            return str(detail["errorCode"]), message
    return str(error.get("status") or response.status_code), message


def _outcome(response: requests.Response, retries: int, waits: int) -> SendOutcome:
    if response.status_code == 200:
        name = str(orjson.loads(response.content).get("name", ""))
        return SendOutcome("sent", message_id=name, retries=retries, rate_limited_waits=waits)
    code, message = _error_code(response)
    if code in _CONFIG_CODES or response.status_code == 401:
        raise ConfigError(f"FCM rejects this app's configuration: {code}")
    dead = code in _DEAD_TOKEN_CODES or (
        code == "INVALID_ARGUMENT" and "registration token" in message.lower()
    )
    return SendOutcome(
        "dead_token" if dead else "failed", reason=code, retries=retries, rate_limited_waits=waits
    )
