"""The push provider contract: every provider (APNs, FCM) passes the same tests against
its fake, over TLS, through core/push/h2client.py."""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from core.errors import ConfigError, TransientError
from core.push.apns import ApnsProvider, ProviderToken
from core.push.fcm import FcmCredentials, FcmProvider
from core.push.h2client import H2Client
from core.push.provider import PushProvider
from core.push.templates import CompiledTemplate, ProfileSkipped, PushTemplate
from core.push.tokens import Device
from devhost.fakes.apns import FakeApns, signing_key_pair
from devhost.fakes.fcm import FakeFcm, service_account_for

TEMPLATE = PushTemplate(title="Hi {{ first_name }}", body="{{ points }} points", collapse_id="pts")


class Harness:
    """One provider and its fake, in the terms of the contract."""

    platform: str
    fake: Any

    def provider(self, *, bad_credentials: bool = False) -> PushProvider:
        raise NotImplementedError

    def device(self) -> Device:
        raise NotImplementedError

    def kill(self, device: Device) -> None:
        """Make the fake report the device's token as gone for good."""
        raise NotImplementedError

    def expire_auth(self) -> None:
        raise NotImplementedError

    def auth_renewals(self, provider: PushProvider) -> int:
        raise NotImplementedError

    def delivered(self) -> list[dict[str, Any]]:
        """Per delivered push: its title."""
        raise NotImplementedError

    def client(self) -> H2Client:
        context = ssl.create_default_context(cafile=str(self.fake.cert_path))
        self.last_client = H2Client(self.fake.url, ssl_context=context, request_timeout=10)
        return self.last_client

    def _device(self, token: str) -> Device:
        return Device(app_id="app", token=token, token_hash=token[:16], platform=self.platform,
                      environment="production", registered_at=datetime.now(UTC))  # fmt: skip


class Apns(Harness):
    platform = "ios"

    def __init__(self) -> None:
        self.fake = FakeApns().start()
        self.key, public = signing_key_pair()
        self.fake.configure(public_key_pem=public)

    def provider(self, *, bad_credentials: bool = False) -> PushProvider:
        key = signing_key_pair()[0] if bad_credentials else self.key
        self.token = ProviderToken("ABCDE12345", "KEY1234567", key)
        return ApnsProvider("com.example.shop", self.token, TEMPLATE, client=self.client())

    def device(self) -> Device:
        return self._device(secrets.token_hex(32))

    def kill(self, device: Device) -> None:
        self.fake.configure(unregistered={device.token: 4_102_444_800_000})  # in 2100

    def expire_auth(self) -> None:
        self.fake.configure(expire_next_token=True)

    def auth_renewals(self, provider: PushProvider) -> int:
        return self.token.mints - 1

    def delivered(self) -> list[dict[str, Any]]:
        return [{"title": d["payload"]["aps"]["alert"]["title"]} for d in self.fake.state.delivered]


class Fcm(Harness):
    platform = "android"

    def __init__(self) -> None:
        self.fake = FakeFcm().start()
        self.account, public = service_account_for(self.fake.url, "example-shop")
        self.fake.configure(public_key_pem=public, client_email=self.account["client_email"])

    def provider(self, *, bad_credentials: bool = False) -> PushProvider:
        session = requests.Session()
        session.verify, session.trust_env = str(self.fake.cert_path), False
        account = self.account
        if bad_credentials:
            account = {**service_account_for(self.fake.url, "example-shop")[0],
                       "client_email": self.account["client_email"]}  # fmt: skip
        self.credentials = FcmCredentials(account, session)
        return FcmProvider("example-shop", self.credentials, TEMPLATE, client=self.client())

    def device(self) -> Device:
        return self._device("d" + secrets.token_urlsafe(140).replace("-", "_"))

    def kill(self, device: Device) -> None:
        self.fake.configure(unregistered={device.token})

    def expire_auth(self) -> None:
        self.fake.expire_access_tokens()

    def auth_renewals(self, provider: PushProvider) -> int:
        return self.credentials.refreshes - 1

    def delivered(self) -> list[dict[str, Any]]:
        return [{"title": s["message"]["notification"]["title"]} for s in self.fake.state.sent]


@pytest.fixture(params=[Apns, Fcm], ids=["apns", "fcm"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    made: Harness = request.param()
    try:
        yield made
    finally:
        made.fake.stop()


def run(provider: PushProvider, scenario: Any) -> Any:
    async def go() -> Any:
        try:
            return await scenario()
        finally:
            await provider.aclose()

    return asyncio.run(go())


def message(**attributes: Any) -> Any:
    return CompiledTemplate(TEMPLATE).render({"first_name": "Ana", "points": 12, **attributes})


def test_a_personalised_push_is_sent_with_one_auth_token(harness: Harness) -> None:
    provider = harness.provider()
    devices = [harness.device() for _ in range(60)]

    async def scenario() -> list[Any]:
        await provider.validate()
        return await asyncio.gather(
            *(provider.send(d, provider.encode(message(), d)) for d in devices)
        )

    outcomes = run(provider, scenario)
    assert {o.status for o in outcomes} == {"sent"} and all(o.message_id for o in outcomes)
    assert harness.delivered()[0] == {"title": "Hi Ana"} and len(harness.delivered()) == 60
    assert harness.auth_renewals(provider) == 0


def test_a_dead_token_is_reported_as_such(harness: Harness) -> None:
    provider, device = harness.provider(), harness.device()
    harness.kill(device)
    outcome = run(provider, lambda: provider.send(device, provider.encode(message(), device)))
    assert outcome.status == "dead_token" and outcome.reason in ("Unregistered", "UNREGISTERED")


def test_rate_limits_and_server_errors_are_retried_until_delivered(harness: Harness) -> None:
    provider = harness.provider()
    harness.fake.configure(limit_every=3, fail_every=4)
    devices = [harness.device() for _ in range(8)]

    async def scenario() -> list[Any]:
        return [await provider.send(d, provider.encode(message(), d)) for d in devices]

    outcomes = run(provider, scenario)
    assert {o.status for o in outcomes} == {"sent"}
    assert sum(o.retries for o in outcomes) >= 1
    assert sum(o.rate_limited_waits for o in outcomes) >= 1


def test_an_expired_auth_token_is_renewed_once_and_the_push_goes_out(harness: Harness) -> None:
    provider = harness.provider()
    first, second = harness.device(), harness.device()

    async def scenario() -> list[Any]:
        sent = [await provider.send(first, provider.encode(message(), first))]
        harness.expire_auth()
        return [*sent, await provider.send(second, provider.encode(message(), second))]

    outcomes = run(provider, scenario)
    assert [o.status for o in outcomes] == ["sent", "sent"]
    assert harness.auth_renewals(provider) == 1


def test_bad_credentials_stop_with_a_config_error(harness: Harness) -> None:
    provider, device = harness.provider(bad_credentials=True), harness.device()

    async def scenario() -> Any:
        await provider.validate()
        return await provider.send(device, provider.encode(message(), device))

    with pytest.raises(ConfigError):
        run(provider, scenario)
    assert harness.delivered() == []


def test_an_oversized_payload_is_refused_before_sending(harness: Harness) -> None:
    provider, device = harness.provider(), harness.device()
    with pytest.raises(ProfileSkipped) as skipped:
        provider.encode(message(first_name="A" * 5000), device)
    assert skipped.value.reason == "payload_too_large"
    run(provider, lambda: asyncio.sleep(0))  # nothing was sent; close its client


def test_a_provider_that_keeps_failing_ends_in_a_transient_error(harness: Harness) -> None:
    provider, device = harness.provider(), harness.device()
    harness.fake.configure(fail_every=1)
    with pytest.raises(TransientError, match="gave up"):
        run(provider, lambda: provider.send(device, provider.encode(message(), device)))


def test_a_server_going_away_mid_dispatch_loses_nothing(harness: Harness) -> None:
    provider = harness.provider()
    harness.fake.configure(goaway_after_streams=25, latency_seconds=0.02)
    devices = [harness.device() for _ in range(100)]

    async def scenario() -> list[Any]:
        return await asyncio.gather(
            *(provider.send(d, provider.encode(message(), d)) for d in devices)
        )

    outcomes = run(provider, scenario)
    assert {o.status for o in outcomes} == {"sent"}
    assert len(harness.delivered()) == 100  # refused streams were sent again, none twice
    assert harness.last_client.connections_opened >= 2  # the server did go away
