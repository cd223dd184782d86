"""NCRONTAB schedules as Azure Functions timer triggers use them.

Six fields, seconds first, evaluated in UTC: ``{second} {minute} {hour} {day} {month}
{day-of-week}``. Each field takes ``*``, a value, a range ``a-b``, a step ``*/n`` or
``a-b/n``, and comma lists of those; months and weekdays also take English three-letter
names. Day-of-week runs 0-6 with 0 = Sunday. When both day-of-month and day-of-week are
restricted, a day matches if either does (classic cron rule, which NCrontab follows).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from core.errors import ConfigError

_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
# (name, lowest, highest, names for values starting at `lowest`)
_FIELDS: list[tuple[str, int, int, list[str]]] = [
    ("second", 0, 59, []),
    ("minute", 0, 59, []),
    ("hour", 0, 23, []),
    ("day", 1, 31, []),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 6, _DAYS),
]
# How far ahead to look for an occurrence before declaring the schedule impossible (31 Feb).
_SEARCH_YEARS = 5


def _parse_value(text: str, low: int, names: list[str], field: str, expr: str) -> int:
    lowered = text.lower()
    if lowered in names:
        return low + names.index(lowered)
    if not text.isdigit():
        raise ConfigError(f"schedule {expr!r}: {field} value {text!r} is not a number")
    return int(text)


def _parse_field(text: str, index: int, expr: str) -> frozenset[int]:
    field, low, high, names = _FIELDS[index]
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ConfigError(f"schedule {expr!r}: {field} step {step_text!r} must be >= 1")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start = _parse_value(first, low, names, field, expr)
            end = _parse_value(last, low, names, field, expr)
        else:
            start = _parse_value(base, low, names, field, expr)
            end = high if step_text else start
        if not (low <= start <= high and low <= end <= high) or start > end:
            raise ConfigError(
                f"schedule {expr!r}: {field} {base!r} is outside {low}-{high} or reversed"
            )
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed six-field NCRONTAB expression."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        parts = expression.split()
        if len(parts) != 6:
            raise ConfigError(
                f"schedule {expression!r}: expected 6 NCRONTAB fields "
                "'{second} {minute} {hour} {day} {month} {day-of-week}', "
                f"got {len(parts)}"
            )
        seconds, minutes, hours, days, months, weekdays = (
            _parse_field(part, i, expression) for i, part in enumerate(parts)
        )
        return cls(
            expression,
            seconds,
            minutes,
            hours,
            days,
            months,
            weekdays,
            days_restricted=parts[3] != "*",
            weekdays_restricted=parts[5] != "*",
        )

    def _day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        in_days = day.day in self.days
        in_weekdays = (day.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return in_days or in_weekdays
        return in_days and in_weekdays

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after `moment` (UTC, whole seconds)."""
        moment = moment.astimezone(UTC).replace(microsecond=0)
        day = moment.date()
        last_day = day + timedelta(days=366 * _SEARCH_YEARS)
        while day <= last_day:
            if self._day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        for second in sorted(self.seconds):
                            candidate = datetime(
                                day.year, day.month, day.day, hour, minute, second, tzinfo=UTC
                            )
                            if candidate > moment:
                                return candidate
            day += timedelta(days=1)
        raise ConfigError(f"schedule {self.expression!r} never fires")

    def shortest_interval(self, sample_from: datetime, occurrences: int = 64) -> timedelta:
        """Smallest gap between consecutive occurrences over a sample, for rate guards."""
        previous = self.next_after(sample_from)
        gap = timedelta.max
        for _ in range(occurrences):
            following = self.next_after(previous)
            gap = min(gap, following - previous)
            previous = following
        return gap
