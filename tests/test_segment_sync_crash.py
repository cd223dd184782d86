"""A host killed mid-file (SIGKILL) and started again ends with the clean-run state, having
sent again at most the batches that were in flight (the destination's window)."""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import pytest
import requests

from core.containers import SEGMENTS
from core.storage import Storage
from core.storage.connection import parse_connection_string
from core.sync.definitions import load_document
from devhost.fakes.braze import FakeBraze
from devhost.process import HostProcess
from devhost.services import LocalServices, free_port
from tests.conftest import scenario_syncs
from tests.helpers import eventually
from tests.scenarios import people, to_csv

pytestmark = pytest.mark.integration


def test_killed_run_resumes_and_resends_at_most_the_window(tmp_path: Path) -> None:
    fake = FakeBraze(latency_seconds=0.03).start()
    services = LocalServices(with_s3=False)
    try:
        env = {
            **services.start(),
            "SWITCHBOARD_SYNCS_FILE": str(scenario_syncs(tmp_path / "syncs.yaml")),
            "SWITCHBOARD_BRAZE_REST_ENDPOINT": fake.url,
            "SWITCHBOARD_BRAZE_API_KEY": fake.state.api_key,
        }
        storage = Storage(parse_connection_string(env["AzureWebJobsStorage"]))
        rows = people("KI", 1500)  # 20 batches of 75
        fake.configure(known_profiles=[r["crmId"] for r in rows])
        storage.blobs.create(SEGMENTS, "vip-crash/export.csv", to_csv(rows))

        first = HostProcess(env, free_port(), tmp_path / "first.log")
        first.wait_ready()
        eventually(lambda: fake.state.accepted_objects >= 600, timeout=60)
        os.kill(first.process.pid, signal.SIGKILL)  # no cleanup, no state commit
        first.stop()
        received_before = fake.state.accepted_objects
        assert received_before < 1500

        second = HostProcess(env, free_port(), tmp_path / "second.log")
        second.wait_ready()
        try:

            def finished() -> dict | None:
                # Only this sync's runs: a timer (Currents every 5 min) may record its own run.
                answer = requests.get(
                    f"{second.base_url}/api/runs", params={"kind": "segment_sync"}, timeout=5
                )
                runs = answer.json()["runs"]
                done = [r for r in runs if r["status"] in ("succeeded", "failed")]
                return done[0] if done else None

            run = eventually(finished, timeout=90)
        finally:
            second.stop()
        assert run["status"] == "succeeded", run
        assert run["counts"]["sent"] == 1500
        syncs = load_document(Path(env["SWITCHBOARD_SYNCS_FILE"]))
        window = next(s for s in syncs.syncs if s.id == "vip-crash").destination.in_flight
        assert window > 1  # the bound under test is the window's, not one batch's
        assert len(fake.state.received) <= 1500 + 75 * window
        deliveries = collections.Counter(o["external_id"] for o in fake.state.received)
        assert set(deliveries) == {r["crmId"] for r in rows}
        resent = [identity for identity, times in deliveries.items() if times > 1]
        assert len(resent) <= 75 * window  # at most the batches in flight when killed
        profiles = fake.profiles()
        assert all(profiles[r["crmId"]]["first_name"] == r["firstName"] for r in rows)
    finally:
        services.stop()
        fake.stop()
