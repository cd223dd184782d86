"""Push dispatch through the local host: the send route, the queue fan-out, the fake APNs
(HTTP/2 over TLS) and fake FCM, tokens switched off, and outcome events in the store."""

from __future__ import annotations

import secrets
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
import requests

from core.events.store import EventStore
from core.push.dispatch_model import ChunkState
from core.push.tokens import (
    Device,
    DeviceList,
    ProfileDevices,
    TokenRegistry,
    profile_partition,
    token_hash,
)
from core.storage.tables import safe_key
from tests.helpers import eventually
from tests.scenarios import people, to_csv
from tests.test_push_api import apns_token, fcm_token, post

pytestmark = pytest.mark.integration

TEMPLATE = {
    "title": "Hi {{ first_name }}",
    "body": "You have {{ points | default: 0 }} points",
    "data": {"tier": "{{ tier | default: 'basic' }}"},
    "collapse_id": "points",
}


def register(app: Any, app_id: str, profile: str, token: str, **extra: Any) -> None:
    platform = "ios" if "ios" in app_id else "android"
    body = {"app_id": app_id, "token": token, "profile_id": profile, "platform": platform, **extra}
    answer = post(app, "push/tokens", body)
    assert answer.status_code in (200, 201), answer.text


def dispatch(app: Any, **body: Any) -> dict[str, Any]:
    """Post a dispatch, check the 202, and wait until its run is over."""
    answer = post(app, "push/send", {"template": TEMPLATE, **body})
    assert answer.status_code == 202, answer.text
    accepted = answer.json()
    assert accepted["status"] == "received" and accepted["dispatch_id"]
    return wait(app, accepted["dispatch_id"])


def wait(app: Any, dispatch_id: str, timeout: float = 60) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        answer = requests.get(f"{app.base_url}/api/push/dispatches/{dispatch_id}", timeout=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        return body if body["status"] in ("succeeded", "failed") else None

    return eventually(finished, timeout=timeout, interval=0.25)


def events_of(storage: Any, result: dict[str, Any], per_chunk: int = 2000) -> list[dict[str, Any]]:
    """The outcome events a dispatch stored (one segment per chunk slice of 500, retry
    rounds included)."""
    store = EventStore(storage)
    chunks = storage.tables.get(ChunkState).query_partition(result["dispatch_id"])
    found = []
    for chunk in (row.row_key for row in chunks if row.row_key.startswith("chunk-")):
        for first in range(0, per_chunk, 500):
            entry = store.placed(f"push-{result['dispatch_id']}-{chunk}-{first:07d}")
            if entry is not None:
                found.extend(store.read_segment_stored(entry))
    return found


def test_a_personalised_dispatch_reaches_every_active_device_and_switches_dead_ones_off(
    running_app,
    storage,
    push_fakes,  # type: ignore[no-untyped-def]
) -> None:
    run = uuid.uuid4().hex[:6]
    ana, bo, cy, dee, eve, fay = (f"P-{run}-{n}" for n in ("ana", "bo", "cy", "dee", "eve", "fay"))
    ana_ios, ana_android, bo_ios, dead_ios = apns_token(), fcm_token(), apns_token(), apns_token()
    dead_android, cy_ios, dee_ios, eve_ios = fcm_token(), apns_token(), apns_token(), apns_token()
    register(running_app, "shop-ios", ana, ana_ios, locale="nl-NL")
    register(running_app, "shop-android", ana, ana_android)
    register(running_app, "shop-ios", bo, bo_ios)
    register(running_app, "shop-ios", bo, dead_ios)  # Bo's old phone: APNs says it is gone
    register(running_app, "shop-android", bo, dead_android)
    register(running_app, "shop-ios", cy, cy_ios)  # no first_name: skipped
    register(running_app, "shop-ios", dee, dee_ios)  # unsubscribed from push
    register(running_app, "shop-ios", eve, eve_ios)  # on the push suppression list
    gone_at = int(time.time() * 1000) + 60_000  # died after it was registered: switched off
    push_fakes.apns.configure(
        unregistered={**push_fakes.apns.state.unregistered, dead_ios: gone_at}
    )
    push_fakes.fcm.configure(unregistered={*push_fakes.fcm.state.unregistered, dead_android})
    blocked = post(
        running_app,
        "suppressions",
        {"channel": "push", "address": eve, "reason": "manual_blocklist"},
    )
    assert blocked.status_code in (200, 201), blocked.text

    result = dispatch(
        running_app,
        dispatch_key=f"welcome-{run}",
        campaign_id="welcome",
        app_ids=["shop-ios", "shop-android"],
        targets={"profile_ids": [ana, bo, cy, dee, eve, fay, ana]},  # Ana twice: once
        defaults={"points": 5},
        attributes={
            ana: {"first_name": "Ana", "points": 120, "tier": "gold"},
            bo: {"first_name": "Bo"},
            dee: {"first_name": "Dee", "push_subscribe": "unsubscribed"},
            eve: {"first_name": "Eve"},
            fay: {"first_name": "Fay"},
        },
    )
    assert result["status"] == "succeeded", result
    counts = result["counts"]
    assert counts["profiles"] == 6 and counts["profiles.targeted"] == 2
    assert counts["profiles.skipped.missing_attribute"] == 1  # Cy
    assert counts["profiles.skipped.no_push_consent"] == 1  # Dee
    assert counts["profiles.skipped.suppressed"] == 1  # Eve
    assert counts["profiles.skipped.no_active_device"] == 1  # Fay has none
    # Kept out by a rule: in the audit trail, by profile id.
    for who, rule in ((dee, "no_push_consent"), (eve, "manual_blocklist")):
        audit = post(running_app, "audit/lookup", {"profile_id": who}).json()
        assert [(e["source"], e["run_id"], e["rule"]) for e in audit["exclusions"]] == [
            ("push", result["run_id"], rule)
        ]
    assert counts["messages.sent"] == 3 and counts["messages.dead_token"] == 2, result
    assert counts["devices.deactivated"] == 2

    delivered = {d["token"]: d for d in push_fakes.apns.state.delivered}
    assert delivered[ana_ios]["payload"] == {
        "aps": {"alert": {"title": "Hi Ana", "body": "You have 120 points"}},
        "tier": "gold",
    }
    assert delivered[bo_ios]["payload"]["aps"]["alert"]["body"] == "You have 5 points"
    assert cy_ios not in delivered and dee_ios not in delivered and eve_ios not in delivered
    android = [
        s["message"] for s in push_fakes.fcm.state.sent if s["message"]["token"] == ana_android
    ]
    assert android[0]["notification"] == {"title": "Hi Ana", "body": "You have 120 points"}
    assert android[0]["android"]["collapse_key"] == "points"

    registry = TokenRegistry(storage)
    bo_devices = {d.token: d for d in registry.devices("shop-ios", bo)}
    assert bo_devices[bo_ios].active and not bo_devices[dead_ios].active
    assert bo_devices[dead_ios].deactivation_reason == "Unregistered"
    assert not registry.devices("shop-android", bo)[0].active

    events = events_of(storage, result)
    kinds = Counter((e["source_type"], e["app_id"]) for e in events)
    assert kinds == {
        ("push.sent", "shop-ios"): 2,
        ("push.sent", "shop-android"): 1,
        ("push.bounced", "shop-ios"): 1,
        ("push.bounced", "shop-android"): 1,
    }
    bounced = next(
        e for e in events if e["source_type"] == "push.bounced" and e["app_id"] == "shop-android"
    )
    assert bounced["bounce_reason"] == "UNREGISTERED" and bounced["external_id"] == bo
    assert all(
        e["campaign_id"] == "welcome" and e["dispatch_id"] == result["dispatch_id"] for e in events
    )
    assert all(t not in str(events) for t in (ana_ios, ana_android, dead_ios))  # hashes only

    # The same dispatch key again: the same dispatch, nothing sent twice.
    sent_before = len(push_fakes.apns.state.delivered)
    again = post(
        running_app,
        "push/send",
        {"template": TEMPLATE, "dispatch_key": f"welcome-{run}", "targets": {"profile_ids": [ana]}},
    )
    assert again.status_code == 200 and again.json()["dispatch_id"] == result["dispatch_id"]
    # A token registered again after APNs reported it dead is live again.
    register(running_app, "shop-ios", bo, dead_ios)
    assert all(d.active for d in registry.devices("shop-ios", bo))
    assert len(push_fakes.apns.state.delivered) == sent_before


def test_a_bad_credential_stops_its_app_only_and_an_oversized_payload_is_skipped(
    running_app,
    push_fakes,  # type: ignore[no-untyped-def]
) -> None:
    run = uuid.uuid4().hex[:6]
    kiosk, shopper, big = f"K-{run}", f"S-{run}", f"B-{run}"
    register(running_app, "kiosk-ios", kiosk, apns_token())
    register(running_app, "shop-android", shopper, fcm_token())
    register(running_app, "shop-ios", big, apns_token())
    result = dispatch(
        running_app,
        app_ids=["kiosk-ios", "shop-android", "shop-ios"],
        targets={"profile_ids": [kiosk, shopper, big]},
        attributes={
            kiosk: {"first_name": "Kim"},
            shopper: {"first_name": "Sam"},
            big: {"first_name": "B" * 5000},
        },
    )
    assert result["status"] == "succeeded"  # the other apps went on
    assert "InvalidProviderToken" in result["stopped_apps"]["kiosk-ios"]
    assert "kiosk-ios" in result["error"]
    counts = result["counts"]
    assert counts["apps.shop-android.sent"] == 1 and "apps.kiosk-ios.sent" not in counts
    assert counts["devices.skipped.app_stopped"] == 1
    assert counts["devices.skipped.payload_too_large"] == 1

    only_kiosk = dispatch(
        running_app,
        app_ids=["kiosk-ios"],
        targets={"profile_ids": [kiosk]},
        attributes={kiosk: {"first_name": "Kim"}},
    )
    assert only_kiosk["status"] == "failed" and "kiosk-ios" in only_kiosk["stopped_apps"]


def test_expired_provider_token_is_reminted_and_429_5xx_end_delivered(
    running_app,
    push_fakes,  # type: ignore[no-untyped-def]
) -> None:
    run = uuid.uuid4().hex[:6]
    ios = [f"R-{run}-{n}" for n in range(40)]
    android = [f"A-{run}-{n}" for n in range(40)]
    for profile in ios:
        register(running_app, "shop-ios", profile, apns_token())
    for profile in android:
        register(running_app, "shop-android", profile, fcm_token())
    push_fakes.apns.configure(expire_next_token=True, limit_every=7, fail_every=11)
    push_fakes.fcm.configure(limit_every=7, fail_every=11)
    try:
        result = dispatch(
            running_app,
            app_ids=["shop-ios", "shop-android"],
            targets={"profile_ids": ios + android},
            defaults={"first_name": "there"},
        )
    finally:
        push_fakes.apns.configure(limit_every=0, fail_every=0)
        push_fakes.fcm.configure(limit_every=0, fail_every=0)
    counts = result["counts"]
    assert counts["messages.sent"] == 80 and "messages.failed" not in counts
    assert counts["messages.retries"] >= 2 and counts["messages.rate_limited_waits"] >= 2
    assert len(push_fakes.apns.state.expired_tokens) == 1  # refreshed once, then accepted


def test_a_provider_outage_defers_pushes_to_a_later_round(
    running_app,
    storage,
    push_fakes,  # type: ignore[no-untyped-def]
) -> None:
    run = uuid.uuid4().hex[:6]
    profiles = [f"O-{run}-{n}" for n in range(3)]
    for profile in profiles:
        register(running_app, "shop-ios", profile, apns_token())
    push_fakes.apns.configure(fail_every=1)  # APNs answers 503 to everything
    try:
        answer = post(running_app, "push/send", {
            "template": TEMPLATE, "app_ids": ["shop-ios"], "targets": {"profile_ids": profiles},
            "defaults": {"first_name": "there"},
        })  # fmt: skip
        dispatch_id = answer.json()["dispatch_id"]

        def deferred() -> bool:
            url = f"{running_app.base_url}/api/push/dispatches/{dispatch_id}"
            counts = requests.get(url, timeout=10).json()["counts"]
            return counts.get("messages.deferred", 0) == 3

        eventually(deferred, timeout=60)
    finally:
        push_fakes.apns.configure(fail_every=0)  # APNs is back
    result = wait(running_app, dispatch_id)
    counts = result["counts"]
    assert result["status"] == "succeeded" and counts["messages.sent"] == 3
    assert "messages.failed" not in counts and counts["profiles"] == 3
    assert result["chunks"]["total"] >= 2  # the chunk and at least one retry round
    events = events_of(storage, result)
    assert [e["source_type"] for e in events] == ["push.sent"] * 3


def test_bad_dispatch_requests_get_a_json_4xx(running_app) -> None:  # type: ignore[no-untyped-def]
    cases = [
        ({"template": TEMPLATE}, 400, "bad_request"),  # no targets
        (
            {
                "template": TEMPLATE,
                "targets": {"profile_ids": ["x"], "segment": {"sync_id": "vip", "audience": "vip"}},
            },
            400,
            "bad_request",
        ),
        (
            {"template": {**TEMPLATE, "title": "{% if %}"}, "targets": {"profile_ids": ["x"]}},
            400,
            "template_invalid",
        ),
        (
            {"template": TEMPLATE, "app_ids": ["nope"], "targets": {"profile_ids": ["x"]}},
            404,
            "unknown_app",
        ),
        (
            {"template": TEMPLATE, "targets": {"segment": {"sync_id": "nope", "audience": "vip"}}},
            404,
            "unknown_sync",
        ),
        (
            {"template": TEMPLATE, "targets": {"segment": {"sync_id": "vip", "audience": "nope"}}},
            404,
            "unknown_audience",
        ),
        (  # a sync a policy blocks (tests/data/syncs.yaml): no pushes to its audiences either
            {
                "template": TEMPLATE,
                "targets": {"segment": {"sync_id": "vip-gov-blocked", "audience": "vip"}},
            },
            409,
            "blocked_by_policy",
        ),
        (  # an audience collected under the e-mail permission is not pushed to
            {
                "template": TEMPLATE,
                "targets": {"segment": {"sync_id": "vip-consent-aep", "audience": "vip"}},
            },
            409,
            "wrong_permission",
        ),
    ]
    for body, status, code in cases:
        answer = post(running_app, "push/send", body)
        assert answer.status_code == status, (body, answer.text)
        assert answer.json()["error"]["code"] == code
    missing = requests.get(f"{running_app.base_url}/api/push/dispatches/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_a_segment_audience_held_by_switchboard_is_a_target(
    running_app,
    storage,
    fake_braze,
    push_fakes,  # type: ignore[no-untyped-def]
) -> None:
    from tests.scenarios import Scenario

    s = Scenario(running_app, storage, fake_braze, "push")
    rows = people(f"SEG{uuid.uuid4().hex[:4]}", 10)  # odd rows are in the vip audience
    s.known(rows)
    assert s.land(to_csv(rows))["status"] == "succeeded"
    tokens = {r["crmId"]: apns_token() for r in rows}
    for profile, token in tokens.items():
        register(running_app, "shop-ios", profile, token)
    result = dispatch(
        running_app,
        app_ids=["shop-ios"],
        targets={"segment": {"sync_id": "vip-push", "audience": "vip"}},
        defaults={"first_name": "VIP"},
    )
    assert result["detail"]["profiles"] == 5 and result["counts"]["messages.sent"] == 5
    delivered = {d["token"] for d in push_fakes.apns.state.delivered}
    assert {tokens[r["crmId"]] for i, r in enumerate(rows) if i % 2} <= delivered
    assert not {tokens[r["crmId"]] for i, r in enumerate(rows) if not i % 2} & delivered


def test_fifty_thousand_targets_fan_out_through_the_queue(
    running_app,
    storage,
    push_fakes,  # type: ignore[no-untyped-def]
) -> None:
    run = uuid.uuid4().hex[:6]
    profiles = [f"M-{run}-{n:05d}" for n in range(50_000)]
    now = datetime.now(UTC)
    rows = []
    for profile in profiles:
        token = secrets.token_hex(32)
        device = Device(
            app_id="shop-ios",
            token=token,
            token_hash=token_hash(token),
            platform="ios",
            environment="production",
            registered_at=now,
        )
        rows.append(
            ProfileDevices(
                partition_key=profile_partition(profile),
                row_key=safe_key(profile),
                profile_id=profile,
                devices=DeviceList(items=[device]),
            )
        )
    # Registered in bulk through the registry's table (the route is tested above).
    storage.tables.get(ProfileDevices).write_batch(rows, parallel=16)
    before = len(push_fakes.apns.state.delivered)
    answer = post(
        running_app,
        "push/send",
        {
            "template": TEMPLATE,
            "app_ids": ["shop-ios"],
            "targets": {"profile_ids": profiles},
            "defaults": {"first_name": "friend"},
        },
    )
    assert answer.status_code == 202
    assert answer.json()["status"] == "received"  # answered at once: sent later, by workers
    result = wait(running_app, answer.json()["dispatch_id"], timeout=300)
    assert result["status"] == "succeeded"
    assert result["chunks"] == {"total": 25, "done": 25}
    assert result["counts"]["messages.sent"] == 50_000
    assert len(push_fakes.apns.state.delivered) - before == 50_000


def test_a_dispatch_whose_stored_request_is_gone_fails_with_the_reason(app_env) -> None:  # type: ignore[no-untyped-def]
    from core.push.chunk_runner import run_chunk
    from core.push.dispatch import plan
    from core.push.dispatch_model import PlanMessage, PushChunkMessage
    from core.runs import RunKind, RunStatus
    from core.services import Services
    from core.settings import Settings

    services = Services.from_settings(Settings(**app_env))  # type: ignore[arg-type]
    unplanned = services.runs.start(RunKind.PUSH_DISPATCH, status=RunStatus.RECEIVED)
    plan(services, PlanMessage(dispatch_id=unplanned.run_id))
    chunked = services.runs.start(RunKind.PUSH_DISPATCH, status=RunStatus.RUNNING)
    services.storage.tables.get(ChunkState).insert(
        ChunkState(partition_key=chunked.run_id, row_key="chunk-00001", profiles=1)
    )
    run_chunk(services, PushChunkMessage(dispatch_id=chunked.run_id, chunk=1))
    for run_id, reason in ((unplanned.run_id, "cannot plan"), (chunked.run_id, "chunk-00001")):
        failed = services.runs.get(run_id)
        assert failed is not None and failed.status == RunStatus.FAILED
        assert failed.error is not None and reason in failed.error
