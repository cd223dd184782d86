"""Currents ingestion through the local host: Avro files in the local S3 server, the timer
fired through the admin API, fan-out over the queue, the event store and suppressions in
Azurite."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from core.currents.files import FileLedger, FileReceipt, FileStatus
from core.currents.mapping import KNOWN_TYPES
from core.currents.s3 import CurrentsObject, parse_key, s3_client
from core.events.store import EventStore
from core.services import Services
from core.settings import Settings
from devhost.fakes.currents import (
    BRAND_NUMBER,
    EVENT_TYPES,
    avro_bytes,
    currents_key,
    event_id,
    put_file,
    record_for,
)
from devhost.process import HostProcess
from devhost.services import free_port
from tests.helpers import eventually

pytestmark = pytest.mark.integration
PREFIX = "braze/currents"  # as in tests/conftest.py


@pytest.fixture(scope="module")
def currents_env(app_env: dict[str, str]) -> dict[str, str]:
    return app_env


@pytest.fixture(scope="module")
def host(running_app: HostProcess) -> HostProcess:
    """The session's app; its settings (tests/conftest.py) point Currents at a test bucket."""
    return running_app


@pytest.fixture(scope="module")
def s3(currents_env: dict[str, str]) -> Any:
    return s3_client(currents_env["SWITCHBOARD_S3_ENDPOINT_URL"], "us-east-1")


class Files:
    """Writes Currents files for one test and tracks them."""

    def __init__(self, s3: Any, bucket: str) -> None:
        self.s3, self.bucket = s3, bucket
        self.salt = uuid.uuid4().hex
        self.objects: list[CurrentsObject] = []
        self._offset = int(time.time() * 1000) % 10**9

    def put(
        self,
        event_type: str,
        records: list[dict[str, Any]] | None = None,
        *,
        date: str | None = None,
        data: bytes | None = None,
        **options: Any,
    ) -> CurrentsObject:
        date = date or datetime.now(UTC).strftime("%Y-%m-%d-%H")
        self._offset += 1
        key = currents_key(
            PREFIX, event_type, date, offset=self._offset, schema_id=options.pop("schema_id", 1)
        )
        body = data if data is not None else avro_bytes(event_type, records or [], **options)
        etag = put_file(self.s3, self.bucket, key, body)
        obj = parse_key(self.bucket, key, etag, len(body))
        assert obj is not None
        self.objects.append(obj)
        return obj

    def records(self, event_type: str, numbers: range, **values: Any) -> list[dict[str, Any]]:
        moment = int(time.time()) - 120
        return [record_for(event_type, n, moment, salt=self.salt, **values) for n in numbers]

    def id_of(self, event_type: str, number: int) -> str:
        return "braze:" + event_id(event_type, number, self.salt)


@pytest.fixture
def files(s3: Any, currents_env: dict[str, str]) -> Iterator[Files]:
    """A test's Currents files, removed from S3 after it: a later test's discovery (in any
    order) finds only its own."""
    made = Files(s3, currents_env["SWITCHBOARD_CURRENTS_BUCKET"])
    yield made
    for obj in made.objects:
        s3.delete_object(Bucket=obj.bucket, Key=obj.key)


def fire(host: HostProcess) -> dict[str, Any]:
    """Fire the Currents timer through the admin API; the finished run it recorded."""
    before = {r["run_id"] for r in _runs(host)}
    answer = requests.post(f"{host.base_url}/admin/functions/currents_timer", json={}, timeout=5)
    assert answer.status_code == 202

    def finished() -> dict[str, Any] | None:
        new = [r for r in _runs(host) if r["run_id"] not in before and r["source"] == "timer"]
        return new[0] if new and new[0]["status"] in ("succeeded", "failed") else None

    return eventually(finished, timeout=60)


def _runs(host: HostProcess) -> list[dict[str, Any]]:
    params = {"kind": "currents", "limit": "500"}
    answer = requests.get(f"{host.base_url}/api/runs", params=params, timeout=5)
    return list(answer.json()["runs"])


def receipt(storage: Any, obj: CurrentsObject) -> FileReceipt | None:
    return FileLedger(storage).receipts_of_folder(obj).get(FileReceipt.row_for(obj))


def wait_finished(storage: Any, objects: list[CurrentsObject], timeout: float = 90) -> None:
    def all_finished() -> bool:
        found = [receipt(storage, obj) for obj in objects]
        return all(r is not None and r.status == FileStatus.DONE for r in found)

    eventually(all_finished, timeout=timeout)


def stored_ids(storage: Any) -> Counter[str]:
    now = datetime.now(UTC)
    store = EventStore(storage)
    return Counter(
        e.event_id for e in store.read_window(now - timedelta(hours=2), now + timedelta(hours=2))
    )


def stored_events(storage: Any, ids: set[str]) -> dict[str, Any]:
    now = datetime.now(UTC)
    store = EventStore(storage)
    window = store.read_window(now - timedelta(hours=2), now + timedelta(hours=2))
    return {e.event_id: e for e in window if e.event_id in ids}


def test_every_mapped_type_fans_out_over_the_queue_and_lands_once(host, storage, files) -> None:  # type: ignore[no-untyped-def]
    mapped = sorted(KNOWN_TYPES)
    assert set(EVENT_TYPES) <= set(mapped)  # the generator knows their specific fields
    for event_type in mapped:
        files.put(event_type, files.records(event_type, range(3)))
    run = fire(host)
    assert run["status"] == "succeeded"
    assert run["counts"]["files.new"] == len(mapped)
    assert run["counts"]["files.queued"] == len(mapped)  # above the inline limit of 3
    wait_finished(storage, files.objects)

    expected = {files.id_of(t, n): t for t in mapped for n in range(3)}
    events = stored_events(storage, set(expected))
    assert set(events) == set(expected)
    for event_id_, event_type in expected.items():
        kind = KNOWN_TYPES[event_type]
        assert events[event_id_].type is kind.type and events[event_id_].source_type == event_type
    counts = stored_ids(storage)
    assert all(counts[i] == 1 for i in expected)

    # Each fanned-out file reported its own run (what it read, stored and dropped).
    def reported() -> set[str]:
        queued = [r for r in _runs(host) if (r["source"] or "").startswith("queue")]
        return {r["detail"]["key"] for r in queued} & {o.key for o in files.objects}

    # (a file's run is recorded just after its receipt, so wait for the last ones)
    eventually(lambda: len(reported()) == len(mapped), timeout=30)
    again = fire(host)
    assert again["counts"]["files.new"] == 0
    assert again["counts"]["files.finished_before"] >= len(mapped)


def test_duplicates_and_a_second_ingestion_change_nothing(host, storage, files) -> None:  # type: ignore[no-untyped-def]
    opens = "users.messages.email.Open"
    records = files.records(opens, range(5))
    first = files.put(opens, [*records, records[0]])  # the same event twice in one file
    second = files.put(opens, files.records(opens, range(3, 8)))  # overlaps the first
    run = fire(host)
    assert run["counts"]["files.ingested"] == 2
    assert run["counts"]["events.records"] == 11
    assert run["counts"]["events.stored"] == 8
    assert run["counts"]["events.duplicates.in_file"] == 1
    assert run["counts"]["events.duplicates.in_store"] == 2
    ids = {files.id_of(opens, n) for n in range(8)}
    before = {i: n for i, n in stored_ids(storage).items() if i in ids}
    assert before == dict.fromkeys(ids, 1)

    # Forget that the files were read (as if their receipts were lost) and read them again,
    # and copy them under new keys as a Braze re-delivery would.
    ledger = FileLedger(storage)
    for obj in (first, second):
        ledger.receipts.delete(FileReceipt.partition_for(obj), FileReceipt.row_for(obj))
    files.put(opens, [*records, records[0]])
    rerun = fire(host)
    assert rerun["counts"]["files.ingested"] == 3
    assert rerun["counts"].get("events.stored", 0) == 8  # the same two segments, re-found
    after = {i: n for i, n in stored_ids(storage).items() if i in ids}
    assert after == before


def test_a_late_file_in_an_older_hour_folder_is_still_found(host, storage, files) -> None:  # type: ignore[no-untyped-def]
    sends = "users.messages.email.Send"
    files.put(sends, files.records(sends, range(2)))
    assert fire(host)["counts"]["files.ingested"] == 1
    older = (datetime.now(UTC) - timedelta(hours=5)).strftime("%Y-%m-%d-%H")
    late = files.put(sends, files.records(sends, range(2, 4)), date=older)
    run = fire(host)
    assert run["counts"]["files.ingested"] == 1
    assert receipt(storage, late).status == FileStatus.DONE  # type: ignore[union-attr]
    assert set(stored_events(storage, {files.id_of(sends, 3)})) == {files.id_of(sends, 3)}


def test_schema_evolution_new_fields_and_schema_id_are_read(host, storage, files) -> None:  # type: ignore[no-untyped-def]
    clicks = "users.messages.email.Click"
    records = files.records(clicks, range(2), brand_new_field="kept")
    files.put(clicks, records, extra_fields=["brand_new_field"], schema_id=2, codec="deflate")
    run = fire(host)
    assert run["counts"]["files.ingested"] == 1
    event = stored_events(storage, {files.id_of(clicks, 0)})[files.id_of(clicks, 0)]
    assert event.raw["brand_new_field"] == "kept" and event.url == "https://example.com/offer"


def test_corrupt_files_are_reported_and_quarantined_while_others_flow(host, storage, files) -> None:  # type: ignore[no-untyped-def]
    opens = "users.messages.email.Open"
    good = avro_bytes(opens, files.records(opens, range(200)))
    truncated = files.put(opens, data=good[: len(good) // 2])
    not_avro = files.put(opens, data=b"email,opened\nsomeone@example.com,1\n")
    fine = files.put(opens, files.records(opens, range(300, 302)))
    run = fire(host)
    assert run["status"] == "succeeded"
    assert run["counts"]["files.ingested"] == 1 and run["counts"]["files.failed"] == 2
    errors = {e["key"]: e["error"] for e in run["detail"]["errors"]}
    assert "corrupt Avro" in errors[truncated.key] and "not an Avro file" in errors[not_avro.key]
    assert receipt(storage, fine).status == FileStatus.DONE  # type: ignore[union-attr]
    # Nothing of the truncated file is stored, though its first blocks were readable.
    assert not stored_events(storage, {files.id_of(opens, 0)})

    assert fire(host)["counts"]["files.quarantined"] == 2  # second and last attempt
    for obj in (truncated, not_avro):
        found = receipt(storage, obj)
        assert found is not None and found.status == FileStatus.QUARANTINED and found.attempts == 2
    assert fire(host)["counts"]["files.new"] == 0  # quarantined files are left alone


def test_bounces_unsubscribes_and_complaints_reach_the_suppression_list(host, files) -> None:  # type: ignore[no-untyped-def]
    tag = uuid.uuid4().hex[:8]
    bounced, unsubscribed, complained = (f"{n}-{tag}@example.com" for n in "buc")
    moment = int(time.time()) - 600
    for kind, address in (
        ("Bounce", bounced),
        ("Unsubscribe", unsubscribed),
        ("MarkAsSpam", complained),
    ):
        event_type = f"users.messages.email.{kind}"
        record = record_for(event_type, 1, moment, salt=files.salt, email_address=address)
        files.put(event_type, [record])
    assert fire(host)["counts"]["events.suppression.rows_changed"] == 3

    def reasons(address: str) -> list[str]:
        answer = requests.post(
            f"{host.base_url}/api/suppressions/lookup",
            json={"channel": "email", "address": address},
            timeout=5,
        )
        return list(answer.json()["reasons"])

    assert reasons(bounced) == ["hard_bounce"]
    assert reasons(unsubscribed) == ["unsubscribe"]
    assert reasons(complained) == ["spam_complaint"]

    # A later re-subscribe lifts the unsubscribe, never the hard bounce.
    change = "users.behaviors.subscription.GlobalStateChange"
    files.put(change, [
        record_for(change, n, moment + 60, salt=files.salt, email_address=address,
                   channel="email", subscription_status="Subscribed")
        for n, address in enumerate((bounced, unsubscribed))
    ])  # fmt: skip
    fire(host)
    assert reasons(unsubscribed) == [] and reasons(bounced) == ["hard_bounce"]


def test_unknown_event_types_are_stored_counted_and_reported(host, storage, files) -> None:  # type: ignore[no-untyped-def]
    kind = "users.campaigns.Conversion"
    files.put(kind, files.records(kind, range(4)))
    run = fire(host)
    assert run["counts"]["events.generic"] == 4 and kind in run["detail"]["generic_types"]
    stored = stored_events(storage, {files.id_of(kind, 0)})
    assert stored[files.id_of(kind, 0)].type.value == "other"


def test_a_missing_bucket_fails_the_run_with_a_clear_error(currents_env: dict[str, str]) -> None:
    from core.currents.discovery import run_currents

    settings = Settings(**{**currents_env, "SWITCHBOARD_CURRENTS_BUCKET": "no-such-bucket"})  # type: ignore[arg-type]
    run = run_currents(Services.from_settings(settings))
    assert run.status == "failed" and run.error is not None
    assert "NoSuchBucket" in run.error and "no-such-bucket" in run.error


def test_a_host_killed_mid_file_ends_with_the_clean_run_store(
    host, storage, files, currents_env, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from core.verdicts import sweep

    delivered = "users.messages.email.Delivery"
    big = files.put(delivered, files.records(delivered, range(60_000)))
    before = {r["run_id"] for r in _runs(host)}
    doomed = HostProcess(currents_env, free_port(), tmp_path / "doomed.log")
    try:
        doomed.wait_ready()
        requests.post(f"{doomed.base_url}/admin/functions/currents_timer", json={}, timeout=5)
        eventually(lambda: (r := receipt(storage, big)) is not None and r.status == "processing")
        os.kill(doomed.process.pid, signal.SIGKILL)  # mid-file: no cleanup, nothing finished
    finally:
        doomed.stop()
    assert receipt(storage, big).status == FileStatus.PROCESSING  # type: ignore[union-attr]
    [dead] = [r["run_id"] for r in _runs(host)
              if r["run_id"] not in before and r["source"] == "timer"]  # fmt: skip
    claimed = receipt(storage, big).claimed_until  # type: ignore[union-attr]
    assert claimed is not None
    # The dead worker's claim runs out (SWITCHBOARD_CURRENTS_CLAIM_SECONDS) before a retry.
    eventually(lambda: datetime.now(UTC) > claimed, timeout=60)
    run = fire(host)
    assert run["counts"]["files.ingested"] == 1
    ids = {files.id_of(delivered, n) for n in range(60_000)}
    counts = stored_ids(storage)
    assert all(counts[i] == 1 for i in ids)
    # The killed host's run: nothing ends it but the sweeper, once its deadline passes.
    services = Services.from_settings(Settings(**currents_env))  # type: ignore[arg-type]
    [swept] = sweep(services, now=datetime.now(UTC) + timedelta(days=1), only={dead})
    assert swept.status == "failed" and swept.error_code == "deadline_exceeded"


def test_listing_pages_through_folders_and_an_object_gone_before_reading_fails_clearly(
    storage, files, currents_env
) -> None:  # type: ignore[no-untyped-def]
    from core.currents.discovery import config_of
    from core.currents.ingest import ingest_file
    from core.currents.s3 import event_type_folders, list_folder

    sends = "users.messages.pushnotification.Send"
    written = [files.put(sends, files.records(sends, range(n, n + 1))) for n in range(5)]
    bucket = currents_env["SWITCHBOARD_CURRENTS_BUCKET"]
    folder = next(f for f in event_type_folders(files.s3, bucket, PREFIX) if sends in f)
    listed = list(list_folder(files.s3, bucket, folder, "2000-01-01-00", page_size=2))
    assert {o.key for o in written} <= {o.key for o in listed}

    gone = written[0]
    files.s3.delete_object(Bucket=bucket, Key=gone.key)
    config = config_of(Services.from_settings(Settings(**currents_env)))  # type: ignore[arg-type]
    assert config is not None
    report = ingest_file(config.context(storage, files.s3), gone)
    assert report.outcome == "failed" and "NoSuchKey" in (report.error or "")


def _zigzag_varint(value: int) -> bytes:
    encoded, out = value << 1, bytearray()
    while True:
        byte = encoded & 0x7F
        encoded >>= 7
        out.append(byte | (0x80 if encoded else 0))
        if not encoded:
            return bytes(out)


def test_an_avro_block_declaring_a_terabyte_is_refused_not_read(
    storage, files, currents_env
) -> None:  # type: ignore[no-untyped-def]
    from core.currents.discovery import config_of
    from core.currents.ingest import ingest_file

    kind = "users.messages.email.Send"
    valid = avro_bytes(kind, files.records(kind, range(3)))
    header_end = valid.index(valid[-16:]) + 16  # the sync marker closes the header
    _, rest = valid[:header_end], valid[header_end:]
    count_and_size = _zigzag_varint(3) + _zigzag_varint(1 << 40)
    broken = valid[:header_end] + count_and_size + rest[2:]
    obj = files.put(kind, data=broken)
    config = config_of(Services.from_settings(Settings(**currents_env)))  # type: ignore[arg-type]
    assert config is not None
    report = ingest_file(config.context(storage, files.s3), obj)
    assert report.outcome == "failed" and "declares 1099511627776 bytes" in (report.error or "")


def _lookup(host: HostProcess, channel: str, address: str) -> list[str]:
    answer = requests.post(
        f"{host.base_url}/api/suppressions/lookup",
        json={"channel": channel, "address": address},
        timeout=5,
    )
    return list(answer.json()["reasons"])


def test_an_unsubscribe_and_a_subscribe_in_the_same_second_suppress_in_either_order(
    host, files
) -> None:  # type: ignore[no-untyped-def]
    """Each in its own file, ingested one after the other, in both orders."""
    moment = int(time.time()) - 300
    unsubscribe = "users.messages.email.Unsubscribe"
    change = "users.behaviors.subscription.GlobalStateChange"

    def put(kind: str, address: str) -> None:
        values = {"channel": "email", "subscription_status": "Subscribed"} if kind == change else {}
        salt = files.salt + address
        files.put(kind, [record_for(kind, 1, moment, salt=salt, email_address=address, **values)])

    tag = uuid.uuid4().hex[:8]
    for n, order in enumerate(((unsubscribe, change), (change, unsubscribe))):
        address = f"tie{n}-{tag}@example.com"
        for kind in order:
            put(kind, address)
            fire(host)
        assert _lookup(host, "email", address) == ["unsubscribe"], order


def test_a_stop_keyword_suppresses_the_person_never_the_brand_number(host, storage, files) -> None:  # type: ignore[no-untyped-def]
    moment = int(time.time()) - 300
    people = {}
    for n, channel in enumerate(("sms", "whatsapp", "rcs")):
        kind = f"users.messages.{channel}.InboundReceive"
        number = f"+316{uuid.uuid4().int % 10**8:08d}"
        people[channel] = number
        files.put(kind, [record_for(kind, n, moment, salt=files.salt, user_phone_number=number,
                                    message_body="STOP", action="Unsubscribed")])  # fmt: skip
    # A message that matched no keyword changes nothing.
    bystander = f"+316{uuid.uuid4().int % 10**8:08d}"
    kind = "users.messages.sms.InboundReceive"
    files.put(kind, [record_for(kind, 9, moment, salt=files.salt, user_phone_number=bystander,
                                message_body="hello", action="None")])  # fmt: skip
    fire(host)  # four files: they may be queued and taken by the file workers
    wait_finished(storage, files.objects)
    for channel, number in people.items():
        assert _lookup(host, "phone", number) == ["unsubscribe"], channel
    assert _lookup(host, "phone", bystander) == []
    assert _lookup(host, "phone", BRAND_NUMBER) == []
