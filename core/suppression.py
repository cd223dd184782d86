"""The suppression list: addresses that must never be messaged, with why and since when.

Table `suppressions`: PartitionKey is the channel (`email`, `phone`), RowKey is
`{sha256 of the normalised address}:{reason}`. Addresses are stored only as hashes plus a
masked hint, so the table carries no raw personal data. One row per reason lets a
re-subscribe lift an unsubscribe without lifting a hard bounce on the same address.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from core.storage import Storage
from core.storage.tables import EntityTable, TableEntity
from core.sync.mapping import RowRejected, normalise_email, normalise_phone


class Channel(StrEnum):
    EMAIL = "email"
    PHONE = "phone"


class Reason(StrEnum):
    HARD_BOUNCE = "hard_bounce"
    UNSUBSCRIBE = "unsubscribe"
    SPAM_COMPLAINT = "spam_complaint"
    MANUAL_BLOCKLIST = "manual_blocklist"


class Suppression(TableEntity):
    table_name: ClassVar[str] = "suppressions"

    reason: Reason
    source: str
    hint: str
    suppressed_at: datetime
    active: bool = True
    """False once lifted; the row stays so that older changes cannot undo the lift."""
    changed_at: datetime | None = None
    """Time of the change this row reflects (an event's own time, or the operator's)."""

    def as_of(self) -> datetime:
        return self.changed_at or self.suppressed_at


def address_hash(address: str) -> str:
    return hashlib.sha256(address.encode()).hexdigest()


def mask(address: str) -> str:
    """`a***@example.com` / `+31******78`: enough for an operator, not a contact."""
    if "@" in address:
        local, _, domain = address.partition("@")
        return f"{local[:1]}***@{domain}"
    return f"{address[:3]}{'*' * max(0, len(address) - 5)}{address[-2:]}"


class SuppressionChange(BaseModel):
    """An operator's request: one address, one channel, one reason."""

    model_config = ConfigDict(extra="forbid")

    channel: Channel
    address: str = Field(min_length=3, max_length=320)
    reason: Reason = Reason.MANUAL_BLOCKLIST
    note: str = Field(default="", max_length=200)

    def normalised(self) -> str:
        """The address as rows are matched against it; ValueError if it is not one."""
        normalise = normalise_email if self.channel == Channel.EMAIL else normalise_phone
        try:
            return normalise(self.address)
        except RowRejected as exc:
            raise ValueError(f"address: {exc}") from None


def apply_operator_change(
    storage: Storage, change: SuppressionChange, *, add: bool
) -> dict[str, object]:
    """Add or lift one suppression; the answer shows the address masked, never in clear."""
    address = change.normalised()
    suppressions = SuppressionList(storage)
    if add:
        source = f"operator: {change.note}" if change.note else "operator"
        suppressions.add(change.channel, address, change.reason, source=source)
    else:
        suppressions.remove(change.channel, address, change.reason)
    return {
        "channel": change.channel.value,
        "address": mask(address),
        "reasons": [r.value for r in suppressions.reasons(change.channel, address)],
    }


def lookup(storage: Storage, change: SuppressionChange) -> dict[str, object]:
    address = change.normalised()
    reasons = SuppressionList(storage).reasons(change.channel, address)
    return {
        "channel": change.channel.value,
        "address": mask(address),
        "suppressed": bool(reasons),
        "reasons": [r.value for r in reasons],
    }


@dataclass(frozen=True)
class SuppressionSnapshot:
    """Hashes of suppressed addresses per channel with their first reason, for one run."""

    by_channel: dict[Channel, dict[str, Reason]]

    @property
    def empty(self) -> bool:
        return not any(self.by_channel.values())

    def reason_for(self, channel: Channel, address: str | None) -> Reason | None:
        if not address:
            return None
        return self.by_channel.get(channel, {}).get(address_hash(address))


class SuppressionList:
    def __init__(self, storage: Storage) -> None:
        self._table: EntityTable[Suppression] = storage.tables.get(Suppression)

    def add(
        self,
        channel: Channel,
        address: str,
        reason: Reason,
        *,
        source: str,
        at: datetime | None = None,
    ) -> bool:
        return self.apply(channel, address, reason, active=True, source=source, at=at)

    def remove(
        self, channel: Channel, address: str, reason: Reason, *, source: str = "operator"
    ) -> bool:
        return self.apply(channel, address, reason, active=False, source=source)

    def apply(
        self,
        channel: Channel,
        address: str,
        reason: Reason,
        *,
        active: bool,
        source: str,
        at: datetime | None = None,
    ) -> bool:
        """Suppress (`active`) or lift one reason for an address as of `at`.

        The latest change wins by its own time, not by when it is applied: a lift is kept
        as an inactive row, so an older suppression arriving later does not resurrect it.
        Applying the same change twice changes nothing. Returns whether the row changed.
        """
        moment = at or datetime.now(UTC)
        changed = False

        def change(current: Suppression | None) -> Suppression | None:
            nonlocal changed
            changed = False
            if current is not None and current.as_of() >= moment:
                return None
            # A lift of an unknown address is still kept: an older suppression may follow.
            changed = (current.active if current else False) != active
            since = current.suppressed_at if current and current.active and active else moment
            return Suppression(
                partition_key=channel.value,
                row_key=f"{address_hash(address)}:{reason.value}",
                reason=reason,
                source=source,
                hint=mask(address),
                suppressed_at=since,
                active=active,
                changed_at=moment,
            )

        self._table.mutate(channel.value, f"{address_hash(address)}:{reason.value}", change)
        return changed

    def reasons(self, channel: Channel, address: str) -> list[Reason]:
        prefix = address_hash(address)
        rows = self._table.query_partition(
            channel.value, row_from=f"{prefix}:", row_before=f"{prefix};"
        )
        return [row.reason for row in rows if row.active]

    def snapshot(self) -> SuppressionSnapshot:
        by_channel: dict[Channel, dict[str, Reason]] = {}
        for channel in Channel:
            hashes: dict[str, Reason] = {}
            for row in self._table.query_partition(channel.value):
                if row.active:
                    hashes.setdefault(row.row_key.partition(":")[0], row.reason)
            by_channel[channel] = hashes
        return SuppressionSnapshot(by_channel)
