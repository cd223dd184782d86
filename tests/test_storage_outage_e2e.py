"""Storage that misbehaves under a running app: connections reset (devhost/faultproxy.py in
front of Azurite) and Azurite restarted mid-run. A segment run, a Currents ingestion and a
log export each end as a clean run would.

The host here talks to an Azurite of its own, with its data on disk (so that a restart
keeps it), through one fault proxy per service.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from core.containers import SEGMENTS
from core.currents.s3 import s3_client
from core.export.service import ExportSettings, LogFile, Window, run_log_export
from core.export.xdm import XdmOptions
from core.services import Services
from core.settings import Settings
from core.storage import Storage
from core.storage.connection import azurite_connection_string, parse_connection_string
from core.suppression import Channel, Reason, SuppressionList
from core.webhooks.deliveries import DeliveryRecord
from devhost.faultproxy import FaultProxy
from devhost.process import HostProcess
from devhost.services import LocalServices, free_port
from tests.conftest import assert_no_run_left_open
from tests.helpers import assert_no_personal_data, eventually
from tests.scenarios import Scenario, people, to_csv
from tests.test_currents_e2e import Files, stored_ids
from tests.test_log_export import Events, read_blob

pytestmark = pytest.mark.integration


class Outage:
    """An Azurite with its data on disk, behind three fault proxies."""

    def __init__(self, data: Path) -> None:
        self.services = LocalServices(data_dir=data, with_s3=False)
        direct = self.services.start()["AzureWebJobsStorage"]
        self.direct = direct
        account = parse_connection_string(direct)
        self.proxies = {
            name: FaultProxy("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0])).start()
            for name, url in (("blob", account.blob_url), ("queue", account.queue_url),
                              ("table", account.table_url))
        }  # fmt: skip
        self.proxied = azurite_connection_string(
            "127.0.0.1", *(self.proxies[n].port for n in ("blob", "queue", "table"))
        )

    def faults(self, **faults: Any) -> None:
        for proxy in self.proxies.values():
            proxy.configure(**faults)

    def restart(self) -> None:
        """Azurite goes away and comes back on the same ports with the same data; while it
        is gone, every connection to it is refused."""
        self.faults(down=True)
        try:
            self.services.restart_azurite()
        finally:
            self.faults(down=False)

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        self.services.stop()


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    managed = Outage(tmp_path_factory.mktemp("outage") / "azurite")
    try:
        yield managed
    finally:
        managed.stop()


@pytest.fixture(scope="module")
def ostorage(outage: Outage) -> Iterator[Storage]:
    storage = Storage(parse_connection_string(outage.direct))
    yield storage
    assert_no_run_left_open(storage)


@pytest.fixture(scope="module")
def host(
    app_env: dict[str, str], outage: Outage, ostorage: Storage, own_bucket: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HostProcess]:  # fmt: skip
    env = {
        **app_env,
        "AzureWebJobsStorage": outage.proxied,
        "SWITCHBOARD_CURRENTS_BUCKET": own_bucket,
        # A queue message received while its answer is lost stays invisible for the
        # function timeout (the host's lease), a failed one for the visibility timeout.
        "AzureFunctionsJobHost__functionTimeout": "00:01:00",
        "AzureFunctionsJobHost__extensions__queues__visibilityTimeout": "00:00:02",
    }
    process = HostProcess(env, free_port(), tmp_path_factory.mktemp("outage-host") / "log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
    assert_no_personal_data(process.log_path)


def _normalised(profiles: dict[str, Any], prefix: str) -> list[Any]:
    """Profiles with the id prefix taken out, in row order (to compare two runs' rows)."""
    return [
        {k: (v.replace(prefix, "*").replace(prefix.lower(), "*") if isinstance(v, str) else v)
         for k, v in (profile or {}).items()}
        for profile in profiles.values()
    ]  # fmt: skip


def _clean_and_faulty(
    host: HostProcess, storage: Storage, fake_braze: Any, count: int
) -> tuple[Scenario, list[dict[str, str]], Scenario, list[dict[str, str]]]:
    token = uuid.uuid4().hex[:4].upper()
    clean, faulty = (
        Scenario(host, storage, fake_braze, "clean"),
        Scenario(host, storage, fake_braze, "fanout"),
    )
    clean_rows, faulty_rows = people(f"C{token}", count), people(f"F{token}", count)
    clean.known(clean_rows)
    faulty.known(faulty_rows)
    run = clean.land(to_csv(clean_rows))
    assert run["status"] == "succeeded" and run["counts"]["sent"] == count, run
    return clean, clean_rows, faulty, faulty_rows


def test_a_segment_run_through_resetting_connections_ends_as_a_clean_one(
    host, ostorage, outage, fake_braze
) -> None:  # type: ignore[no-untyped-def]
    clean, clean_rows, faulty, faulty_rows = _clean_and_faulty(host, ostorage, fake_braze, 2500)
    outage.proxies["table"].configure(reset_every=23)
    outage.proxies["blob"].configure(reset_every=17)
    outage.proxies["queue"].configure(reset_every=7)
    name = f"{faulty.sync}/resets-{uuid.uuid4().hex[:6]}.csv"
    try:
        ostorage.blobs.create(SEGMENTS, name, to_csv(faulty_rows))
        # Duplicated and lost messages cost retries and leases: patience, not a deadline.
        run = faulty.wait_for(name, timeout=300)
    finally:
        outage.faults(reset_every=0)
    assert run["status"] == "succeeded" and run["counts"]["sent"] == 2500, run
    assert outage.proxies["table"].stats.resets > 10
    assert _normalised(faulty.profiles(faulty_rows), faulty_rows[0]["crmId"][:5]) == _normalised(
        clean.profiles(clean_rows), clean_rows[0]["crmId"][:5]
    )


def test_a_segment_run_survives_a_storage_restart_in_its_middle(
    host, ostorage, outage, fake_braze
) -> None:  # type: ignore[no-untyped-def]
    clean, clean_rows, faulty, faulty_rows = _clean_and_faulty(host, ostorage, fake_braze, 3000)
    fake_braze.configure(latency_seconds=0.02)  # the run takes a few seconds
    try:
        name = f"{faulty.sync}/restart-{uuid.uuid4().hex[:6]}.csv"
        ostorage.blobs.create(SEGMENTS, name, to_csv(faulty_rows))
        eventually(lambda: len(faulty.received_for(faulty_rows)) >= 150, timeout=60)
        outage.restart()
        run = faulty.wait_for(name, timeout=300)
    finally:
        fake_braze.configure(latency_seconds=0.0)
    assert run["status"] == "succeeded" and run["counts"]["rows"] == 3000, run
    assert _normalised(faulty.profiles(faulty_rows), faulty_rows[0]["crmId"][:5]) == _normalised(
        clean.profiles(clean_rows), clean_rows[0]["crmId"][:5]
    )


def test_a_currents_ingestion_survives_a_storage_restart_in_its_middle(
    host, ostorage, outage, own_bucket, app_env
) -> None:  # type: ignore[no-untyped-def]
    files = Files(s3_client(app_env["SWITCHBOARD_S3_ENDPOINT_URL"], "us-east-1"), own_bucket)
    kind = "users.messages.email.Delivery"
    expected = set()
    for n in range(8):
        numbers = range(n * 300, (n + 1) * 300)
        files.put(kind, files.records(kind, numbers))
        expected |= {files.id_of(kind, i) for i in numbers}
    outage.faults(delay_seconds=0.01)  # every storage answer a little late: time to restart
    try:
        answer = requests.post(f"{host.base_url}/admin/functions/currents_timer", json={},
                               timeout=5)  # fmt: skip
        assert answer.status_code == 202
        eventually(lambda: len(set(stored_ids(ostorage)) & expected) > 0, timeout=60)
        outage.restart()
    finally:
        outage.faults(delay_seconds=0.0)
    eventually(lambda: expected <= set(stored_ids(ostorage)), timeout=120)
    counts = stored_ids(ostorage)
    assert {event: counts[event] for event in expected} == dict.fromkeys(expected, 1)


def test_a_log_export_survives_a_storage_restart_in_its_middle(
    outage, ostorage, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    services = Services.from_settings(Settings(**{"AzureWebJobsStorage": outage.proxied}))
    window = Window(
        datetime(2060, 1, 1, tzinfo=UTC) + timedelta(hours=4 * (uuid.uuid4().int % 50_000))
    )
    container = f"export-{uuid.uuid4().hex[:12]}"
    options = ExportSettings(container, XdmOptions("switchboard", "crmId"), 5, start=window.start)
    events = Events(ostorage)
    at = window.start + timedelta(minutes=5)
    kinds = ("users.messages.email.Send", "users.messages.email.Delivery",
             "users.messages.email.Open", "users.messages.email.Bounce")  # fmt: skip
    events.place([events.make(kinds[n % 4], at) for n in range(400)], window.start)
    restarted = threading.Event()
    close = LogFile.close

    def close_then_restart(self: LogFile) -> dict[str, Any]:
        written = close(self)
        if not restarted.is_set():  # after the first file: storage goes away and comes back
            restarted.set()
            outage.restart()
        return written

    monkeypatch.setattr(LogFile, "close", close_then_restart)
    outcome = run_log_export(services, now=window.end + timedelta(minutes=1), options=options)
    assert restarted.is_set()
    assert outcome.run.status == "succeeded" and outcome.run.counts["windows"] == 1
    monkeypatch.undo()
    names = [window.blob_name(log) for log in ("broadLog", "trackingLog")]
    first = {name: read_blob(ostorage, container, name) for name in names}
    again = run_log_export(services, now=window.end + timedelta(minutes=2), options=options,
                           force=True, window_start=window.start)  # fmt: skip
    assert again.run.status == "succeeded"
    assert {name: read_blob(ostorage, container, name) for name in names} == first
    assert Counter(len(data) > 0 for data in first.values())[True] == 2


def test_a_webhook_delivery_while_storage_fails_is_sent_again_and_lands_once(  # type: ignore[no-untyped-def]
    host: HostProcess, outage: Outage, ostorage: Storage, webhook_senders
) -> None:
    """Storage down: the provider is told to send again (503, Retry-After). Kept but not
    queued (the queue service down): the same, and the provider's retry queues it."""
    from core.webhooks.hook import digest
    from devhost.fakes.webhook_senders import SendGridSender
    from tests.test_webhooks_e2e import post

    emails = [f"outage-{n}-{uuid.uuid4().hex[:8]}@example.com" for n in range(2)]
    batches = [webhook_senders.sendgrid.request([SendGridSender.event("unsubscribe", e)])
               for e in emails]  # fmt: skip
    for batch, down in zip(
        batches, (outage.proxies.values(), [outage.proxies["queue"]]), strict=True
    ):
        for proxy in down:
            proxy.configure(down=True)
        try:
            answer = post(host, "sendgrid", batch)
        finally:
            outage.faults(down=False)
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "storage_unavailable"
        assert answer.headers["Retry-After"]
    # The second was kept and never queued (whether the first's blob write got through
    # before the proxy went down depends on the connection it took: either way it is the
    # provider's retry that makes it land).
    assert ostorage.blobs.exists(
        "webhooks", f"sendgrid/{digest('sendgrid', digest(batches[1][1]))}"
    )
    for batch in batches:  # SendGrid sends each again
        assert post(host, "sendgrid", batch).status_code == 200
    suppressions = SuppressionList(ostorage)
    for email in emails:
        eventually(lambda e=email: suppressions.reasons(Channel.EMAIL, e) == [Reason.UNSUBSCRIBE],
                   timeout=60)  # fmt: skip
    ledger = ostorage.tables.get(DeliveryRecord)

    def both_done() -> bool:
        return [r.status for r in ledger.query_partition("sendgrid")] == ["done", "done"]

    eventually(both_done, timeout=60)
    assert sum(r.counts["events"] for r in ledger.query_partition("sendgrid")) == 2
