from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.errors import ConfigError
from core.schedule import CronSchedule


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("0 0 */4 * * *", "2026-11-24T04:18:00", "2026-11-24T08:00:00"),
        ("0 0 */4 * * *", "2026-11-24T08:00:00", "2026-11-24T12:00:00"),
        ("0 0 */4 * * *", "2026-11-24T23:59:59", "2026-11-25T00:00:00"),
        ("0 */5 * * * *", "2026-11-24T04:18:07", "2026-11-24T04:20:00"),
        ("*/2 * * * * *", "2026-11-24T04:18:07", "2026-11-24T04:18:08"),
        ("30 15 9 * * Mon-Fri", "2026-11-28T00:00:00", "2026-11-30T09:15:30"),
        ("0 0 0 1 Jan *", "2026-11-24T00:00:00", "2027-01-01T00:00:00"),
        ("0 0 12 29 2 *", "2026-03-01T00:00:00", "2028-02-29T12:00:00"),
        ("0 0 0 1,15 * 0", "2026-11-24T00:00:00", "2026-11-29T00:00:00"),
        ("0 0 6-8/2 * * *", "2026-11-24T06:30:00", "2026-11-24T08:00:00"),
    ],
)
def test_next_occurrence(expression: str, after: str, expected: str) -> None:
    assert CronSchedule.parse(expression).next_after(at(after)) == at(expected)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("0 */4 * * *", "expected 6 NCRONTAB fields"),
        ("61 * * * * *", "outside 0-59"),
        ("0 0 25 * * *", "outside 0-23"),
        ("0 0 0 * * Funday", "is not NCRONTAB"),
        ("0 0 0 L * *", "is not NCRONTAB"),
        ("0 0 0 * * 7", "outside 0-6"),
        ("*/0 * * * * *", "must be >= 1"),
        ("0 0 0 10-2 * *", "reversed"),
    ],
)
def test_invalid_expressions(expression: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CronSchedule.parse(expression)


def test_impossible_schedule_is_reported() -> None:
    with pytest.raises(ConfigError, match="never fires"):
        CronSchedule.parse("0 0 0 31 2 *").next_after(at("2026-01-01T00:00:00"))


def test_shortest_interval_of_four_hourly() -> None:
    schedule = CronSchedule.parse("0 0 */4 * * *")
    assert schedule.shortest_interval(at("2026-11-24T00:00:00")) == timedelta(hours=4)
