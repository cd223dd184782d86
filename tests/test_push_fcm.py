"""Our FCM HTTP v1 sender against the fake FCM (OAuth token endpoint + messages:send)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from core.errors import ConfigError
from core.push.fcm import FcmCredentials, FcmSender
from core.push.h2client import H2Client
from core.push.templates import CompiledTemplate, PushTemplate, fcm_message
from devhost.fakes.fcm import FakeFcm, service_account_for

TEMPLATE = PushTemplate(title="Hi {{ first_name }}", body="{{ points }} points")


@pytest.fixture
def fcm() -> Iterator[FakeFcm]:
    fake = FakeFcm().start()
    try:
        yield fake
    finally:
        fake.stop()


def sender_for(fake: FakeFcm, project: str = "example-shop") -> FcmSender:
    """Our sender (HTTP/2) and token exchange (requests) trusting the fake's certificate."""
    info, public = service_account_for(fake.url, "example-shop")
    fake.configure(public_key_pem=public, client_email=info["client_email"])
    session = requests.Session()
    session.verify, session.trust_env = str(fake.cert_path), False  # not REQUESTS_CA_BUNDLE
    client = H2Client(fake.url, ssl_context=fake.client_ssl_context(), request_timeout=10)
    return FcmSender(project, FcmCredentials(info, session), client=client)


def run(sender: FcmSender, *steps: Any) -> list[Any]:
    """Await each step (a coroutine function taking the sender) in one event loop."""

    async def go() -> list[Any]:
        try:
            return [await step(sender) for step in steps]
        finally:
            await sender.aclose()

    return asyncio.run(go())


def send(device: str) -> Any:
    return lambda sender: sender.send(body_for(device))


def token() -> str:
    return "d" + secrets.token_urlsafe(150).replace("-", "_")


def body_for(device: str) -> bytes:
    rendered = CompiledTemplate(TEMPLATE).render({"first_name": "Ana", "points": 12})
    return fcm_message(rendered, TEMPLATE, device)


def test_sends_with_one_cached_access_token(fcm: FakeFcm) -> None:
    sender = sender_for(fcm)

    async def many(sender: FcmSender) -> list[Any]:
        await sender.validate()
        return await asyncio.gather(*(sender.send(body_for(token())) for _ in range(50)))

    [outcomes] = run(sender, many)
    assert {o.status for o in outcomes} == {"sent"}
    assert all(o.message_id.startswith("projects/example-shop/messages/") for o in outcomes)
    assert fcm.state.tokens_issued == 1  # cached, not one per message
    assert fcm.state.sent[0]["message"]["notification"] == {"title": "Hi Ana", "body": "12 points"}


def test_dead_tokens_are_reported_and_quota_and_5xx_are_retried(fcm: FakeFcm) -> None:
    sender = sender_for(fcm)
    dead = token()
    fcm.configure(unregistered={dead}, limit_every=3, fail_every=4)
    *results, malformed = run(
        sender, *(send(device) for device in [token(), dead, token(), token()]), send("short")
    )
    assert [r.status for r in results] == ["sent", "dead_token", "sent", "sent"]
    assert results[1].reason == "UNREGISTERED"
    assert sum(r.rate_limited_waits for r in results) >= 1
    assert sum(r.retries for r in results) >= 1
    assert malformed.status == "dead_token" and malformed.reason == "INVALID_ARGUMENT"


def test_an_expired_access_token_is_refreshed_once(fcm: FakeFcm) -> None:
    async def expire(sender: FcmSender) -> None:
        fcm.expire_access_tokens()  # revoked or expired early on the server's side

    first, _, second = run(sender_for(fcm), send(token()), expire, send(token()))
    assert first.status == second.status == "sent"
    assert fcm.state.tokens_issued == 2


def test_bad_credentials_or_another_project_stop_the_app(fcm: FakeFcm) -> None:
    sender = sender_for(fcm)
    _, other_public = service_account_for(fcm.url, "example-shop")
    fcm.configure(public_key_pem=other_public)  # the key in settings is not the account's
    with pytest.raises(ConfigError, match="refused the service account"):
        run(sender, lambda sender: sender.validate())
    wrong_project = sender_for(fcm, project="another-project")
    with pytest.raises(ConfigError, match="SENDER_ID_MISMATCH"):
        run(wrong_project, send(token()))
    with pytest.raises(ConfigError, match="does not load"):
        FcmCredentials({"type": "service_account"}, requests.Session())
