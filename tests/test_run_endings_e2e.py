"""Every run ends, whatever escapes it: for each flow an exception is injected through the
local host (tests/apps/faults), the run ends with a reason, and an operator's retry ends it
the way a clean run would.

The host here has storage of its own (a second Azurite), so that the session's host does
not see these files, and fast retries (tests/apps/faults/host.json: three attempts, no
visibility timeout), so that poison queues fill within seconds.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from core.containers import SEGMENTS
from core.currents.s3 import s3_client
from core.runs import RunKind, RunLog, RunRecord, RunStatus
from core.storage import Storage
from core.storage.connection import parse_connection_string
from devhost.process import HostProcess
from devhost.services import LocalServices, free_port
from tests.conftest import assert_no_run_left_open
from tests.helpers import assert_no_personal_data, eventually
from tests.scenarios import people, to_csv
from tests.test_currents_e2e import Files

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
ENDED = {"succeeded", "partially_failed", "failed"}


@pytest.fixture(scope="module")
def own_storage() -> Iterator[dict[str, str]]:
    services = LocalServices(with_s3=False)
    try:
        yield services.start()
    finally:
        services.stop()


@pytest.fixture(scope="module")
def fstorage(own_storage: dict[str, str]) -> Iterator[Storage]:
    storage = Storage(parse_connection_string(own_storage["AzureWebJobsStorage"]))
    yield storage
    assert_no_run_left_open(storage)


@pytest.fixture(scope="module")
def faults_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults") / "faults.json"


@pytest.fixture
def faults(faults_path: Path) -> Iterator[Callable[..., None]]:
    def turn_on(**active: Any) -> None:
        faults_path.write_text(json.dumps(active))

    turn_on()
    yield turn_on
    turn_on()


@pytest.fixture(scope="module")
def faulty(
    app_env: dict[str, str],
    own_storage: dict[str, str],
    fstorage: Storage,
    faults_path: Path,
    own_bucket: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HostProcess]:
    env = {
        **app_env,
        **own_storage,
        "SWITCHBOARD_FAULTS_FILE": str(faults_path),
        "SWITCHBOARD_CURRENTS_BUCKET": own_bucket,
        "SWITCHBOARD_PUSH_TARGETS_PER_CHUNK": "2",
    }
    log = tmp_path_factory.mktemp("faulty") / "log"
    host = HostProcess(env, free_port(), log, app=ROOT / "tests/apps/faults/function_app.py")
    try:
        host.wait_ready()
        yield host
    finally:
        host.stop()
    assert_no_personal_data(host.log_path)


def runs(host: HostProcess, **params: str) -> list[dict[str, Any]]:
    answer = requests.get(f"{host.base_url}/api/runs", params={"limit": "500", **params}, timeout=5)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["runs"])


def run_where(
    host: HostProcess, match: Callable[[dict[str, Any]], bool], timeout: float = 90, **params: str
) -> dict[str, Any]:
    """The first run that `match`es once it has ended."""

    def found() -> dict[str, Any] | None:
        ended = [r for r in runs(host, **params) if r["status"] in ENDED and match(r)]
        return ended[0] if ended else None

    return eventually(found, timeout=timeout, interval=0.2)


def run_by_id(host: HostProcess, run_id: str, statuses: set[str], timeout: float = 90) -> Any:
    def found() -> dict[str, Any] | None:
        answer = requests.get(f"{host.base_url}/api/runs/{run_id}", timeout=5)
        body = answer.json()
        return body if body["status"] in statuses else None

    return eventually(found, timeout=timeout, interval=0.2)


def retry(host: HostProcess, run_id: str) -> dict[str, Any]:
    answer = requests.post(f"{host.base_url}/api/runs/{run_id}/retry", timeout=10)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["status"] == "received"
    assert body["detail"]["retries"][-1]["status"] in ("failed", "partially_failed")
    return run_by_id(host, run_id, {"succeeded"})


def fire(host: HostProcess, function: str) -> None:
    answer = requests.post(f"{host.base_url}/admin/functions/{function}", json={}, timeout=5)
    assert answer.status_code == 202, answer.text


def test_a_file_whose_attempts_all_fail_ends_poisoned_and_a_retry_sends_it(
    faulty, fstorage, faults, fake_braze
) -> None:  # type: ignore[no-untyped-def]
    faults(**{"segment-split": "boom"})
    rows = people(f"PB{uuid.uuid4().hex[:4]}", 5)
    fake_braze.configure(known_profiles=[r["crmId"] for r in rows])
    name = "vip-clean/boom-export.csv"
    fstorage.blobs.create(SEGMENTS, name, to_csv(rows), overwrite=True)
    run = run_where(faulty, lambda r: r["source"].endswith(name), sync_id="vip-clean")
    assert run["status"] == "failed" and run["error_code"] == "poisoned", run
    assert "InjectedFault: injected fault segment-split" in run["error"]
    assert run["detail"]["poison_message"].startswith("poison/webjobs-blobtrigger-poison/")
    assert run["detail"]["last_error"]["code"] == "internal_error"
    faults()
    again = retry(faulty, run["run_id"])
    assert again["counts"]["sent"] == 5 and again["error"] is None


def test_a_fanned_out_run_whose_chunks_are_poisoned_ends_failed_then_resumes(
    faulty, fstorage, faults, fake_braze
) -> None:  # type: ignore[no-untyped-def]
    faults(**{"segment-buckets": "boomfan"})
    rows = people(f"FB{uuid.uuid4().hex[:4]}", 2500)
    fake_braze.configure(known_profiles=[r["crmId"] for r in rows])
    name = "vip-fanout/boomfan.csv"
    fstorage.blobs.create(SEGMENTS, name, to_csv(rows), overwrite=True)
    run = run_where(faulty, lambda r: r["source"].endswith(name), sync_id="vip-fanout")
    assert run["status"] == "failed" and run["error_code"] == "poisoned", run
    assert run["detail"]["poison_queue"] == "segment-chunks-poison"
    faults()
    again = retry(faulty, run["run_id"])
    assert again["counts"]["sent"] == 2500 and again["counts"]["rows"] == 2500


def test_a_queued_currents_file_that_keeps_failing_ends_poisoned_alone(
    faulty, fstorage, faults, own_bucket, app_env
) -> None:  # type: ignore[no-untyped-def]
    s3 = s3_client(app_env["SWITCHBOARD_S3_ENDPOINT_URL"], "us-east-1")
    files = Files(s3, own_bucket)
    for _ in range(4):  # more than the 3 ingested inline: they go to the queue
        files.put("users.messages.email.Send", files.records("users.messages.email.Send", range(2)))
    doomed = files.objects[2]
    faults(**{"currents-file": doomed.key.rsplit("/", 1)[1]})
    fire(faulty, "currents_timer")
    failed = run_where(faulty, lambda r: r["error_code"] == "poisoned", kind="currents")
    assert doomed.key in failed["source"] and failed["detail"]["file"]["key"] == doomed.key
    others = [o.key for o in files.objects if o.key != doomed.key]
    for key in others:
        ok = run_where(faulty, lambda r, k=key: k in r["source"], kind="currents")
        assert ok["status"] == "succeeded"
    faults()
    again = retry(faulty, failed["run_id"])
    assert again["counts"]["files.ingested"] == 1


def test_a_timer_run_that_fails_ends_failed_at_once(faulty, faults) -> None:  # type: ignore[no-untyped-def]
    faults(**{"currents-timer": True})
    before = {r["run_id"] for r in runs(faulty, kind="currents")}
    fire(faulty, "currents_timer")
    run = run_where(faulty, lambda r: r["run_id"] not in before and r["source"] == "timer",
                    kind="currents")  # fmt: skip
    assert run["status"] == "failed" and run["error_code"] == "internal_error"
    faults()
    assert retry(faulty, run["run_id"])["status"] == "succeeded"


def test_an_export_that_fails_answers_500_as_json_and_its_run_says_why(faulty, faults) -> None:  # type: ignore[no-untyped-def]
    faults(export=True)
    answer = requests.post(
        f"{faulty.base_url}/api/log-export/run", json={"force": True}, timeout=30
    )
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "internal_error"
    run = run_where(faulty, lambda r: r["source"] == "operator", kind="log_export")
    assert run["status"] == "failed" and "injected fault export" in run["error"]
    faults()
    assert retry(faulty, run["run_id"])["status"] == "succeeded"


def _dispatch(host: HostProcess, profiles: list[str]) -> str:
    body = {"template": {"title": "Hi", "body": "there"}, "targets": {"profile_ids": profiles}}
    answer = requests.post(f"{host.base_url}/api/push/send", json=body, timeout=30)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["dispatch_id"])


def test_a_dispatch_whose_plan_is_poisoned_ends_failed_and_a_retry_plans_it(faulty, faults) -> None:  # type: ignore[no-untyped-def]
    faults(**{"push-plan": True})
    dispatch_id = _dispatch(faulty, [f"PP-{n}" for n in range(3)])
    run = run_by_id(faulty, dispatch_id, ENDED)
    assert run["status"] == "failed" and run["error_code"] == "poisoned"
    assert run["detail"]["poison_queue"] == "push-plans-poison"
    faults()
    assert retry(faulty, dispatch_id)["counts"]["profiles"] == 3


def test_a_dispatch_with_a_poisoned_chunk_ends_partially_failed_and_a_retry_completes_it(
    faulty, faults
) -> None:  # type: ignore[no-untyped-def]
    faults(**{"push-chunk": 2})  # two profiles per chunk here: chunk 2 holds PC-2 and PC-3
    dispatch_id = _dispatch(faulty, [f"PC-{n}" for n in range(5)])
    run = run_by_id(faulty, dispatch_id, ENDED)
    assert run["status"] == "partially_failed" and run["error_code"] == "poisoned", run
    assert run["counts"]["lost"] == 2 and run["counts"]["profiles"] == 3
    faults()
    again = retry(faulty, dispatch_id)
    assert again["counts"]["profiles"] == 5 and "lost" not in again["counts"]


def test_the_sweeper_ends_runs_without_a_sign_of_life(faulty, fstorage) -> None:  # type: ignore[no-untyped-def]
    log = RunLog(fstorage)
    long_ago = datetime.now(UTC) - timedelta(days=1)
    stale = log.start(RunKind.CURRENTS, source="a lost worker", now=long_ago)
    waiting = log.start(RunKind.CURRENTS, source="a waiting worker", now=long_ago)
    idle = waiting.model_copy(update={"idle_until": datetime.now(UTC) + timedelta(minutes=5)})
    fstorage.tables.get(RunRecord).upsert(idle)  # quiet since long ago, waiting on purpose
    fire(faulty, "run_sweeper")
    swept = run_by_id(faulty, stale.run_id, ENDED)
    assert swept["status"] == "failed" and swept["error_code"] == "deadline_exceeded"
    left = log.get(waiting.run_id)
    assert left is not None and left.status == RunStatus.RUNNING
    log.finish(waiting.run_id, RunStatus.SUCCEEDED)  # leave nothing open behind


def test_a_run_that_did_not_fail_cannot_be_retried(faulty) -> None:  # type: ignore[no-untyped-def]
    answer = requests.post(f"{faulty.base_url}/api/runs/20260101T000000Z-00000000/retry",
                           timeout=5)  # fmt: skip
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "run_not_found"
    done = [r for r in runs(faulty) if r["status"] == "succeeded"]
    if done:
        again = requests.post(f"{faulty.base_url}/api/runs/{done[0]['run_id']}/retry", timeout=5)
        assert again.status_code == 409 and again.json()["error"]["code"] == "not_failed"


def test_a_webhook_delivery_that_keeps_failing_ends_poisoned_and_a_retry_handles_it(
    faulty, fstorage, faults, webhook_senders
) -> None:  # type: ignore[no-untyped-def]
    from core.suppression import Channel, Reason, SuppressionList
    from devhost.fakes.webhook_senders import SendGridSender
    from tests.test_webhooks_e2e import post

    email = f"poisoned-{uuid.uuid4().hex[:8]}@example.com"
    faults(**{"webhook-delivery": "sendgrid"})
    made = webhook_senders.sendgrid.request([SendGridSender.event("unsubscribe", email)])
    assert post(faulty, "sendgrid", made).status_code == 200  # kept before the answer
    failed = run_where(faulty, lambda r: r["error_code"] == "poisoned", kind="webhook_delivery")
    assert failed["detail"]["poison_message"].startswith("poison/webhook-deliveries-poison/")
    assert SuppressionList(fstorage).reasons(Channel.EMAIL, email) == []
    faults()
    again = retry(faulty, failed["run_id"])
    assert again["counts"]["suppression.changes"] == 1
    assert SuppressionList(fstorage).reasons(Channel.EMAIL, email) == [Reason.UNSUBSCRIBE]
