"""FCM specifics of our sender (the shared contract: tests/test_push_providers.py)."""

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


def test_a_malformed_token_is_dead(fcm: FakeFcm) -> None:
    [malformed] = run(sender_for(fcm), send("short"))
    assert malformed.status == "dead_token" and malformed.reason == "INVALID_ARGUMENT"


def test_another_project_or_an_unloadable_account_is_a_config_error(fcm: FakeFcm) -> None:
    wrong_project = sender_for(fcm, project="another-project")
    with pytest.raises(ConfigError, match="SENDER_ID_MISMATCH"):
        run(wrong_project, send(token()))
    with pytest.raises(ConfigError, match="does not load"):
        FcmCredentials({"type": "service_account"}, requests.Session())
