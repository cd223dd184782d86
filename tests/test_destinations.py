"""Destination contract: every destination passes these against its local fake server."""

from __future__ import annotations

import base64
import io
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pytest

from core.destinations.base import BatchResult, Destination
from core.destinations.braze import BrazeDestination
from core.destinations.campaign import CampaignDestination, CampaignDestinationSpec
from core.destinations.file_drop import BlobDrop
from core.destinations.known_profiles import KnownProfiles
from core.errors import TerminalError, TransientError
from core.http import retry_after_seconds
from core.ratelimit import TokenBucket
from core.storage import Storage
from core.storage.connection import parse_connection_string
from core.sync.definitions import SyncDefinition, parse_document
from core.sync.state import Change
from devhost.fakes.braze import FakeBraze
from devhost.fakes.campaign import FakeCampaignCollector
from devhost.faultproxy import FaultProxy


def send(destination: Destination, items: list[dict[str, Any]]) -> BatchResult:
    return destination.send_batch([destination.encode(item) for item in items])


def quick_sleep(seconds: float) -> None:
    time.sleep(min(seconds, 0.01))


def braze(fake: FakeBraze, **options: Any) -> BrazeDestination:
    return BrazeDestination(fake.url, "fake-braze-key", sleep=quick_sleep, **options)


CONTRACT_SYNC = parse_document({
    "version": 1,
    "syncs": [{
        "id": "contract",
        "identity": {"column": "crmId", "namespace": "crmId"},
        "fields": [
            {"source": name, "target": name, "send_nulls": True}
            for name in ("first_name", "country", "tier")
        ],
    }],
}).syncs[0]  # fmt: skip


class Harness:
    """One destination against its local fake, as the contract sees it."""

    destination: Destination
    sync: SyncDefinition = CONTRACT_SYNC

    def item(self, identity: str, **attributes: Any) -> dict[str, Any]:
        return self.destination.item(self.sync, identity, Change(attributes, (), ()))

    def know(self, *identities: str) -> None:
        """The profiles the destination has."""
        raise NotImplementedError

    def stored(self, identity: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def flaky(self) -> None:
        """The next couple of attempts fail the way a server or network does."""
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError

    def refuse_credentials(self) -> Destination:
        """The destination as built with a credential the service refuses."""
        raise NotImplementedError


class BrazeHarness(Harness):
    def __init__(self, fake: FakeBraze) -> None:
        self.fake = fake
        self.destination = braze(fake, requests_per_second=1000)

    def know(self, *identities: str) -> None:
        self.fake.configure(known_profiles=list(identities))

    def stored(self, identity: str) -> dict[str, Any] | None:
        return self.fake.profiles().get(identity)

    def flaky(self) -> None:
        self.fake.configure(fail_next=[500, 503])

    def down(self) -> None:
        self.fake.configure(fail_next=[500] * 10)

    def refuse_credentials(self) -> Destination:
        self.fake.configure(api_key="another-key")
        return self.destination


class CampaignHarness(Harness):
    """Import files in a blob container reached through a fault proxy; the fake collector
    plays Campaign's file collector and import workflow."""

    def __init__(self, storage: Storage, proxy: FaultProxy, drop: Storage) -> None:
        self.storage, self.proxy, self.drop = storage, proxy, drop
        self.registry = f"contract-{uuid.uuid4().hex[:8]}"
        self.container = f"contract-{uuid.uuid4().hex[:8]}"
        self.collector = FakeCampaignCollector(
            storage, container=self.container, archive=self.container + "-archive"
        )
        self.runs = 0

    @property  # type: ignore[override]
    def destination(self) -> Destination:
        """A profile has one line per run: each send here is a run of its own."""
        return self.build(self.drop)

    def build(self, drop: Storage) -> CampaignDestination:
        spec = CampaignDestinationSpec(type="adobe_campaign", known_profiles=self.registry)
        self.runs += 1
        run_id = f"20261208T{self.runs:06d}Z-{uuid.uuid4().hex[:8]}"
        return CampaignDestination(
            spec, self.sync, BlobDrop(drop, self.container), run_id=run_id,
            ledger=self.storage.blobs, known=KnownProfiles(self.storage, self.registry),
        )  # fmt: skip

    def know(self, *identities: str) -> None:
        export = b"crmId\n" + b"".join(i.encode() + b"\n" for i in identities)
        KnownProfiles(self.storage, self.registry).apply_export("full.txt", io.BytesIO(export))

    def stored(self, identity: str) -> dict[str, Any] | None:
        self.collector.collect()
        assert not self.collector.refused
        return self.collector.profiles.get(identity)

    def flaky(self) -> None:
        self.proxy.configure(refuse_every=2)

    def down(self) -> None:
        self.proxy.configure(down=True)

    def refuse_credentials(self) -> Destination:
        account = replace(self.drop.account, account_key=base64.b64encode(b"x" * 64).decode())
        return self.build(Storage(account))


@pytest.fixture
def fake() -> Iterator[FakeBraze]:
    server = FakeBraze().start()
    yield server
    server.stop()


@pytest.fixture
def blob_proxy(local_services: dict[str, str]) -> Iterator[tuple[Storage, FaultProxy]]:
    """A Storage whose blob calls go through a fault proxy in front of Azurite."""
    account = parse_connection_string(local_services["AzureWebJobsStorage"])
    blob = urlsplit(account.blob_url)
    proxy = FaultProxy(blob.hostname or "", blob.port or 0).start()
    via = replace(account, blob_url=f"http://127.0.0.1:{proxy.port}{blob.path}")
    try:
        yield Storage(via), proxy
    finally:
        proxy.stop()


@pytest.fixture(params=["braze", "adobe_campaign"])
def harness(request: pytest.FixtureRequest, fake: FakeBraze) -> Harness:
    if request.param == "braze":
        return BrazeHarness(fake)
    storage = request.getfixturevalue("storage")
    drop, proxy = request.getfixturevalue("blob_proxy")
    return CampaignHarness(storage, proxy, drop)


# -- the shared contract -------------------------------------------------------------------


def test_contract_batch_is_applied(harness: Harness) -> None:
    harness.know("p1", "p2")
    result = send(
        harness.destination,
        [harness.item("p1", first_name="Ana"), harness.item("p2", country="NL")],
    )
    assert result.failures == {}
    assert harness.stored("p1") == {"first_name": "Ana"}
    assert harness.stored("p2") == {"country": "NL"}


def test_contract_unknown_profiles_are_unmatched_never_created(harness: Harness) -> None:
    harness.know("p1")
    result = send(
        harness.destination,
        [harness.item("ghost", first_name="X"), harness.item("p1", first_name="Ana")],
    )
    assert list(result.failures) == [0] and result.failures[0].unmatched
    assert harness.stored("ghost") is None
    assert harness.stored("p1") == {"first_name": "Ana"}


def test_contract_nulls_remove_attributes(harness: Harness) -> None:
    harness.know("p1")
    send(harness.destination, [harness.item("p1", tier="gold", first_name="Ana")])
    send(harness.destination, [harness.item("p1", tier=None)])
    assert harness.stored("p1") == {"first_name": "Ana"}


def test_contract_transient_faults_retry_then_succeed(harness: Harness) -> None:
    harness.know("p1")
    harness.flaky()
    result = send(harness.destination, [harness.item("p1", first_name="Ana")])
    assert result.failures == {} and harness.stored("p1") == {"first_name": "Ana"}


def test_contract_persistent_faults_are_transient(harness: Harness) -> None:
    harness.know("p1")
    harness.down()
    with pytest.raises(TransientError):
        send(harness.destination, [harness.item("p1", first_name="Ana")])


def test_contract_refused_credentials_are_terminal(harness: Harness) -> None:
    harness.know("p1")
    destination = harness.refuse_credentials()
    with pytest.raises(TerminalError, match=r"40[13]"):
        send(destination, [harness.item("p1", first_name="Ana")])


# -- Braze specifics -------------------------------------------------------------------------


def test_braze_counts_retries_and_gives_up_after_its_attempts(fake: FakeBraze) -> None:
    fake.configure(known_profiles=["p1"], fail_next=[500, 503])
    destination = braze(fake, requests_per_second=1000)
    item = {"external_id": "p1", "first_name": "Ana", "_update_existing_only": True}
    assert send(destination, [item]).retries == 2
    fake.configure(fail_next=[500] * 10)
    with pytest.raises(TransientError, match="gave up after 5 attempts"):
        send(destination, [item])


def test_braze_refused_key_is_not_retried(fake: FakeBraze) -> None:
    fake.configure(api_key="another-key")
    with pytest.raises(TerminalError, match="401"):
        send(braze(fake, requests_per_second=1000), [{"external_id": "p1"}])
    assert fake.state.requests == 1


def test_rate_limit_waits_do_not_spend_attempts(fake: FakeBraze) -> None:
    fake.configure(known_profiles=[f"p{i}" for i in range(40)], rate_per_second=10)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        quick_sleep(seconds)  # the fake's windows are real seconds: look again soon

    destination = BrazeDestination(fake.url, "fake-braze-key", sleep=sleep,
                                   requests_per_second=1000, max_attempts=1)  # fmt: skip
    results = [
        send(destination, [{"external_id": f"p{i}", "n": i, "_update_existing_only": True}])
        for i in range(40)
    ]
    # 10 per whole-second window: 40 requests need the client to wait for later windows,
    # told by the server (429 with Retry-After), and no attempt is spent on it.
    assert sum(r.rate_limited_waits for r in results) > 0 and sum(waits) > 0
    assert all(not r.failures for r in results)
    assert all(fake.profiles()[f"p{i}"] == {"n": i} for i in range(40))


def test_oversized_batches_are_split(fake: FakeBraze) -> None:
    fake.configure(known_profiles=[f"p{i}" for i in range(30)], max_objects=10)
    destination = braze(fake, requests_per_second=1000)
    items = [{"external_id": f"p{i}", "n": i, "_update_existing_only": True} for i in range(30)]
    items[25]["external_id"] = "ghost"
    result = send(destination, items)
    assert list(result.failures) == [25]  # index maps back through the split
    assert len(fake.profiles()) == 30


def test_client_side_pacing(fake: FakeBraze) -> None:
    fake.configure(known_profiles=["p"])
    virtual = [0.0]  # the pacer's clock: advanced by its own waits, never by the machine

    def wait(seconds: float) -> None:
        virtual[0] += seconds

    pacer = TokenBucket(20, clock=lambda: virtual[0], sleep=wait)
    destination = braze(fake, requests_per_second=20, pacer=pacer)
    for _ in range(30):
        send(destination, [{"external_id": "p", "_update_existing_only": True}])
    assert virtual[0] == pytest.approx(0.5)  # 30 requests, burst 20, then 20/s: 10 x 50 ms
    assert fake.state.rate_limited == 0


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"Retry-After": "2.5"}, now=0) == 2.5
    assert retry_after_seconds({"X-Ratelimit-Retry-After": "4"}, now=0) == 4
    assert retry_after_seconds({"X-RateLimit-Reset": "1000"}, now=990.0) == 10
    assert retry_after_seconds({}, now=0) is None
