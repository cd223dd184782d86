"""Push token registration and app interaction events through the local host (Azurite)."""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from core.events.store import EventStore
from core.push.tokens import PushToken, TokenRegistry, token_hash

pytestmark = pytest.mark.integration


def post(app: Any, route: str, body: Any) -> requests.Response:
    return requests.post(f"{app.base_url}/api/{route}", json=body, timeout=30)


def apns_token() -> str:
    return secrets.token_hex(32)


def fcm_token() -> str:
    return "f" + secrets.token_urlsafe(120).replace("-", "_") + ":APA91b"


def test_register_refresh_and_move_a_token_to_another_profile(running_app, storage) -> None:  # type: ignore[no-untyped-def]
    token = apns_token()
    first, second = f"CRM-{uuid.uuid4().hex[:8]}", f"CRM-{uuid.uuid4().hex[:8]}"
    body = {"app_id": "shop-ios", "token": token, "profile_id": first, "platform": "ios",
            "locale": "nl-NL", "time_zone": "Europe/Amsterdam"}  # fmt: skip
    created = post(running_app, "push/tokens", body)
    assert created.status_code == 201 and created.json()["status"] == "registered"
    assert token not in created.text  # answers show the token masked, never in clear
    again = post(running_app, "push/tokens", body)
    assert again.status_code == 200 and again.json()["status"] == "refreshed"
    moved = post(running_app, "push/tokens", {**body, "profile_id": second})
    assert moved.status_code == 200 and moved.json()["status"] == "moved"

    registry = TokenRegistry(storage)
    assert registry.devices("shop-ios", first) == []
    devices = registry.devices("shop-ios", second)
    assert [d.token for d in devices] == [token] and devices[0].locale == "nl-NL"
    row = storage.tables.get(PushToken).get("shop-ios", token_hash(token))
    assert row is not None and row.entity.profile_id == second
    assert devices[0].active and devices[0].token_hash == token_hash(token)


def test_android_tokens_and_bad_registrations(running_app) -> None:  # type: ignore[no-untyped-def]
    android = {"app_id": "shop-android", "token": fcm_token(), "profile_id": "CRM-1",
               "platform": "android"}  # fmt: skip
    assert post(running_app, "push/tokens", android).status_code == 201
    cases = [
        ({**android, "token": "not a token at all, clearly" * 2}, 400, "bad_request"),
        ({**android, "platform": "ios"}, 400, "bad_request"),  # not a hex APNs token
        ({**android, "app_id": "no-such-app"}, 404, "unknown_app"),
        ({**android, "app_id": "shop-ios", "platform": "ios", "token": apns_token()}, 201, None),
        ({"app_id": "shop-ios", "platform": "ios", "token": apns_token(), "profile_id": "x",
          "environment": "sandbox"}, 409, "app_mismatch"),
        ({**android, "extra": 1}, 400, "bad_request"),
    ]  # fmt: skip
    for body, status, code in cases:
        answer = post(running_app, "push/tokens", body)
        assert answer.status_code == status, (body, answer.text)
        if code:
            assert answer.json()["error"]["code"] == code
            assert body["token"] not in answer.text  # errors never echo the token


def test_app_events_are_stored_once_and_reach_the_event_store(running_app, storage) -> None:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC)
    ids = [f"evt-{uuid.uuid4().hex}" for _ in range(3)]
    batch = {
        "app_id": "shop-ios", "platform": "ios",
        "events": [
            {"id": ids[0], "type": "open", "occurred_at": now.isoformat(), "profile_id": "CRM-7",
             "dispatch_id": "d-1"},
            {"id": ids[1], "type": "action", "occurred_at": now.isoformat(), "action_id": "buy"},
            {"id": ids[2], "type": "dismiss", "occurred_at": now.isoformat()},
            {"id": ids[0], "type": "open", "occurred_at": now.isoformat()},  # repeated in the batch
        ],
    }  # fmt: skip
    first = post(running_app, "push/events", batch)
    assert first.status_code == 202
    assert first.json() == {"received": 4, "stored": 3, "duplicates": 1}
    retried = post(running_app, "push/events", batch)  # the app retries the same batch
    assert retried.status_code == 202 and retried.json()["stored"] == 3
    overlapping = {**batch, "events": batch["events"][:1]}
    assert post(running_app, "push/events", overlapping).json()["stored"] == 0

    store = EventStore(storage)
    found = [
        e for e in store.read_window(now - timedelta(hours=2), now + timedelta(hours=2))
        if e.event_id in {f"app:shop-ios:{i}" for i in ids}
    ]  # fmt: skip
    assert sorted(e.type.value for e in found) == ["clicked", "dismissed", "opened"]
    opened = next(e for e in found if e.type.value == "opened")
    assert opened.channel.value == "push" and opened.external_id == "CRM-7"
    assert opened.dispatch_id == "d-1"


def test_bad_event_batches_get_a_json_400(running_app) -> None:  # type: ignore[no-untyped-def]
    now = datetime.now(UTC).isoformat()

    def batch_of(**event: str) -> dict[str, Any]:
        return {"app_id": "shop-ios", "events": [{"id": "evt-12345678", "type": "open",
                                                  "occurred_at": now, **event}]}  # fmt: skip

    cases = [
        {"app_id": "shop-ios", "events": []},
        batch_of(id="short"),
        batch_of(type="swipe"),
        batch_of(occurred_at="2999-01-01T00:00:00Z"),
        batch_of(occurred_at="2026-11-24T10:00:00"),  # no time zone
    ]
    for body in cases:
        answer = post(running_app, "push/events", body)
        assert answer.status_code == 400, body
        assert answer.json()["error"]["code"] == "bad_request"
    unknown = post(running_app, "push/events", {**cases[1], "app_id": "nope"})
    assert unknown.status_code in (400, 404)
