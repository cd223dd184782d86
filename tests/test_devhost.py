"""The local host against a small app that uses every trigger type."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from devhost.app import HostError, resolve_setting_refs
from devhost.blobs import POISON_QUEUE, compile_blob_path
from devhost.host import DevHost
from devhost.http import compile_route
from devhost.storage import HOSTS_CONTAINER
from tests.helpers import eventually

APP = Path(__file__).parent / "apps" / "triggers" / "function_app.py"


@pytest.fixture
def host(
    local_services, monkeypatch: pytest.MonkeyPatch, unique: str, port: int
) -> Iterator[DevHost]:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TRIGGERS_QUEUE", unique)
    dev = DevHost(APP, port=port, blob_scan_interval=0.2, host_id=unique)
    dev.module.CALLS.clear()
    dev.start()
    yield dev
    dev.stop()


def test_route_templates() -> None:
    assert compile_route("runs/{run_id}").match("runs/abc").group("run_id") == "abc"
    assert not compile_route("runs/{run_id}").match("runs/a/b")
    assert compile_route("items/{id:int}").match("items/42")
    assert not compile_route("items/{id:int}").match("items/x")
    assert compile_route("files/{*path}").match("files/a/b/c").group("path") == "a/b/c"
    optional = compile_route("things/{name?}")
    assert optional.match("things") and optional.match("things/x").group("name") == "x"


def test_blob_path_patterns() -> None:
    container, prefix, pattern = compile_blob_path("segments/{sync_id}/{name}")
    assert (container, prefix) == ("segments", "")
    match = pattern.match("aep-audience/2026/11/export.csv")
    assert match and match.group("sync_id") == "aep-audience"
    assert match.group("name") == "2026/11/export.csv"
    assert not pattern.match("no-folder.csv")
    _, prefix, pattern = compile_blob_path("in/fixed/{name}.csv")
    assert prefix == "fixed/" and pattern.match("fixed/a.csv") and not pattern.match("fixed/a.tsv")


def test_setting_references_resolve_or_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_QUEUE", "work")
    assert resolve_setting_refs("%MY_QUEUE%-items") == "work-items"
    with pytest.raises(HostError, match="does not resolve"):
        resolve_setting_refs("%NOT_SET_ANYWHERE%")


@pytest.mark.integration
def test_http_routes_methods_and_errors(host: DevHost) -> None:
    base = host.base_url
    answer = requests.get(f"{base}/api/items/42?q=find", timeout=5)
    assert answer.status_code == 200
    assert answer.json()["id"] == 42 and answer.json()["q"] == "find"
    assert answer.json()["url"].endswith("/api/items/42?q=find")
    assert requests.get(f"{base}/api/items/special", timeout=5).text == "special"
    echoed = requests.put(f"{base}/api/echo/a/b", data=b"payload", timeout=5)
    assert echoed.status_code == 201 and echoed.content == b"payload"
    assert echoed.headers["X-Rest"] == "a/b"
    not_allowed = requests.get(f"{base}/api/echo/x", timeout=5)
    assert not_allowed.status_code == 405 and not_allowed.json()["error"]["code"]
    missing = requests.get(f"{base}/api/nothing-here", timeout=5)
    assert missing.status_code == 404 and "error" in missing.json()
    assert requests.get(f"{base}/api/boom", timeout=5).status_code == 500


def idle_scans(host: DevHost, function: str, more: int) -> None:
    """Wait until the blob watcher has scanned `more` times more with nothing to do."""
    watcher = host.blob_watchers[function]
    start = watcher.idle_scans
    eventually(lambda: watcher.idle_scans >= start + more, timeout=60)


@pytest.mark.integration
def test_blob_trigger_fires_once_per_name_and_etag(host: DevHost, storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    def calls(function: str) -> list[dict]:
        return [c for c in host.module.calls(function) if f"/{unique}" in c["name"]]

    storage.blobs.create("inbox", f"{unique}/one.txt", b"hello")
    eventually(lambda: calls("inbox_blob"))
    idle_scans(host, "inbox_blob", 3)  # several more scans with nothing to do: still one call
    assert [c["name"] for c in calls("inbox_blob")] == [f"inbox/{unique}/one.txt"]
    storage.blobs.create("inbox", f"{unique}/one.txt", b"hello again", overwrite=True)
    eventually(lambda: len(calls("inbox_blob")) == 2)
    assert calls("inbox_blob")[1]["size"] == len(b"hello again")
    storage.blobs.create("inbox", f"{unique}-not-in-a-folder.txt", b"x")
    idle_scans(host, "inbox_blob", 2)
    assert len(calls("inbox_blob")) == 2


@pytest.mark.integration
def test_existing_blobs_fire_at_start_and_receipts_survive_restart(
    local_services,
    storage,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    port: int,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("TRIGGERS_QUEUE", unique)
    storage.blobs.create("inbox", f"{unique}/before-start.txt", b"early")

    def mine(calls: list[dict]) -> list[dict]:
        return [c for c in calls if c["name"].startswith(f"inbox/{unique}/")]

    first = DevHost(APP, port=port, blob_scan_interval=0.2, host_id=unique)
    first.module.CALLS.clear()
    first.start()
    try:
        eventually(lambda: mine(first.module.calls("inbox_blob")))
    finally:
        first.stop()
    second = DevHost(APP, port=port, blob_scan_interval=0.2, host_id=unique)
    second.start()
    try:
        idle_scans(second, "inbox_blob", 3)  # it has looked, and found its receipt
        names = [c["name"] for c in mine(second.module.calls("inbox_blob"))]
        assert names == [f"inbox/{unique}/before-start.txt"]  # once, across both hosts
    finally:
        second.stop()


@pytest.mark.integration
def test_failing_blob_goes_to_poison_after_threshold(host: DevHost, storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    storage.blobs.create("inbox", f"{unique}/bad.txt", b"fail please")

    def attempts() -> int:
        return len([c for c in host.module.calls("inbox_blob") if unique in c["name"]])

    eventually(lambda: attempts() == 2)  # poisonBlobThreshold: 2
    poison = storage.queue_service.get_queue_client(POISON_QUEUE)

    def poisoned() -> list[dict]:
        # The whole queue, not a peek: a peek sees the first 32 only, and other tests'
        # poisoned blobs share this queue (how many depends on the order tests run in).
        # Received for a second, then visible again; nothing is deleted.
        found = poison.receive_messages(messages_per_page=32, visibility_timeout=1)
        messages = [json.loads(base64.b64decode(m.content)) for m in found]
        return [m for m in messages if m["BlobName"] == f"{unique}/bad.txt"]

    entry = eventually(poisoned, timeout=30)[0]
    assert entry["ContainerName"] == "inbox" and entry["FunctionId"].endswith("inbox_blob")
    idle_scans(host, "inbox_blob", 2)
    assert attempts() == 2


@pytest.mark.integration
def test_queue_trigger_retries_then_poisons(host: DevHost, storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    queue = storage.queue_service.get_queue_client(unique)
    queue.send_message(base64.b64encode(b"good work").decode())
    queue.send_message(base64.b64encode(b"fail always").decode())
    calls = host.module.calls
    eventually(lambda: [c for c in calls("work_queue") if c["body"] == "good work"])
    failing = eventually(
        lambda: (
            [c for c in calls("work_queue") if c["body"] == "fail always"][2:]
            and [c for c in calls("work_queue") if c["body"] == "fail always"]
        )
    )
    assert [c["dequeue_count"] for c in failing] == [1, 2, 3]  # maxDequeueCount: 3
    poison = storage.queue_service.get_queue_client(f"{unique}-poison")
    moved = eventually(lambda: list(poison.peek_messages(5)))
    assert base64.b64decode(moved[0].content) == b"fail always"
    eventually(lambda: queue.get_queue_properties().approximate_message_count == 0)
    assert len([c for c in calls("work_queue") if c["body"] == "good work"]) == 1


@pytest.mark.integration
def test_timer_fires_on_schedule_and_records_status(host: DevHost, storage) -> None:  # type: ignore[no-untyped-def]
    eventually(lambda: len(host.module.calls("every_two_seconds")) >= 2, timeout=8)
    assert not any(c["past_due"] for c in host.module.calls("every_two_seconds"))
    status = host.timer_watchers["every_two_seconds"].read_status()
    assert status is not None
    last = datetime.fromisoformat(status["Last"].replace("Z", "+00:00"))
    following = datetime.fromisoformat(status["Next"].replace("Z", "+00:00"))
    assert following - last == timedelta(seconds=2) and last.second % 2 == 0


@pytest.mark.integration
def test_missed_occurrence_fires_past_due_at_start(
    local_services,
    storage,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
    port: int,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("TRIGGERS_QUEUE", unique)
    missed = datetime.now(UTC).replace(hour=3, minute=0, second=0, microsecond=0) - timedelta(
        days=1
    )
    status = {"Last": (missed - timedelta(days=1)).isoformat(), "Next": missed.isoformat()}
    storage.blobs.create(
        HOSTS_CONTAINER,
        f"timers/{unique}/Host.Functions.nightly/status",
        json.dumps(status).encode(),
        overwrite=True,
    )
    dev = DevHost(APP, port=port, host_id=unique)
    dev.module.CALLS.clear()
    dev.start()
    try:
        fired = eventually(lambda: dev.module.calls("nightly"))
        assert fired == [{"past_due": True}]
    finally:
        dev.stop()


@pytest.mark.integration
def test_admin_api_invokes_non_http_functions(host: DevHost) -> None:
    answer = requests.post(f"{host.base_url}/admin/functions/nightly", json={}, timeout=5)
    assert answer.status_code == 202
    assert eventually(lambda: host.module.calls("nightly")) == [{"past_due": False}]
    missing = requests.post(f"{host.base_url}/admin/functions/nope", json={}, timeout=5)
    assert missing.status_code == 404


def test_app_settings_override_host_json_as_on_azure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from devhost.hostconfig import HostConfig

    host_json = tmp_path / "host.json"
    host_json.write_text(
        '{"functionTimeout": "00:10:00", "extensions": {"queues": {"batchSize": 8}}}'
    )
    config = HostConfig.load(host_json, {
        "AzureFunctionsJobHost__functionTimeout": "00:00:20",
        "AzureFunctionsJobHost__extensions__queues__BATCHSIZE": "2",
        "UNRELATED": "x",
    })  # fmt: skip
    assert config.function_timeout == 20 and config.queue_batch_size == 2
