"""APNs specifics of our sender (the shared contract: tests/test_push_providers.py)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from core.errors import ConfigError
from core.push.apns import ApnsSender, ProviderToken
from core.push.h2client import H2Client
from devhost.fakes.apns import FakeApns, signing_key_pair

PAYLOAD = json.dumps({"aps": {"alert": {"title": "Hi", "body": "there"}}}).encode()


key_pair = signing_key_pair


@pytest.fixture
def apns() -> Iterator[FakeApns]:
    fake = FakeApns().start()
    try:
        yield fake
    finally:
        fake.stop()


def run(fake: FakeApns, scenario: Any, *, private: str | None = None) -> Any:
    """Run `scenario(sender)` with a sender trusting the fake's certificate."""
    key, public = key_pair()
    fake.configure(public_key_pem=public)
    token = ProviderToken("ABCDE12345", "KEY1234567", private or key)

    async def go() -> Any:
        client = H2Client(fake.url, ssl_context=fake.client_ssl_context(), request_timeout=10)
        sender = ApnsSender("com.example.shop", token, client=client)
        try:
            return await scenario(sender)
        finally:
            await sender.aclose()

    return asyncio.run(go()), token


def device() -> str:
    return secrets.token_hex(32)


def test_dead_tokens_by_reason_and_the_410_timestamp_rule(apns: FakeApns) -> None:
    gone, reregistered = device(), device()
    apns.configure(unregistered={gone: 1_700_000_000_000, reregistered: 1_700_000_000_000})

    async def scenario(sender: ApnsSender) -> list[Any]:
        return [
            await sender.send("not-hex", PAYLOAD),
            await sender.send(gone, PAYLOAD, registered_at_ms=1_600_000_000_000),
            await sender.send(reregistered, PAYLOAD, registered_at_ms=1_800_000_000_000),
            await sender.send(device(), b"{" + b'"x":"' + b"y" * 5000 + b'"}'),
        ]

    outcomes, _ = run(apns, scenario)
    assert [(o.status, o.reason) for o in outcomes] == [
        ("dead_token", "BadDeviceToken"), ("dead_token", "Unregistered"),
        ("failed", "Unregistered"), ("failed", "PayloadTooLarge"),
    ]  # fmt: skip


def test_a_key_that_does_not_load_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not load"):
        ProviderToken("ABCDE12345", "KEY1234567", "not a key")
