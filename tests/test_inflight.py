"""Batches in flight (core/sync/inflight.py) and the checkpoints' group commit."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from core.sync.checkpoints import BatchCheckpoint, _GroupCommit
from core.sync.inflight import AimdWindow, InFlight
from tests.helpers import eventually


def test_window_halves_on_a_rate_limit_and_grows_back_by_one_per_clean_window() -> None:
    window = AimdWindow(8)
    window.observe(rate_limited=True)
    assert window.limit == 4
    window.observe(rate_limited=True)
    window.observe(rate_limited=True)
    window.observe(rate_limited=True)
    assert window.limit == 1  # never below one
    window.observe(rate_limited=False)
    assert window.limit == 2
    for _ in range(2):
        window.observe(rate_limited=False)
    assert window.limit == 3
    for _ in range(100):
        window.observe(rate_limited=False)
    assert window.limit == 8  # never above the maximum
    with pytest.raises(ValueError, match="at least 1"):
        AimdWindow(0)


def test_results_come_back_in_the_order_sent_even_when_later_jobs_finish_first() -> None:
    gates = [threading.Event() for _ in range(4)]
    started: list[int] = []
    flight: InFlight[int, int] = InFlight(4)

    def job(n: int) -> Any:
        def run() -> int:
            started.append(n)
            gates[n].wait(30)
            return n * 10

        return run

    back: list[tuple[int, int]] = []
    for n in range(4):
        back += flight.submit(n, job(n))
    eventually(lambda: len(started) == 4, timeout=30)  # all four in flight at once
    for n in (3, 2, 1):
        gates[n].set()
    assert back == []  # the oldest has not come back: nothing is handed out of order
    gates[0].set()
    back += flight.drain()
    assert back == [(0, 0), (1, 10), (2, 20), (3, 30)]
    flight.close()


def test_a_full_window_starts_nothing_more_until_a_send_finishes() -> None:
    flight: InFlight[int, int] = InFlight(3)
    release = threading.Event()
    started: list[int] = []
    back: list[tuple[int, int]] = []

    def job(n: int) -> Any:
        def run() -> int:
            started.append(n)
            release.wait(30)
            return n

        return run

    submitter = threading.Thread(
        target=lambda: [back.extend(flight.submit(n, job(n))) for n in range(6)]
    )
    submitter.start()
    eventually(lambda: len(started) == 3, timeout=30)
    assert submitter.is_alive()  # the fourth waits for room
    assert started == [0, 1, 2]  # and has not started: three sends at most
    release.set()
    submitter.join(30)
    back += flight.drain()
    flight.close()
    assert back == [(n, n) for n in range(6)]


def test_finished_sends_behind_a_slow_one_do_not_hold_the_window() -> None:
    flight: InFlight[int, int] = InFlight(2)
    slow = threading.Event()
    back: list[tuple[int, int]] = []
    back += flight.submit(0, lambda: 0 if slow.wait(30) else -1)
    for n in range(1, 6):  # each finishes at once; the window still has room for them
        back += flight.submit(n, lambda n=n: n)  # type: ignore[misc]
    assert back == []  # none comes back before the slow one
    assert len(flight) == 6
    slow.set()
    back += flight.drain()
    flight.close()
    assert back == [(n, n) for n in range(6)]


def test_window_of_one_runs_inline_and_settles_at_once() -> None:
    flight: InFlight[str, str] = InFlight(1)
    caller = threading.current_thread()
    assert flight.submit("a", lambda: threading.current_thread().name) == [("a", caller.name)]
    assert len(flight) == 0


def test_a_failed_send_stops_the_rest_and_raises_once_reached() -> None:
    flight: InFlight[int, int] = InFlight(4)
    release = threading.Event()
    finished: list[int] = []

    def ok(n: int) -> Any:
        def run() -> int:
            release.wait(30)
            finished.append(n)
            return n

        return run

    def fail() -> int:
        raise RuntimeError("destination said no")

    assert flight.submit(1, ok(1)) == []
    assert flight.submit(2, fail) == []  # behind 1, which is still under way
    assert flight.submit(3, ok(3)) == []
    release.set()
    back: list[tuple[int, int]] = []
    with pytest.raises(RuntimeError, match="destination said no"):
        for item in flight.drain():
            back.append(item)
    assert back == [(1, 1)]  # what was sent before the failure is settled first
    assert sorted(finished) == [1, 3]  # the send after it was waited for, not abandoned
    assert len(flight) == 0


def _row(n: int) -> BatchCheckpoint:
    return BatchCheckpoint(partition_key="run", row_key=f"w-{n:09d}", items={f"0:{n}": []})


def test_checkpoints_that_arrive_during_a_write_go_together_in_the_next_one() -> None:
    groups: list[list[str]] = []
    first_write_entered = threading.Event()
    release_first = threading.Event()

    def write(rows: list[BatchCheckpoint]) -> None:
        groups.append([r.row_key for r in rows])
        if len(groups) == 1:
            first_write_entered.set()
            release_first.wait(30)

    group = _GroupCommit(write)
    leader = threading.Thread(target=group.commit, args=(_row(0),))
    leader.start()
    assert first_write_entered.wait(30)
    followers = [threading.Thread(target=group.commit, args=(_row(n),)) for n in range(1, 8)]
    for thread in followers:
        thread.start()
    eventually(lambda: len(group._queued) == 7, timeout=30)
    release_first.set()
    for thread in [leader, *followers]:
        thread.join(30)
    assert groups[0] == ["w-000000000"]
    assert sorted(groups[1]) == [f"w-{n:09d}" for n in range(1, 8)]  # one write for seven
    assert len(groups) == 2


def test_a_failed_group_write_fails_every_batch_in_it() -> None:
    def write(rows: list[BatchCheckpoint]) -> None:
        raise OSError("storage is down")

    group = _GroupCommit(write)
    with pytest.raises(OSError, match="storage is down"):
        group.commit(_row(1))
    errors: list[BaseException] = []

    def commit(n: int) -> None:
        try:
            group.commit(_row(n))
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(errors) == 5  # nobody is told its batch was recorded
