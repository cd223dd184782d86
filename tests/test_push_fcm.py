"""Our FCM HTTP v1 sender against the fake FCM (OAuth token endpoint + messages:send)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import requests

from core.errors import ConfigError
from core.push.fcm import FcmCredentials, FcmSender
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


def sender_for(fake: FakeFcm, project: str = "example-shop", **options: object) -> FcmSender:
    info, public = service_account_for(fake.url, "example-shop")
    fake.configure(public_key_pem=public, client_email=info["client_email"])
    session = requests.Session()
    return FcmSender(
        project, FcmCredentials(info, session), endpoint=fake.url, session=session,
        sleep=lambda seconds: None, **options,
    )  # fmt: skip


def token() -> str:
    return "d" + secrets.token_urlsafe(150).replace("-", "_")


def body_for(device: str) -> bytes:
    rendered = CompiledTemplate(TEMPLATE).render({"first_name": "Ana", "points": 12})
    return fcm_message(rendered, TEMPLATE, device)


def test_sends_with_one_cached_access_token(fcm: FakeFcm) -> None:
    sender = sender_for(fcm)
    sender.validate()
    outcomes = [sender.send(body_for(token())) for _ in range(5)]
    assert {o.status for o in outcomes} == {"sent"}
    assert all(o.message_id.startswith("projects/example-shop/messages/") for o in outcomes)
    assert fcm.state.tokens_issued == 1  # cached, not one per message
    assert fcm.state.sent[0]["message"]["notification"] == {"title": "Hi Ana", "body": "12 points"}


def test_dead_tokens_are_reported_and_quota_and_5xx_are_retried(fcm: FakeFcm) -> None:
    sender = sender_for(fcm)
    dead = token()
    fcm.configure(unregistered={dead}, limit_every=3, fail_every=4)
    results = [sender.send(body_for(device)) for device in [token(), dead, token(), token()]]
    assert [r.status for r in results] == ["sent", "dead_token", "sent", "sent"]
    assert results[1].reason == "UNREGISTERED"
    assert sum(r.rate_limited_waits + r.retries for r in results) >= 2
    malformed = sender.send(body_for("short-token"))
    assert malformed.status == "dead_token" and malformed.reason == "INVALID_ARGUMENT"


def test_an_expired_access_token_is_refreshed_once(fcm: FakeFcm) -> None:
    sender = sender_for(fcm)
    assert sender.send(body_for(token())).status == "sent"
    fcm.expire_access_tokens()  # revoked or expired early on the server's side
    assert sender.send(body_for(token())).status == "sent"
    assert fcm.state.tokens_issued == 2


def test_bad_credentials_or_another_project_stop_the_app(fcm: FakeFcm) -> None:
    sender = sender_for(fcm)
    _, other_public = service_account_for(fcm.url, "example-shop")
    fcm.configure(public_key_pem=other_public)  # the key in settings is not the account's
    with pytest.raises(ConfigError, match="refused the service account"):
        sender.validate()
    wrong_project = sender_for(fcm, project="another-project")
    with pytest.raises(ConfigError, match="SENDER_ID_MISMATCH"):
        wrong_project.send(body_for(token()))
    with pytest.raises(ConfigError, match="does not load"):
        FcmCredentials({"type": "service_account"}, requests.Session())
