"""A request budget shared by workers through one table row (core/ratebudget.py), on Azurite,
with a virtual clock: the shares and times asked for are checked, not the wall clock."""

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


def _row(storage: Any, key: str) -> RateBudgetRow:
    found = storage.tables.get(RateBudgetRow).get("budget", key)
    assert found is not None
    return found.entity


def _budgets(
    storage: Any, clock: VirtualClock, count: int, rate: float
) -> tuple[str, list[SharedBudget]]:
    table = storage.tables.get(RateBudgetRow)
    key = budget_key(f"https://rest.fake-{uuid.uuid4().hex[:8]}.braze.test", "key")
    workers = [SharedBudget(table, key, rate, clock=clock, sleep=clock.sleep) for _ in range(count)]
    return key, workers


def _live_sum(row: RateBudgetRow, now: float) -> float:
    return sum(rate for rate, until in row.shares.values() if until > now)


def test_workers_converge_to_equal_shares_that_never_add_up_past_the_rate(storage: Any) -> None:
    clock = VirtualClock()
    key, workers = _budgets(storage, clock, 3, 90.0)
    assert workers[0].renew() == 90.0  # alone: all of it
    assert workers[1].renew() == 0.0  # nothing free until the first one lowers its share
    for _ in range(3):  # renewals, in turn, as each worker's threads make them
        for worker in workers:
            worker.renew()
            assert _live_sum(_row(storage, key), clock.now) <= 90.0 + 1e-9
            clock.sleep(0.1)
    assert [w.share for w in workers] == [30.0, 30.0, 30.0]


def test_a_worker_alone_paces_at_the_whole_rate_and_no_faster(storage: Any) -> None:
    clock = VirtualClock()
    _, (worker,) = _budgets(storage, clock, 1, 50.0)
    worker.acquire()
    start = clock.now
    for _ in range(500):
        worker.acquire()
    assert worker.share == 50.0
    burst = max(1.0, 50.0 * 0.05)
    assert clock.now - start >= (500 - burst) / 50.0  # 10 s for 500, less one burst


def test_a_closed_worker_gives_its_share_back_and_a_dead_ones_lease_runs_out(
    storage: Any,
) -> None:
    clock = VirtualClock()
    key, (first, second, third) = _budgets(storage, clock, 3, 30.0)
    for _ in range(3):
        for worker in (first, second, third):
            worker.renew()
    assert first.share == second.share == third.share == 10.0
    second.close()
    assert second.worker not in _row(storage, key).shares
    assert first.renew() == 15.0  # the closed share at once (the fair share of two)
    clock.sleep(third.lease_seconds + 0.1)  # third stopped renewing without closing
    assert first.renew() == 30.0  # the dead one's after its lease


def test_a_rate_limit_told_to_one_worker_pauses_the_others(storage: Any) -> None:
    clock = VirtualClock()
    key, (first, second) = _budgets(storage, clock, 2, 50.0)
    for worker in (first, second, first, second):
        worker.renew()
    told_at = clock.now
    first.pause_for(2.0)
    assert _row(storage, key).paused_until == pytest.approx(told_at + 2.0)
    first.acquire()  # told itself: waits at once
    assert clock.now >= told_at + 2.0
    clock.now = told_at
    clock.sleep(second.renew_seconds)  # the other learns of it at its next renewal
    second.acquire()
    assert clock.now >= told_at + 2.0


def test_the_row_names_neither_endpoint_nor_key(storage: Any) -> None:
    key = budget_key("https://rest.iad-01.braze.com", "s3cr3t-api-key")
    assert "braze" not in key and "s3cr3t" not in key
    assert key != budget_key("https://rest.iad-01.braze.com", "another-key")
    assert key == budget_key("https://rest.iad-01.braze.com/", "s3cr3t-api-key")
    with pytest.raises(ValueError, match="positive"):
        SharedBudget(storage.tables.get(RateBudgetRow), key, 0)
