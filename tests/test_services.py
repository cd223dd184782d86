"""Process hygiene of the make targets' building blocks: start, answer, stop everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from devhost.services import free_port
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> set[int]:
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.add(child)
            pending.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        state = (
            Path(f"/proc/{pid}/stat").read_text().split()[2]
            if Path(f"/proc/{pid}").exists()
            else "X"
        )
        if state != "Z":
            living.add(pid)
    return living


def test_services_run_a_command_and_leave_nothing_behind() -> None:
    probe = (
        "import os, sys, time, urllib.request; "
        "conn = os.environ['AzureWebJobsStorage']; "
        "s3 = os.environ['SWITCHBOARD_S3_ENDPOINT_URL']; "
        "urllib.request.urlopen(s3).close(); "
        "print('BlobEndpoint=http://127.0.0.1' in conn, flush=True); "
        "sys.stdin.read(); sys.exit(3)"  # runs until the test closes its stdin
    )
    manager = subprocess.Popen(
        [sys.executable, "-m", "devhost.services", "--", sys.executable, "-c", probe],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    started = eventually(
        lambda: descendants(manager.pid) if len(descendants(manager.pid)) >= 3 else set()
    )
    output, _ = manager.communicate(input="", timeout=60)
    assert manager.returncode == 3  # the command's own exit status
    assert "True" in output
    assert alive(started) == set()


def test_ctrl_c_stops_the_host_and_every_service() -> None:
    port = free_port()
    manager = subprocess.Popen(
        [sys.executable, "-m", "devhost.services", "--", sys.executable, "-m", "devhost",
         "serve", "--port", str(port)],
        cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def healthy() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/api/health", timeout=2).ok
        except requests.ConnectionError:
            return False

    eventually(healthy, timeout=60)
    started = descendants(manager.pid)
    assert len(started) >= 3  # Azurite, S3, the host
    os.killpg(manager.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    manager.wait(timeout=30)
    eventually(lambda: alive(started) == set(), timeout=15)


def test_malformed_storage_setting_stops_the_host_at_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devhost", "serve", "--port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "AzureWebJobsStorage": "AccountName=acct;AccountKey=!!"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "AzureWebJobsStorage is malformed: AccountKey is not valid base64" in result.stderr
