"""A host killed mid-dispatch (SIGKILL) and started again: every target gets its push,
at most one slice per chunk twice, and every outcome is counted and stored once."""

from __future__ import annotations

import os
import secrets
import signal
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from core.push.tokens import Device, DeviceList, ProfileDevices, profile_partition, token_hash
from core.storage import Storage
from core.storage.connection import parse_connection_string
from core.storage.tables import safe_key
from devhost.fakes.apns import FakeApns, signing_key_pair
from devhost.process import HostProcess
from devhost.services import LocalServices, free_port
from tests.conftest import scenario_syncs
from tests.helpers import eventually
from tests.test_push_dispatch import events_of

pytestmark = pytest.mark.integration
TARGETS, PER_CHUNK, SLICE = 3000, 1500, 500


def test_a_killed_dispatch_resumes_at_its_checkpoints(tmp_path: Path) -> None:
    apns = FakeApns(latency_seconds=0.02).start()
    key, public = signing_key_pair()
    apns.configure(public_key_pem=public)
    services = LocalServices(with_s3=False)
    try:
        env = {
            **services.start(),
            "SWITCHBOARD_SYNCS_FILE": str(scenario_syncs(tmp_path / "syncs.yaml")),
            "SWITCHBOARD_APNS_ENDPOINT": apns.url,
            "SWITCHBOARD_PUSH_CA_FILE": str(apns.cert_path),
            "SWITCHBOARD_APNS_KEY_SHOP": key,
            "SWITCHBOARD_PUSH_TARGETS_PER_CHUNK": str(PER_CHUNK),
            "SWITCHBOARD_PUSH_CONCURRENCY": "20",
            "SWITCHBOARD_PUSH_CLAIM_SECONDS": "5",
            # A message held by a dead host is seen again after 30 s, not 10 minutes.
            "AzureFunctionsJobHost__functionTimeout": "00:00:20",
        }
        storage = Storage(parse_connection_string(env["AzureWebJobsStorage"]))
        profiles = [f"C-{n:05d}" for n in range(TARGETS)]
        tokens = {profile: secrets.token_hex(32) for profile in profiles}
        now = datetime.now(UTC)
        storage.tables.get(ProfileDevices).write_batch(
            [ProfileDevices(
                partition_key=profile_partition(p), row_key=safe_key(p), profile_id=p,
                devices=DeviceList(items=[Device(
                    app_id="shop-ios", token=tokens[p], token_hash=token_hash(tokens[p]),
                    platform="ios", environment="production", registered_at=now,
                )]),
            ) for p in profiles],
            parallel=8,
        )  # fmt: skip

        first = HostProcess(env, free_port(), tmp_path / "first.log")
        first.wait_ready()
        answer = requests.post(f"{first.base_url}/api/push/send", json={
            "template": {"title": "Hi", "body": "{{ profile_id }}"}, "app_ids": ["shop-ios"],
            "targets": {"profile_ids": profiles},
        }, timeout=30)  # fmt: skip
        assert answer.status_code == 202
        dispatch_id = answer.json()["dispatch_id"]
        eventually(lambda: len(apns.state.delivered) >= 1000, timeout=60)
        os.kill(first.process.pid, signal.SIGKILL)  # no cleanup, no checkpoint
        first.stop()
        assert len(apns.state.delivered) < TARGETS

        second = HostProcess(env, free_port(), tmp_path / "second.log")
        second.wait_ready()
        try:

            def finished() -> dict | None:
                url = f"{second.base_url}/api/push/dispatches/{dispatch_id}"
                body = requests.get(url, timeout=5).json()
                return body if body["status"] in ("succeeded", "failed") else None

            result = eventually(finished, timeout=150, interval=0.5)
        finally:
            second.stop()
        assert result["status"] == "succeeded"
        assert result["counts"]["messages.sent"] == TARGETS  # each slice counted once
        per_token = Counter(d["token"] for d in apns.state.delivered)
        assert set(per_token) == set(tokens.values())  # nobody missed
        resent = sum(per_token.values()) - TARGETS
        assert resent <= SLICE * (TARGETS // PER_CHUNK)  # at most a slice per chunk again
        events = events_of(storage, result, per_chunk=PER_CHUNK)
        assert len(events) == TARGETS and len({e["event_id"] for e in events}) == TARGETS
    finally:
        services.stop()
        apns.stop()
