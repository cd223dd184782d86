"""The four-hourly log export against Azurite: files checked byte by byte against the JSON
Schemas, exactly once across retries and crashes, catch-up, the guard, quarantine rules."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from jsonschema import Draft202012Validator

from core.currents.files import FileLedger
from core.currents.ingest import IngestContext, ingest_file
from core.currents.mapping import KNOWN_TYPES, kind_of, to_event
from core.currents.s3 import parse_key, s3_client
from core.errors import TerminalError
from core.events.store import EventStore
from core.export.quarantine import AddressEvent, AddressState, AddressStatus, apply_event
from core.export.service import (
    ExportSettings,
    ExportWatermark,
    Window,
    export_window,
    run_log_export,
)
from core.export.xdm import XdmOptions
from core.services import Services
from core.settings import Settings
from devhost.fakes.currents import avro_bytes, currents_key, put_file, record_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = {
    name: Draft202012Validator(
        json.loads((ROOT / f"schemas/xdm/{file}.schema.json").read_text()),
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )
    for name, file in (
        ("broadLog", "broadlog"), ("trackingLog", "trackinglog"),
        ("nonDeliverableAddresses", "non-deliverable-address"), ("manifest", "manifest"),
    )
}  # fmt: skip


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def services(local_services: dict[str, str]) -> Services:
    return Services.from_settings(Settings(**local_services))  # type: ignore[arg-type]


@pytest.fixture
def window() -> Window:
    """A window of its own, far from now and from every other test's."""
    return Window(
        datetime(2050, 1, 1, tzinfo=UTC) + timedelta(hours=4 * (uuid.uuid4().int % 50_000))
    )


@pytest.fixture
def options(window: Window) -> ExportSettings:
    container = f"export-{uuid.uuid4().hex[:12]}"
    return ExportSettings(container, XdmOptions("switchboard", "crmId"), 5, start=window.start)


class Events:
    """Stored-form events for one test, placed into the store at chosen ingestion times."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.salt = uuid.uuid4().hex
        self.count = 0

    def make(self, kind: str, at: datetime, **values: Any) -> dict[str, Any]:
        self.count += 1
        # Addresses of this test's own: quarantine states are shared by every window.
        values.setdefault("email_address", f"user{self.count}-{self.salt[:8]}@example.com")
        record = record_for(kind, self.count, int(at.timestamp()), salt=self.salt, **values)
        return to_event(record, kind, kind_of(kind))

    def place(self, events: list[dict[str, Any]], ingested: datetime) -> None:
        store = EventStore(self.storage, clock=Clock(ingested))
        writer = store.writer("test", f"seg-{uuid.uuid4().hex}")
        for event in events:
            writer.add(event)
        assert writer.place().hour is not None


@pytest.fixture
def events(storage: Any) -> Events:
    return Events(storage)


def read_blob(storage: Any, container: str, name: str) -> bytes:
    return b"".join(storage.blobs.iter_chunks(storage.blobs.ref(container, name)))


def check_window_files(storage: Any, container: str, window: Window) -> dict[str, list[dict]]:
    """Every file of the window, byte by byte: gzip, UTF-8, one compact JSON object per
    line, valid against its schema, as counted and hashed by the manifest."""
    manifest = json.loads(read_blob(storage, container, window.manifest_name))
    assert not list(SCHEMAS["manifest"].iter_errors(manifest))
    records: dict[str, list[dict]] = {}
    for entry in manifest["files"]:
        data = read_blob(storage, container, entry["name"])
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
        text = gzip.decompress(data).decode("utf-8")  # strict: fails on anything not UTF-8
        assert not text.startswith("\ufeff") and (text == "" or text.endswith("\n"))
        lines = text.splitlines()
        assert len(lines) == entry["records"]
        parsed = []
        for line in lines:
            record = json.loads(line)
            assert json.dumps(record, separators=(",", ":"), ensure_ascii=False) == line
            errors = [e.message for e in SCHEMAS[entry["log"]].iter_errors(record)]
            assert not errors, (entry["log"], errors, record)
            parsed.append(record)
        assert len({r["_id"] for r in parsed}) == len(parsed)
        records[entry["log"]] = parsed
    assert entry["name"] == window.blob_name("nonDeliverableAddresses")
    return records


def test_a_window_becomes_three_schema_valid_files_and_a_manifest(
    services, storage, events, window, options
) -> None:  # type: ignore[no-untyped-def]
    at = window.start + timedelta(minutes=30)
    bounced, unsubscribed = f"b-{events.salt[:8]}@example.com", f"u-{events.salt[:8]}@example.com"
    batch = [
        events.make("users.messages.email.Send", at),
        events.make("users.messages.email.Delivery", at),
        events.make("users.messages.email.Open", at, machine_open="true"),
        events.make("users.messages.email.Open", at),
        events.make("users.messages.email.Click", at),
        events.make("users.messages.email.Bounce", at, email_address=bounced),
        events.make("users.messages.email.SoftBounce", at),
        events.make("users.messages.email.Unsubscribe", at, email_address=unsubscribed),
        events.make("users.messages.email.MarkAsSpam", at),
        events.make("users.messages.pushnotification.Send", at),
        events.make("users.messages.pushnotification.Open", at),
        events.make("users.messages.pushnotification.Bounce", at, push_token="tok-dead"),
        events.make("users.messages.sms.Delivery", at),
        events.make("users.behaviors.CustomEvent", at),  # not a log record
    ]
    events.place(batch, window.start + timedelta(hours=1))
    outcome = run_log_export(services, now=window.end + timedelta(minutes=1), options=options)
    assert outcome.refused is None and outcome.run.status == "succeeded"
    assert outcome.run.counts["windows"] == 1

    records = check_window_files(storage, options.container, window)
    broadlog, tracking = records["broadLog"], records["trackingLog"]
    assert len(broadlog) == 7 and len(tracking) == 6
    by_type = {r["eventType"] for r in broadlog}
    assert {"directMarketing.emailSent", "directMarketing.emailBounced"} <= by_type
    hard = next(r for r in broadlog if r["eventType"] == "directMarketing.emailBounced")
    failure = hard["_experience"]["customerJourneyManagement"]["messageDeliveryfeedback"]
    assert failure["messageFailure"] == {
        "type": "hard", "category": "async", "reason": "550 5.1.1 mailbox unknown", "code": "5.1.1"
    }  # fmt: skip
    assert hard["identityMap"]["crmId"][0]["primary"] is True
    assert hard["identityMap"]["Email"] == [{"id": bounced, "primary": False}]
    interactions = [
        r["_experience"]["customerJourneyManagement"]["messageInteraction"]["interactionType"]
        for r in tracking
    ]
    assert sorted(interactions) == sorted(
        ["bot_open", "open", "click", "unsubscribe", "spam_complaint", "open"]
    )
    statuses = {
        r["_switchboard"]["nonDeliverable"]["address"]: r["_switchboard"]["nonDeliverable"][
            "status"
        ]
        for r in records["nonDeliverableAddresses"]
    }
    assert statuses[bounced] == "Quarantine" and statuses["tok-dead"] == "Quarantine"
    assert "With errors" in statuses.values() and "On denylist" in statuses.values()


def test_a_retried_window_rewrites_the_same_bytes_and_applies_quarantine_once(
    services, storage, events, window, options
) -> None:  # type: ignore[no-untyped-def]
    address = f"soft-{events.salt[:8]}@example.com"
    soft = events.make("users.messages.email.SoftBounce", window.start, email_address=address)
    events.place([soft, events.make("users.messages.email.Send", window.start)], window.start)
    # A crash after the files, before the watermark: the files are there, nothing else.
    export_window(services, window, options)
    first = {
        name: read_blob(storage, options.container, window.blob_name(name))
        for name in ("broadLog", "trackingLog", "nonDeliverableAddresses")
    }
    outcome = run_log_export(services, now=window.end, options=options)
    assert outcome.run.counts["windows"] == 1
    for name, data in first.items():
        assert read_blob(storage, options.container, window.blob_name(name)) == data
    records = check_window_files(storage, options.container, window)
    state = records["nonDeliverableAddresses"][0]["_switchboard"]["nonDeliverable"]
    assert state["errorCount"] == 1 and state["status"] == "With errors"  # not counted twice

    # An operator re-export of the window rewrites the very same bytes.
    again = run_log_export(
        services, now=window.end + timedelta(hours=1), force=True,
        window_start=window.start, options=options,
    )  # fmt: skip
    assert again.refused is None
    for name, data in first.items():
        assert read_blob(storage, options.container, window.blob_name(name)) == data
    mark = storage.tables.get(ExportWatermark).get(options.container, "watermark")
    assert mark.entity.exported_through == window.end


def test_the_c_speedups_and_the_reference_write_the_same_files(
    services, storage, events, window, options
) -> None:  # type: ignore[no-untyped-def]
    kinds = sorted(KNOWN_TYPES)
    batch = [
        events.make(kinds[n % len(kinds)], window.start + timedelta(seconds=n),
                    email_address=f"user{n % 40}-{events.salt[:6]}@example.com")
        for n in range(3_000)
    ]  # fmt: skip
    events.place(batch, window.start + timedelta(minutes=5))
    reference = dataclasses.replace(
        options, container=f"{options.container}-py", native_records=False
    )
    files = {}
    for settings in (options, reference):
        export_window(services, window, settings)
        files[settings.native_records] = {
            name: read_blob(storage, settings.container, window.blob_name(name))
            for name in ("broadLog", "trackingLog")
        }
        check_window_files(storage, settings.container, window)
    assert files[True] == files[False]
    assert all(len(data) > 1_000 for data in files[True].values())


def test_catch_up_exports_every_missed_window_in_order_and_empty_ones_get_manifests(
    services, storage, events, window, options
) -> None:  # type: ignore[no-untyped-def]
    third = Window(window.start + timedelta(hours=8))
    events.place([events.make("users.messages.email.Send", window.start)], window.start)
    events.place([events.make("users.messages.email.Open", third.start)], third.start)
    outcome = run_log_export(services, now=third.end + timedelta(minutes=5), options=options)
    labels = [w["window"] for w in outcome.run.detail["windows"]]
    assert labels == [window.label, Window(window.start + timedelta(hours=4)).label, third.label]
    empty = check_window_files(
        storage, options.container, Window(window.start + timedelta(hours=4))
    )
    assert all(records == [] for records in empty.values())
    assert len(check_window_files(storage, options.container, third)["trackingLog"]) == 1
    forced = run_log_export(
        services, now=third.end + timedelta(minutes=6), force=True, options=options
    )
    assert forced.run.counts["windows"] == 0  # nothing is exported twice


def test_the_guard_allows_one_export_per_four_hour_slot_unless_forced(
    services, window, options
) -> None:  # type: ignore[no-untyped-def]
    now = window.end + timedelta(minutes=1)
    assert run_log_export(services, now=now, options=options).refused is None
    second = run_log_export(services, now=now + timedelta(hours=3), options=options)
    assert second.refused == "export_guard" and second.run.detail["skipped"] == "export_guard"
    assert (
        run_log_export(services, now=now + timedelta(hours=3), force=True, options=options).refused
        is None
    )
    assert run_log_export(services, now=now + timedelta(hours=4), options=options).refused is None


def test_an_event_placed_after_its_window_was_read_lands_in_the_next_window(
    services, storage, events, window, options
) -> None:  # type: ignore[no-untyped-def]
    events.place([events.make("users.messages.email.Send", window.start)], window.start)
    assert run_log_export(services, now=window.end, options=options).run.counts["windows"] == 1
    late = events.make("users.messages.email.Delivery", window.start)
    events.place([late], window.end - timedelta(seconds=1))  # racing the export's seal
    following = Window(window.end)
    run_log_export(services, now=following.end, options=options)
    records = check_window_files(storage, options.container, following)["broadLog"]
    assert [r["_switchboard"]["hub"]["sourceEventId"] for r in records] == [late["event_id"]]
    assert len(check_window_files(storage, options.container, window)["broadLog"]) == 1


def test_quarantine_rules_follow_campaign() -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)

    def soft(hours: float) -> AddressEvent:
        return AddressEvent(
            start + timedelta(hours=hours), f"e{hours}", "bounced_soft", "452 full", None
        )

    state = AddressState(channel="email", key="x")
    for hours in (0, 1, 23):  # within 24 h of the first: one significant error
        apply_event(state, soft(hours), "email", threshold=3)
    assert state.status == AddressStatus.WITH_ERRORS and state.error_count == 1
    apply_event(state, soft(25), "email", threshold=3)
    apply_event(state, soft(50), "email", threshold=3)
    assert state.status == AddressStatus.QUARANTINE and state.error_count == 3

    recovering = AddressState(channel="email", key="y")
    apply_event(recovering, soft(0), "email", threshold=5)
    apply_event(recovering, soft(30), "email", threshold=5)
    apply_event(recovering, soft(30 + 24 * 11), "email", threshold=5)  # over 10 days later
    assert recovering.error_count == 1  # the count started again
    delivered = AddressEvent(start + timedelta(days=20), "d", "delivered", None, None)
    apply_event(recovering, delivered, "email", threshold=5)
    assert recovering.status == AddressStatus.VALID and recovering.error_count == 0

    hard = AddressState(channel="email", key="z")
    apply_event(hard, AddressEvent(start, "h", "bounced_hard", "550 5.1.1", None), "email", 5)
    assert hard.status == AddressStatus.QUARANTINE and hard.failure_type == "hard"
    apply_event(hard, delivered, "email", threshold=5)
    assert hard.status == AddressStatus.QUARANTINE  # never lifted by itself
    apply_event(hard, AddressEvent(start, "s", "spam_complaint", None, None), "email", 5)
    assert hard.status == AddressStatus.ON_DENYLIST


def test_currents_files_through_ingestion_to_the_export(
    services, storage, local_services, window, options
) -> None:  # type: ignore[no-untyped-def]
    s3 = s3_client(local_services["SWITCHBOARD_S3_ENDPOINT_URL"], "us-east-1")
    bucket = f"export-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    moment = int((window.start + timedelta(minutes=10)).timestamp())
    objects = []
    for offset, kind in enumerate(("users.messages.email.Send", "users.messages.email.Click")):
        records = [record_for(kind, n, moment, salt=bucket) for n in range(3)]
        key = currents_key("c", kind, f"{window.start:%Y-%m-%d-%H}", offset=offset)
        body = avro_bytes(kind, records)
        objects.append(parse_key(bucket, key, put_file(s3, bucket, key, body), len(body)))
    # The store's clock puts the segments in the window's ingestion hours.
    context = IngestContext(
        storage,
        s3,
        3,
        EventStore(storage, clock=Clock(window.start + timedelta(hours=2))),
        FileLedger(storage),
    )
    for obj in objects:
        assert ingest_file(context, obj).outcome == "ingested"
    run_log_export(services, now=window.end, options=options)
    records = check_window_files(storage, options.container, window)
    assert len(records["broadLog"]) == 3 and len(records["trackingLog"]) == 3
    clicks = records["trackingLog"]
    assert {r["_experience"]["campaign"]["url"] for r in clicks} == {"https://example.com/offer"}


def test_operator_route_runs_the_export_and_answers_409_on_the_guard(running_app) -> None:  # type: ignore[no-untyped-def]
    url = f"{running_app.base_url}/api/log-export/run"
    first = requests.post(url, json={}, timeout=30)
    assert first.status_code in (200, 409)  # the timer may have had this slot already
    second = requests.post(url, json={}, timeout=30)
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "export_guard"
    forced = requests.post(url, json={"force": True}, timeout=30)
    assert forced.status_code == 200 and forced.json()["detail"]["forced"] is True
    bad = requests.post(url, json={"force": "sometimes"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"


def test_a_host_killed_mid_export_retries_to_the_same_files_as_a_clean_export(
    services, storage, events, local_services, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    from core.export.service import window_floor
    from core.verdicts import sweep
    from devhost.process import HostProcess
    from devhost.services import free_port
    from tests.helpers import eventually

    window = Window(window_floor(datetime.now(UTC)) - timedelta(hours=8))  # complete, past
    kinds = ["users.messages.email.Send", "users.messages.email.Delivery",
             "users.messages.email.Open", "users.messages.email.SoftBounce"]  # fmt: skip
    batch = [
        events.make(
            kinds[n % 4], window.start + timedelta(seconds=n),
            email_address=f"user{n % 50}-{events.salt[:6]}@example.com",
        )
        for n in range(40_000)
    ]  # fmt: skip
    events.place(batch, window.start + timedelta(hours=1))
    container = f"crash-{uuid.uuid4().hex[:10]}"
    env = {
        **local_services,
        "SWITCHBOARD_EXPORT_CONTAINER": container,
        "SWITCHBOARD_EXPORT_START": window.start.isoformat(),
        "SWITCHBOARD_EXPORT_LEASE_SECONDS": "5",
        "SWITCHBOARD_LOG_EXPORT_SCHEDULE": "0 0 0 1 1 *",  # fired by the test only
    }
    marks = storage.tables.get(ExportWatermark)

    def fire(host: HostProcess) -> None:
        url = f"{host.base_url}/admin/functions/log_export_timer"
        assert requests.post(url, json={}, timeout=5).status_code == 202

    broadlog = storage.blobs.service.get_blob_client(container, window.blob_name("broadLog"))

    def mid_file() -> bool:
        """Blocks of the broadLog file staged, the file not committed yet."""
        try:
            return bool(broadlog.get_block_list("uncommitted")[1])
        except ResourceNotFoundError:
            return False

    doomed = HostProcess(env, free_port(), tmp_path / "doomed.log")
    try:
        doomed.wait_ready()
        fire(doomed)
        eventually(mid_file, timeout=30, interval=0.002)
        os.kill(doomed.process.pid, signal.SIGKILL)  # mid-export: no cleanup
    finally:
        doomed.stop()
    mark = marks.get(container, "watermark")
    assert mark is not None and mark.entity.exported_through is None
    assert not storage.blobs.exists(container, window.manifest_name)
    dead = mark.entity.lease_owner  # the killed run: nothing will end it but the sweeper
    assert dead is not None and services.runs.get(dead).status == "running"

    lease_until = mark.entity.lease_until
    assert lease_until is not None
    eventually(lambda: datetime.now(UTC) > lease_until, timeout=60)  # the dead run's lease
    with HostProcess(env, free_port(), tmp_path / "retry.log") as retry:
        fire(retry)
        done = eventually(
            lambda: (m := marks.get(container, "watermark")) and m.entity.exported_through,
            timeout=60,
        )
    assert done >= window.end
    [swept] = sweep(services, now=datetime.now(UTC) + timedelta(days=1), only={dead})
    assert swept.status == "failed" and swept.error_code == "deadline_exceeded"
    records = check_window_files(storage, container, window)
    assert len(records["broadLog"]) == 30_000 and len(records["trackingLog"]) == 10_000

    clean = ExportSettings(f"clean-{uuid.uuid4().hex[:10]}", XdmOptions("switchboard", "crmId"), 5)
    export_window(services, window, clean)
    for log_name in ("broadLog", "trackingLog", "nonDeliverableAddresses"):
        name = window.blob_name(log_name)
        assert read_blob(storage, container, name) == read_blob(storage, clean.container, name)


def _streaming(fake: Any, **client: Any) -> ExportSettings:
    from core.export.aep import AepStreamingClient, AepStreamingTarget

    target = AepStreamingTarget.model_validate(
        {
            "inlet_url": fake.inlet_url(),
            "org_id": fake.state.org_id,
            "logs": {
                log: {"schema_id": f"https://ns.adobe.com/acme/schemas/{log}", "dataset_id": log}
                for log in ("broadLog", "trackingLog", "nonDeliverableAddresses")
            },
            "max_batch_messages": 7,
        }
    )
    streaming = AepStreamingClient(target, sleep=lambda seconds: None, **client)
    return ExportSettings(
        f"stream-{uuid.uuid4().hex[:10]}",
        XdmOptions("switchboard", "crmId"),
        5,
        streaming=streaming,
    )


def test_aep_streaming_sends_the_same_records_through_429s_and_5xx(
    services, storage, events, window
) -> None:  # type: ignore[no-untyped-def]
    from devhost.fakes.aep import FakeAep

    at = window.start + timedelta(minutes=5)
    kinds = [
        "users.messages.email.Send",
        "users.messages.email.Open",
        "users.messages.email.Bounce",
    ]
    events.place([events.make(kinds[n % 3], at) for n in range(60)], window.start)
    fake = FakeAep(token="aep-token", limit_every=4, fail_every=5).start()
    try:
        options = _streaming(fake, access_token="aep-token")
        result = export_window(services, window, options)
        received = fake.state.received
        assert fake.state.rate_limited > 0 and fake.state.failed > 0
    finally:
        fake.stop()
    files = {f["log"]: f for f in result.manifest["files"]}
    assert files["broadLog"]["records"] == 40 and len(received["broadLog"]) == 40
    assert files["trackingLog"]["records"] == 20 and len(received["trackingLog"]) == 20
    assert files["broadLog"]["delivery"] == "aep_streaming"
    manifest = json.loads(read_blob(storage, options.container, window.manifest_name))
    assert not list(SCHEMAS["manifest"].iter_errors(manifest))
    for log_name, entities in received.items():  # every entity is a valid record of its log
        for entity in entities.values():
            assert not list(SCHEMAS[log_name].iter_errors(entity))
    # The same records as a file export of the window would have.
    files_export = ExportSettings(
        f"files-{uuid.uuid4().hex[:10]}", XdmOptions("switchboard", "crmId"), 5
    )
    export_window(services, window, files_export)
    written = check_window_files(storage, files_export.container, window)
    assert {r["_id"] for r in written["broadLog"]} == set(received["broadLog"])


def test_aep_streaming_refusal_stops_the_run_and_keeps_the_watermark(
    services, storage, events, window
) -> None:  # type: ignore[no-untyped-def]
    from devhost.fakes.aep import FakeAep

    events.place([events.make("users.messages.email.Send", window.start)], window.start)
    fake = FakeAep(token="the-right-one").start()
    try:
        options = _streaming(fake, access_token="a-wrong-one")
        options = ExportSettings(
            options.container, options.xdm, 5, start=window.start, streaming=options.streaming
        )
        with pytest.raises(TerminalError, match="401 unauthorized"):
            run_log_export(services, now=window.end, options=options)
    finally:
        fake.stop()
    mark = storage.tables.get(ExportWatermark).get(options.container, "watermark")
    assert mark is not None and mark.entity.exported_through is None
    assert mark.entity.lease_owner is None  # released for the next try


def test_the_optional_preferences_file_has_the_latest_consent_per_channel(
    services, storage, events, window
) -> None:  # type: ignore[no-untyped-def]
    change = "users.behaviors.subscription.GlobalStateChange"
    group = "users.behaviors.subscriptiongroup.StateChange"
    profile = f"CRM-{events.salt[:8]}"
    at = window.start + timedelta(minutes=1)
    batch = [
        events.make(change, at, external_user_id=profile, channel="email",
                    subscription_status="Unsubscribed"),
        events.make(change, at + timedelta(minutes=5), external_user_id=profile, channel="email",
                    subscription_status="Subscribed"),  # the later one wins
        events.make(change, at, external_user_id=profile, channel="sms",
                    subscription_status="Unsubscribed"),
        events.make(group, at, external_user_id=profile, subscription_group_id="sg-news",
                    subscription_status="Unsubscribed"),
        events.make("users.messages.email.Send", at, external_user_id=profile),  # no effect
    ]  # fmt: skip
    events.place(batch, window.start)
    options = ExportSettings(
        f"prefs-{uuid.uuid4().hex[:10]}", XdmOptions("switchboard", "crmId"), 5, preferences=True
    )
    export_window(services, window, options)
    manifest = json.loads(read_blob(storage, options.container, window.manifest_name))
    assert not list(SCHEMAS["manifest"].iter_errors(manifest))
    entry = next(f for f in manifest["files"] if f["log"] == "profilePreferences")
    lines = gzip.decompress(read_blob(storage, options.container, entry["name"])).splitlines()
    records = [json.loads(line) for line in lines]
    validator = Draft202012Validator(
        json.loads((ROOT / "schemas/xdm/profile-preferences.schema.json").read_text())
    )
    assert all(not list(validator.iter_errors(r)) for r in records)
    mine = next(r for r in records if r["identityMap"]["crmId"][0]["id"] == profile)
    assert mine["consents"]["marketing"]["email"]["val"] == "y"
    assert mine["consents"]["marketing"]["sms"]["val"] == "n"
    assert mine["_switchboard"]["subscriptionGroups"][0]["status"] == "unsubscribed"
