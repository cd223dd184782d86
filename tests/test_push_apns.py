"""Our APNs sender (HTTP/2, token auth) against the fake APNs over TLS."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
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


def test_many_pushes_multiplex_over_http2_with_one_provider_token(apns: FakeApns) -> None:
    apns.configure(latency_seconds=0.05)

    async def scenario(sender: ApnsSender) -> list[Any]:
        return await asyncio.gather(*(sender.send(device(), PAYLOAD) for _ in range(200)))

    outcomes, token = run(apns, scenario)
    assert {o.status for o in outcomes} == {"sent"} and len(apns.state.delivered) == 200
    assert token.mints == 1 and all(o.message_id for o in outcomes)
    assert apns.state.delivered[0]["push_type"] == "alert"


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


def test_expired_provider_token_is_reminted_and_429_5xx_retried(apns: FakeApns) -> None:
    apns.configure(limit_every=3, fail_every=5)

    async def scenario(sender: ApnsSender) -> list[Any]:
        first = await sender.send(device(), PAYLOAD)
        await asyncio.sleep(1.1)
        apns.configure(tokens_expire_before=int(time.time()))  # the cached token is now stale
        return [first] + [await sender.send(device(), PAYLOAD) for _ in range(7)]

    outcomes, token = run(apns, scenario)
    assert {o.status for o in outcomes} == {"sent"}
    assert token.mints >= 2
    assert sum(o.retries + o.rate_limited_waits for o in outcomes) >= 2


def test_a_bad_key_stops_the_app_with_a_config_error(apns: FakeApns) -> None:
    other, _ = key_pair()  # signs with a key APNs does not know

    async def scenario(sender: ApnsSender) -> Any:
        return await sender.send(device(), PAYLOAD)

    with pytest.raises(ConfigError, match="InvalidProviderToken"):
        run(apns, scenario, private=other)
    with pytest.raises(ConfigError, match="does not load"):
        ProviderToken("ABCDE12345", "KEY1234567", "not a key")
