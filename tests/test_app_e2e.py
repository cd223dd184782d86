"""The real function app through the local host (child process), Azurite behind it."""

from __future__ import annotations

import pytest
import requests

from core.containers import SEGMENTS
from core.segments.arrival import SegmentReceipt
from core.storage.tables import safe_key
from devhost.storage import HOSTS_CONTAINER
from tests.helpers import eventually

pytestmark = pytest.mark.integration


def runs(app, **params: str) -> list[dict]:  # type: ignore[no-untyped-def]
    answer = requests.get(f"{app.base_url}/api/runs", params=params, timeout=5)
    assert answer.status_code == 200
    return list(answer.json()["runs"])


def test_health_reports_storage(running_app) -> None:  # type: ignore[no-untyped-def]
    answer = requests.get(f"{running_app.base_url}/api/health", timeout=5)
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "ok"
    assert {body["storage"][s]["ok"] for s in ("blob", "table", "queue")} == {True}
    assert body["storage"]["emulator"] is True


def test_segment_blob_records_one_run_per_version(running_app, storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    name = f"{unique}/export.csv"
    storage.blobs.create(SEGMENTS, name, b"email,segment\na@example.com,realized\n")
    found = eventually(lambda: runs(running_app, sync_id=unique))
    assert len(found) == 1
    run = found[0]
    assert run["kind"] == "segment_sync" and run["source"] == f"{SEGMENTS}/{name}"
    detail = requests.get(f"{running_app.base_url}/api/runs/{run['run_id']}", timeout=5)
    assert detail.status_code == 200 and detail.json()["run_id"] == run["run_id"]

    # Force the host to deliver the same version again, as a redelivery would.
    for receipt in storage.blobs.list(HOSTS_CONTAINER, "blobreceipts/"):
        if receipt.name.endswith(f"/{SEGMENTS}/{name}"):
            storage.blob_service.get_blob_client(HOSTS_CONTAINER, receipt.name).delete_blob()
    receipts = storage.tables.get(SegmentReceipt)

    def delivered_twice() -> bool:
        rows = list(receipts.query_partition(safe_key(unique)))
        return len(rows) == 1 and rows[0].deliveries == 2

    eventually(delivered_twice)
    assert len(runs(running_app, sync_id=unique)) == 1

    # A new version of the file is new work.
    storage.blobs.create(SEGMENTS, name, b"email,segment\nb@example.com,realized\n", overwrite=True)
    eventually(lambda: len(runs(running_app, sync_id=unique)) == 2)


def test_timer_fired_through_admin_api_records_a_run(running_app) -> None:  # type: ignore[no-untyped-def]
    before = {r["run_id"] for r in runs(running_app, kind="log_export")}
    fired = requests.post(
        f"{running_app.base_url}/admin/functions/log_export_timer", json={}, timeout=5
    )
    assert fired.status_code == 202

    def finished() -> dict | None:
        new = [r for r in runs(running_app, kind="log_export") if r["run_id"] not in before]
        return new[0] if new and new[0]["status"] in ("succeeded", "failed") else None

    run = eventually(finished, timeout=60)
    assert run["status"] == "succeeded" and run["source"] == "timer"
    # It exported the windows complete by now (none, or one if the session crossed a
    # four-hour boundary), or, if this slot had its export, the guard said no.
    detail = run["detail"]
    assert isinstance(detail.get("windows"), list) or detail.get("skipped") == "export_guard"


def test_api_errors_are_json(running_app) -> None:  # type: ignore[no-untyped-def]
    missing = requests.get(f"{running_app.base_url}/api/runs/20260101T000000Z-deadbeef", timeout=5)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "run_not_found"
    assert requests.get(f"{running_app.base_url}/api/runs/garbage", timeout=5).status_code == 404
    bad = requests.get(f"{running_app.base_url}/api/runs", params={"limit": "0"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_query"
    bad_kind = requests.get(f"{running_app.base_url}/api/runs", params={"kind": "x"}, timeout=5)
    assert bad_kind.status_code == 400


def test_operators_manage_the_blocklist_without_seeing_addresses_in_clear(running_app) -> None:  # type: ignore[no-untyped-def]
    base = f"{running_app.base_url}/api/suppressions"
    body = {"channel": "email", "address": " Blocked.Person@Example.com ", "note": "ticket 42"}
    added = requests.post(base, json=body, timeout=5)
    assert added.status_code == 201
    assert added.json() == {
        "channel": "email", "address": "b***@example.com", "reasons": ["manual_blocklist"],
    }  # fmt: skip
    found = requests.post(f"{base}/lookup", json={"channel": "email",
                          "address": "blocked.person@example.com"}, timeout=5).json()  # fmt: skip
    assert found["suppressed"] is True
    lifted = requests.delete(base, json=body, timeout=5)
    assert lifted.status_code == 200 and lifted.json()["reasons"] == []
    bad = requests.post(base, json={"channel": "fax", "address": "x"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    bad_address = requests.post(base, json={"channel": "phone", "address": "12345"}, timeout=5)
    assert bad_address.status_code == 400 and "E.164" in bad_address.json()["error"]["message"]
