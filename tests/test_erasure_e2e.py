"""Erasure through the local host: a person's data spread over every store (delta state,
rejects, previews, landed files, push registrations, events and their export, the audit
trail, the suppression list), one request, and then no trace of them in any container,
table or queue, searched byte by byte (gzip and Zstandard opened); others untouched."""

from __future__ import annotations

import contextlib
import gzip
import io
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
import zstandard

from core.currents.files import FileLedger
from core.currents.ingest import IngestContext, ingest_file
from core.currents.s3 import parse_key, s3_client
from core.events.store import EventStore
from core.export.service import ExportSettings, Window, export_window
from core.export.xdm import XdmOptions
from core.runs import RunKind, RunLog, RunStatus
from core.services import Services
from core.settings import Settings
from core.suppression import Channel, Reason, SuppressionList
from devhost.fakes.currents import avro_bytes, currents_key, put_file, record_for
from tests.helpers import eventually
from tests.scenarios import ENDED, people, to_csv

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _texts(data: bytes) -> list[bytes]:
    """The bytes as stored, and opened: gzip members, Zstandard frames (one after another)."""
    found = [data]
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError):
            found.append(gzip.decompress(data))
    if b"\x28\xb5\x2f\xfd" in data:  # Zstandard frames, anywhere in a pack
        at = data.find(b"\x28\xb5\x2f\xfd")
        while at >= 0:
            try:
                reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data[at:]))
                found.append(reader.read())
            except zstandard.ZstdError:
                pass
            at = data.find(b"\x28\xb5\x2f\xfd", at + 4)
    return found


def traces(storage: Any, needles: list[bytes]) -> list[str]:
    """Where any of `needles` (lower-cased) is found: every blob, entity and queue message."""
    found = []
    blobs = storage.blobs
    for container in blobs.containers():
        for ref in blobs.list(container):
            read = blobs.read_versioned(container, ref.name)
            if read is None:
                continue
            if any(n in text.lower() for text in _texts(read[0]) for n in needles) or any(
                n in ref.name.lower().encode() for n in needles
            ):
                found.append(f"blob {container}/{ref.name}")
    service = storage.tables.service
    for table in service.list_tables():
        for entity in service.get_table_client(table.name).list_entities():
            text = repr(dict(entity)).lower().encode()
            if any(n in text for n in needles):
                found.append(f"entity {table.name}/{entity['PartitionKey']}/{entity['RowKey']}")
    queues = storage.queues.service
    for queue in queues.list_queues():
        for message in queues.get_queue_client(queue.name).peek_messages(max_messages=32):
            if any(n in str(message.content).lower().encode() for n in needles):
                found.append(f"queue {queue.name}")
    return found


def test_an_erasure_leaves_no_trace_of_the_person_outside_the_hashed_suppression(  # type: ignore[no-untyped-def]
    scenario, storage, running_app, app_env, local_services
) -> None:
    s = scenario("erasure")  # tests/conftest.py: a copy of the `vip` sync
    tag = uuid.uuid4().hex[:6]
    rows = people(f"ER{tag}", 4)
    person, other = rows[1], rows[2]
    s.known(rows)
    # Delta state, and a landed file.
    assert s.land(to_csv(rows))["counts"]["sent"] == 4
    # A rejected row of theirs (rejects file), and a dry run (preview objects).
    bad = [dict(r) for r in rows]
    bad[1]["birthDate"] = "not a date"
    assert s.land(to_csv(bad))["counts"]["rejected"] == 1
    changed = [dict(r) for r in rows]
    changed[1]["firstName"] = "Previewed"
    assert s.land(to_csv(changed), folder="preview/")["counts"]["would_send"] == 1
    # Their device, and events (a Currents file ingested, its window exported).
    token = secrets.token_hex(32)
    registered = requests.post(
        f"{running_app.base_url}/api/push/tokens",
        json={"app_id": "shop-ios", "token": token, "profile_id": person["crmId"],
              "platform": "ios"},
        timeout=30,
    )  # fmt: skip
    assert registered.status_code == 201
    window = Window(
        datetime(2050, 1, 1, tzinfo=UTC) + timedelta(hours=4 * (uuid.uuid4().int % 50_000))
    )
    s3 = s3_client(app_env["SWITCHBOARD_S3_ENDPOINT_URL"], "us-east-1")
    bucket = f"erasure-{tag}"
    s3.create_bucket(Bucket=bucket)
    kind = "users.messages.email.Open"
    moment = int((window.start + timedelta(minutes=30)).timestamp())
    records = [
        record_for(kind, n, moment, salt=bucket, email_address=r["email"],
                   external_user_id=r["crmId"])
        for n, r in enumerate(rows)
    ]  # fmt: skip
    key = currents_key("c", kind, f"{window.start:%Y-%m-%d-%H}")
    body = avro_bytes(kind, records)
    obj = parse_key(bucket, key, put_file(s3, bucket, key, body), len(body))
    assert obj is not None
    store = EventStore(storage, clock=Clock(window.start + timedelta(hours=1)))
    context = IngestContext(storage, s3, 3, store, FileLedger(storage))
    assert ingest_file(context, obj).outcome == "ingested"
    services = Services.from_settings(Settings(**local_services))  # type: ignore[arg-type]
    options = ExportSettings(f"cdp-exports-{tag}", XdmOptions("switchboard", "crmId"), 5,
                             start=window.start)  # fmt: skip
    assert export_window(services, window, options).events_read == 4
    # A suppression with its masked hint, and audit records of theirs.
    SuppressionList(storage).add(Channel.EMAIL, person["email"], Reason.UNSUBSCRIBE, source="test")
    again = s.land(to_csv(rows))
    assert again["counts"]["suppressed"] == 1

    needles = [person["crmId"].lower().encode(), person["email"].lower().encode()]
    before = traces(storage, needles)
    assert any(t.startswith("blob sync-state/") for t in before), before
    assert any(t.startswith("blob events/") for t in before), before
    assert any(t.startswith("blob rejects/") for t in before), before

    answer = requests.post(
        f"{running_app.base_url}/api/privacy/erasure",
        json={"profile_ids": [person["crmId"]], "emails": [person["email"].upper()],
              "reference": "dsr-1"},
        timeout=30,
    )  # fmt: skip
    assert answer.status_code == 202, answer.text
    assert person["crmId"] not in answer.text and person["email"] not in answer.text.lower()
    run_id = answer.json()["run_id"]

    def ended() -> dict[str, Any] | None:
        run = requests.get(f"{running_app.base_url}/api/runs/{run_id}", timeout=10).json()
        return dict(run) if run["status"] in ENDED else None

    run = eventually(ended, timeout=180)  # after runs other tests left under way, at most
    assert run["status"] == "succeeded", run
    counts = run["counts"]
    assert counts["sync_state.profiles"] >= 1 and counts["events.removed"] >= 1
    assert counts["push.profiles"] == 1 and counts["push.tokens"] == 1
    assert counts["files.segments.deleted"] >= 1 and counts["files.rejects.records"] >= 1
    assert run["detail"]["reference"] == "dsr-1" and len(run["detail"]["subjects"]) == 2

    assert traces(storage, needles) == []
    # Still never messaged: suppressed by the address's hash.
    lookup = requests.post(
        f"{running_app.base_url}/api/suppressions/lookup",
        json={"channel": "email", "address": person["email"]}, timeout=10,
    ).json()  # fmt: skip
    assert lookup["reasons"] == ["unsubscribe"]
    # Everyone else is as they were: the same rows again send nothing for them.
    rest = [r for r in rows if r is not person]
    unchanged = s.land(to_csv(rest))
    assert unchanged["counts"]["unchanged"] == 3 and unchanged["counts"]["sent"] == 0
    assert any(
        other["crmId"].lower().encode() in t for t in _texts_of_events(storage)
    )  # their events stay


def _texts_of_events(storage: Any) -> list[bytes]:
    texts = []
    for ref in storage.blobs.list("events", "segments/"):
        read = storage.blobs.read_versioned("events", ref.name)
        if read is not None:
            texts += [t.lower() for t in _texts(read[0])]
    return texts


def test_an_erasure_needs_an_identifier_and_names_bad_ones_without_echoing(running_app) -> None:  # type: ignore[no-untyped-def]
    url = f"{running_app.base_url}/api/privacy/erasure"
    for body in ({}, {"reference": "x"}, {"emails": ["not-an-address"]}, {"phones": ["12"]}):
        answer = requests.post(url, json=body, timeout=10)
        assert answer.status_code == 400, answer.text
        assert "not-an-address" not in answer.text


def test_an_erasure_waits_for_a_segment_sync_under_way(running_app, storage) -> None:  # type: ignore[no-untyped-def]
    runs = RunLog(storage)
    busy = runs.start(RunKind.SEGMENT_SYNC, sync_id="vip-erasure", source="test: under way")
    profile = f"WAIT-{uuid.uuid4().hex[:8]}"
    answer = requests.post(
        f"{running_app.base_url}/api/privacy/erasure", json={"profile_ids": [profile]}, timeout=30
    )
    run_id = answer.json()["run_id"]

    def waiting() -> bool:
        run = runs.get(run_id)
        return run is not None and busy.run_id in run.detail.get("waiting_for_runs", [])

    try:
        eventually(waiting, timeout=60)
        assert not runs.get(run_id).status.ended  # type: ignore[union-attr]
    finally:
        runs.finish(busy.run_id, RunStatus.SUCCEEDED)
    done = eventually(
        lambda: (r := runs.get(run_id)) is not None and r.status.ended and r, timeout=60
    )
    assert done.status == RunStatus.SUCCEEDED and done.detail["waited"] >= 1
