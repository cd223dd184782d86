"""Runs the sample flows through the local host and prints what happened.

Expects the environment `python -m devhost.services` provides (Azurite, S3). Starts the
function app with `python -m devhost serve`, talks to it over HTTP like an operator would,
lands a segment export in Blob storage like a CDP would, and fires the export timer through
the host's admin API. Exits non-zero if any step does not do what it should.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.containers import SEGMENTS
from core.errors import ConfigError
from core.settings import load_settings
from core.storage import Storage
from devhost.process import HostProcess
from devhost.services import free_port

DATA = Path(__file__).parent / "data"
SYNC_ID = "demo-vip-audience"


class DemoFailed(RuntimeError):
    pass


def call(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as answer:
        raw = answer.read()
        return answer.status, json.loads(raw) if raw else None


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise DemoFailed(f"timed out waiting for {what}")


def heading(text: str) -> None:
    print(f"\n== {text}")


def main() -> int:
    try:
        storage = Storage(load_settings().storage_account())
    except ConfigError as exc:
        print(f"demo: {exc} (run me through `make demo`)", file=sys.stderr)
        return 2
    log_path = Path(tempfile.mkdtemp(prefix="switchboard-demo-")) / "devhost.log"
    host = HostProcess(dict(os.environ), free_port(), log_path)
    try:
        host.wait_ready()
        return run(host, storage)
    except DemoFailed as exc:
        print(f"\ndemo FAILED: {exc}\n--- host log ---\n{log_path.read_text()}", file=sys.stderr)
        return 1
    finally:
        host.stop()


def run(host: HostProcess, storage: Storage) -> int:
    api = f"{host.base_url}/api"
    summary: list[str] = []

    heading("1. HTTP: GET /api/health")
    status, health = call("GET", f"{api}/health")
    print(json.dumps(health, indent=2))
    if status != 200 or health["status"] != "ok":
        raise DemoFailed("health check did not report ok")
    summary.append(f"HTTP   GET /api/health -> {status}, storage blob/table/queue reachable")

    heading("2. Blob: a CDP drops a segment export into segments/")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    blob_name = f"{SYNC_ID}/{stamp}/aep_audience_export.csv"
    storage.blobs.create(SEGMENTS, blob_name, (DATA / "aep_audience_export.csv").read_bytes())
    print(f"uploaded {SEGMENTS}/{blob_name}")

    def segment_run() -> dict[str, Any] | None:
        _, body = call("GET", f"{api}/runs?kind=segment_sync&sync_id={SYNC_ID}")
        return next((r for r in body["runs"] if r["source"].endswith(blob_name)), None)

    run = wait_for("the blob trigger to record a run", segment_run)
    _, stored = call("GET", f"{api}/runs/{run['run_id']}")
    print(json.dumps(stored, indent=2))
    summary.append(f"BLOB   {SEGMENTS}/{blob_name} -> run {run['run_id']} ({run['status']})")

    heading("3. Timer: the four-hourly log export fires (through the host's admin API)")
    _, before = call("GET", f"{api}/runs?kind=log_export")
    status, _ = call("POST", f"{host.base_url}/admin/functions/log_export_timer", {})
    if status != 202:
        raise DemoFailed(f"admin API answered {status}")

    def timer_run() -> dict[str, Any] | None:
        _, body = call("GET", f"{api}/runs?kind=log_export")
        known = {r["run_id"] for r in before["runs"]}
        new = (r for r in body["runs"] if r["run_id"] not in known)
        return next((r for r in new if r["status"] == "succeeded"), None)

    fired = wait_for("the timer to record a run", timer_run)
    print(json.dumps(fired, indent=2))
    summary.append(f"TIMER  log_export_timer -> run {fired['run_id']} ({fired['status']})")

    heading("Summary")
    for line in summary:
        print(f"  {line}")
    print("\ndemo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
