"""Destination contract: every destination passes these against its local fake server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from core.destinations.base import BatchResult, Destination
from core.destinations.braze import BrazeDestination
from core.errors import TerminalError, TransientError
from core.http import retry_after_seconds
from core.ratelimit import TokenBucket
from devhost.fakes.braze import FakeBraze


def send(destination: Destination, items: list[dict[str, Any]]) -> BatchResult:
    return destination.send_batch([destination.encode(item) for item in items])


def quick_sleep(seconds: float) -> None:
    time.sleep(min(seconds, 0.01))


@dataclass
class Harness:
    destination: Destination
    fake: FakeBraze

    def item(self, identity: str, **attributes: Any) -> dict[str, Any]:
        return {"external_id": identity, "_update_existing_only": True, **attributes}

    def stored(self, identity: str) -> dict[str, Any] | None:
        return self.fake.profiles().get(identity)


def braze(fake: FakeBraze, **options: Any) -> BrazeDestination:
    return BrazeDestination(fake.url, "fake-braze-key", sleep=quick_sleep, **options)


@pytest.fixture
def fake() -> Iterator[FakeBraze]:
    server = FakeBraze().start()
    yield server
    server.stop()


@pytest.fixture(params=["braze"])
def harness(request: pytest.FixtureRequest, fake: FakeBraze) -> Harness:
    return Harness(braze(fake, requests_per_second=1000), fake)


# -- the shared contract -------------------------------------------------------------------


def test_contract_batch_is_applied(harness: Harness) -> None:
    harness.fake.configure(known_profiles=["p1", "p2"])
    result = send(
        harness.destination,
        [harness.item("p1", first_name="Ana"), harness.item("p2", country="NL")],
    )
    assert result.failures == {}
    assert harness.stored("p1") == {"first_name": "Ana"}
    assert harness.stored("p2") == {"country": "NL"}


def test_contract_unknown_profiles_are_unmatched_never_created(harness: Harness) -> None:
    harness.fake.configure(known_profiles=["p1"])
    result = send(
        harness.destination,
        [harness.item("ghost", first_name="X"), harness.item("p1", first_name="Ana")],
    )
    assert list(result.failures) == [0] and result.failures[0].unmatched
    assert harness.stored("ghost") is None
    assert harness.stored("p1") == {"first_name": "Ana"}


def test_contract_nulls_remove_attributes(harness: Harness) -> None:
    harness.fake.configure(known_profiles=["p1"])
    send(harness.destination, [harness.item("p1", tier="gold", first_name="Ana")])
    send(harness.destination, [harness.item("p1", tier=None)])
    assert harness.stored("p1") == {"first_name": "Ana"}


def test_contract_server_errors_retry_then_succeed(harness: Harness) -> None:
    harness.fake.configure(known_profiles=["p1"], fail_next=[500, 503])
    result = send(harness.destination, [harness.item("p1", first_name="Ana")])
    assert result.retries == 2 and harness.stored("p1") == {"first_name": "Ana"}


def test_contract_persistent_server_errors_are_transient(harness: Harness) -> None:
    harness.fake.configure(known_profiles=["p1"], fail_next=[500] * 10)
    with pytest.raises(TransientError, match="gave up after 5 attempts"):
        send(harness.destination, [harness.item("p1", first_name="Ana")])


def test_contract_bad_credentials_are_terminal(harness: Harness) -> None:
    harness.fake.configure(api_key="another-key")
    with pytest.raises(TerminalError, match="401"):
        send(harness.destination, [harness.item("p1", first_name="Ana")])
    assert harness.fake.state.requests == 1  # no retry of a terminal answer


# -- Braze specifics -------------------------------------------------------------------------


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
