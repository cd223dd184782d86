"""Delivery at the destination's speed, through the local host against Azurite and a fake
Braze that enforces its rate limit and answers with jittered latency:

- fan-out workers of one sync and a second sync, all on one workspace, share one request
  budget and stay under the limit the fake enforces (no 429 storm);
- several batches in flight end with the same destination state and counts as one at a
  time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from core.containers import SEGMENTS
from core.storage import Storage
from core.storage.connection import parse_connection_string
from devhost.fakes.braze import FakeBraze
from devhost.process import HostProcess
from devhost.services import LocalServices, free_port
from tests.helpers import eventually
from tests.scenarios import ENDED, people, to_csv

pytestmark = pytest.mark.integration

LIMIT = 20
"""Requests per 1-second window the fake accepts."""
BUDGET = 14
"""The syncs' `requests_per_second`: the limit less the documented margin (each worker's
local burst, at least one request, core/ratebudget.py; four workers here) and the fake's
latency jitter, which can move a request sent late in one second into the next."""


def _sync(sync_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": sync_id,
        "mode": extra.pop("mode", "upsert"),
        "identity": {"column": "crmId", "namespace": "crmId"},
        "fields": [
            {"source": "email", "target": "email"},
            {"source": "firstName", "target": "first_name"},
            {"source": "points", "target": "loyalty_points", "type": "integer"},
        ],
        "audiences": {"segments": [{"id": "seg-vip", "name": "vip"}]},
        **extra,
    }


@pytest.fixture(scope="module")
def host(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[HostProcess, FakeBraze, Storage]]:
    # Azurite of its own: the session's host watches the session's `segments` container
    # and would take these files (as syncs it does not declare) before this host does.
    services = LocalServices(with_s3=False)
    fake = FakeBraze(
        rate_limit=LIMIT, rate_window_seconds=1.0, latency_seconds=0.04, latency_sigma=0.4,
    ).start()  # fmt: skip
    budget = {"type": "braze", "requests_per_second": BUDGET, "max_in_flight": 6}
    syncs = [
        _sync("budget-fanout", destination=budget,
              processing={"rows_per_worker": 1000, "in_memory_max_rows": 100}),
        _sync("budget-second", destination=budget),
        _sync("window-one", mode="update_only", destination={"type": "braze", "max_in_flight": 1,
                                         "requests_per_second": 1000, "shared_budget": False}),
        _sync("window-many", mode="update_only", destination={"type": "braze", "max_in_flight": 8,
                                          "requests_per_second": 1000, "shared_budget": False}),
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("budget") / "syncs.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "syncs": syncs}))
    env = {
        **services.start(),
        "SWITCHBOARD_SYNCS_FILE": str(path),
        "SWITCHBOARD_BRAZE_REST_ENDPOINT": fake.url,
        "SWITCHBOARD_BRAZE_API_KEY": fake.state.api_key,
        "SWITCHBOARD_CURRENTS_SCHEDULE": "0 0 0 1 1 *",
    }
    app = HostProcess(env, free_port(), tmp_path_factory.mktemp("budget-host") / "log")
    try:
        app.wait_ready()
        yield app, fake, Storage(parse_connection_string(env["AzureWebJobsStorage"]))
    finally:
        app.stop()
        fake.stop()
        services.stop()


def _land(storage: Any, sync_id: str, data: bytes) -> str:
    name = f"{sync_id}/export-{uuid.uuid4().hex[:8]}.csv"
    storage.blobs.create(SEGMENTS, name, data)
    return name


def _ended_run(app: HostProcess, sync_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        answer = requests.get(
            f"{app.base_url}/api/runs", params={"sync_id": sync_id}, timeout=10
        ).json()["runs"]
        done = [run for run in answer if run["status"] in ENDED]
        return done[0] if done else None

    return eventually(ended, timeout=240)


def test_fanned_out_workers_and_a_second_sync_share_one_budget(
    host: tuple[HostProcess, FakeBraze, Storage],
) -> None:
    app, fake, storage = host
    before = fake.stats()  # the module's other syncs (unshared, 1,000/s) meet 429s by design
    first, second = people("BA", 3000), people("BB", 1200)  # 40 + 16 requests, about 4 s
    _land(storage, "budget-fanout", to_csv(first))
    _land(storage, "budget-second", to_csv(second))
    runs = [_ended_run(app, "budget-fanout"), _ended_run(app, "budget-second")]
    for run, rows in zip(runs, (first, second), strict=True):
        assert run["status"] == "succeeded", run
        assert run["counts"]["sent"] == len(rows)
    assert runs[0]["detail"].get("chunks", 0) >= 3  # fanned out: several workers at once
    profiles = fake.profiles()
    assert all(profiles[r["crmId"]]["loyalty_points"] == int(r["points"]) for r in first + second)
    stats = fake.stats()
    # Under the limit together: the fake never had to refuse one of these requests.
    assert stats["rate_limited"] - before["rate_limited"] == 0, (before, stats)
    assert stats["busiest_window"] <= LIMIT


def test_batches_in_flight_end_as_one_at_a_time_does(
    host: tuple[HostProcess, FakeBraze, Storage],
) -> None:
    app, fake, storage = host
    rows = people("WN", 1500)
    tags = {"window-one": "ONE", "window-many": "ANY"}
    # Update-only: a seventh of the profiles are unknown to Braze and come back unmatched.
    known = [r["crmId"] for r in rows if int(r["crmId"][-5:]) % 7]
    fake.configure(known_profiles=[k.replace("WN", tag) for tag in tags.values() for k in known])
    outcomes = []
    for sync_id, tag in tags.items():
        renamed = [dict(r, crmId=r["crmId"].replace("WN", tag)) for r in rows]
        _land(storage, sync_id, to_csv(renamed))
        run = _ended_run(app, sync_id)
        assert run["status"] == "succeeded", run
        outcomes.append(run["counts"])
    assert outcomes[0] == outcomes[1]
    assert outcomes[0]["unmatched"] == len(rows) - len(known)
    profiles = fake.profiles()
    for row in rows:
        one, many = (profiles.get(row["crmId"].replace("WN", tag)) for tag in ("ONE", "ANY"))
        assert one == many


def test_a_sync_document_refuses_a_window_past_its_bound(tmp_path: Path) -> None:
    from core.errors import ConfigError
    from core.sync.definitions import parse_document

    with pytest.raises(ConfigError, match="max_in_flight"):
        parse_document({"version": 1, "syncs": [
            _sync("too-wide", destination={"type": "braze", "max_in_flight": 1000})
        ]})  # fmt: skip
    default = parse_document({"version": 1, "syncs": [_sync("defaults")]}).syncs[0].destination
    assert default.in_flight == 8  # 50 requests/s at 150 ms each
