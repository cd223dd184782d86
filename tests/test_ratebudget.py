"""A request budget shared by workers through one table row (core/ratebudget.py), on Azurite,
with a virtual clock: the times asked for are checked, not the wall clock."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from core.ratebudget import RateBudgetRow, SharedBudget, budget_key

pytestmark = pytest.mark.integration


class VirtualClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


def _budgets(storage: Any, clock: VirtualClock, count: int, rate: float) -> list[SharedBudget]:
    table = storage.tables.get(RateBudgetRow)
    key = budget_key(f"https://rest.fake-{uuid.uuid4().hex[:8]}.braze.test", "key")
    return [SharedBudget(table, key, rate, clock=clock, sleep=clock.sleep) for _ in range(count)]


def _busiest(times: list[float], window: float) -> int:
    times = sorted(times)
    busiest, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        busiest = max(busiest, last - first + 1)
    return busiest


def test_workers_sharing_a_budget_stay_within_its_rate_together(storage: Any) -> None:
    clock = VirtualClock()
    rate = 100.0
    workers = _budgets(storage, clock, 3, rate)
    sent: list[float] = []
    turn = workers[0].min_reservation
    for n in range(900):  # each worker spends a slot's worth, then the next one goes
        workers[n // turn % 3].acquire()
        sent.append(clock.now)
    span = sent[-1] - sent[0]
    # Together, not each: 900 requests at 100/s take about 9 s whoever sends them.
    assert span >= (len(sent) - workers[0].max_reservation * 3) / rate
    burst = rate * workers[0].burst_seconds
    # The documented margin: a window holds at most rate x window, plus the burst, plus
    # one reservation (its credits may all go at its start).
    assert _busiest(sent, 1.0) <= rate * 1.0 + burst + workers[0].max_reservation
    assert _busiest(sent, 3.0) <= rate * 3.0 + burst + workers[0].max_reservation
    # A storage round trip per reservation, not per request.
    assert sum(w.reservations for w in workers) <= len(sent) / turn + 3 * 3


def test_an_idle_budget_grants_no_more_than_its_burst_at_once(storage: Any) -> None:
    clock = VirtualClock()
    (worker,) = _budgets(storage, clock, 1, 100.0)
    worker.acquire()
    clock.sleep(60)  # a minute of silence earns no minute of credit
    start = clock.now
    for _ in range(200):
        worker.acquire()
    allowance = worker.max_reservation + 100.0 * worker.burst_seconds
    assert clock.now - start >= (200 - allowance) / 100.0


def test_a_rate_limit_told_to_one_worker_pauses_the_others(storage: Any) -> None:
    clock = VirtualClock()
    first, second = _budgets(storage, clock, 2, 50.0)
    first.acquire()
    second.acquire()
    told_at = clock.now
    first.pause_for(2.0)
    clock.sleep(second.max_reservation / 50.0)  # the other worker's credits run out
    second.acquire()
    assert clock.now >= told_at + 2.0  # it learned of the pause from the shared row
    waited = first.acquire()
    assert waited >= 0 and clock.now >= told_at + 2.0


def test_the_row_names_neither_endpoint_nor_key(storage: Any) -> None:
    key = budget_key("https://rest.iad-01.braze.com", "s3cr3t-api-key")
    assert "braze" not in key and "s3cr3t" not in key
    assert key != budget_key("https://rest.iad-01.braze.com", "another-key")
    assert key == budget_key("https://rest.iad-01.braze.com/", "s3cr3t-api-key")
    with pytest.raises(ValueError, match="positive"):
        SharedBudget(storage.tables.get(RateBudgetRow), key, 0)
