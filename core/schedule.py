"""NCRONTAB schedules as Azure Functions timer triggers use them, evaluated by `croniter`.

Six fields, seconds first, evaluated in UTC: ``{second} {minute} {hour} {day} {month}
{day-of-week}``. Each field takes ``*``, a value, a range ``a-b``, a step ``*/n`` or
``a-b/n``, and comma lists of those; months and weekdays also take English three-letter
names. Day-of-week runs 0-6 with 0 = Sunday. When both day-of-month and day-of-week are
restricted, a day matches if either does (classic cron rule, which NCrontab follows).

What croniter accepts beyond NCRONTAB (five or seven fields, `L`, `#`, `?`, `H`, weekday 7,
reversed ranges that wrap) is refused here, so a schedule that runs locally runs in Azure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from croniter import CroniterBadCronError, CroniterBadDateError, croniter

from core.errors import ConfigError

_NAMES = "jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec|sun|mon|tue|wed|thu|fri|sat"
_ITEM = rf"(\*|\d+|{_NAMES})(-(\d+|{_NAMES}))?(/\d+)?"
_FIELD = re.compile(rf"{_ITEM}(,{_ITEM})*", re.IGNORECASE)
_LIMITS = [("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31),
           ("month", 1, 12), ("day-of-week", 0, 6)]  # fmt: skip
# How far ahead croniter looks for an occurrence before the schedule counts as impossible.
_SEARCH_YEARS = 5


def _check_field(text: str, index: int, expression: str) -> None:
    field, low, high = _LIMITS[index]
    if not _FIELD.fullmatch(text):
        raise ConfigError(f"schedule {expression!r}: {field} {text!r} is not NCRONTAB")
    for part in text.split(","):
        base, _, step = part.partition("/")
        if step and int(step) == 0:
            raise ConfigError(f"schedule {expression!r}: {field} step must be >= 1")
        numbers = [int(v) for v in base.split("-") if v.isdigit()]
        if any(not low <= n <= high for n in numbers) or numbers != sorted(numbers):
            raise ConfigError(
                f"schedule {expression!r}: {field} {base!r} is outside {low}-{high} or reversed"
            )


@dataclass(frozen=True)
class CronSchedule:
    """A validated six-field NCRONTAB expression."""

    expression: str

    @classmethod
    def parse(cls, expression: str) -> CronSchedule:
        parts = expression.split()
        if len(parts) != 6:
            raise ConfigError(
                f"schedule {expression!r}: expected 6 NCRONTAB fields "
                "'{second} {minute} {hour} {day} {month} {day-of-week}', "
                f"got {len(parts)}"
            )
        for index, part in enumerate(parts):
            _check_field(part, index, expression)
        normalized = " ".join(parts)
        try:
            croniter(normalized, second_at_beginning=True)
        except CroniterBadCronError as exc:
            raise ConfigError(f"schedule {expression!r}: {exc}") from None
        return cls(normalized)

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after `moment` (UTC, whole seconds)."""
        start = moment.astimezone(UTC).replace(microsecond=0)
        try:
            found = croniter(
                self.expression, start, second_at_beginning=True,
                max_years_between_matches=_SEARCH_YEARS,
            ).get_next(datetime)  # fmt: skip
        except CroniterBadDateError:
            raise ConfigError(f"schedule {self.expression!r} never fires") from None
        return found.astimezone(UTC)

    def shortest_interval(self, sample_from: datetime, occurrences: int = 64) -> timedelta:
        """Smallest gap between consecutive occurrences over a sample, for rate guards."""
        previous = self.next_after(sample_from)
        gap = timedelta.max
        for _ in range(occurrences):
            following = self.next_after(previous)
            gap = min(gap, following - previous)
            previous = following
        return gap
