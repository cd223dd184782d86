"""The suppression list: addresses that must never be messaged, with why and since when.

Table `suppressions`: PartitionKey is the channel (`email`, `phone`), RowKey is
`{sha256 of the normalised address}:{reason}`. Addresses are stored only as hashes plus a
masked hint, so the table carries no raw personal data. One row per reason lets a
re-subscribe lift an unsubscribe without lifting a hard bounce on the same address.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from core.errors import ConcurrencyConflict, EntityExists
from core.storage import Storage
from core.storage.tables import MAX_BATCH_OPERATIONS, EntityTable, TableEntity
from core.sync.mapping import RowRejected, normalise_email, normalise_phone


class Channel(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    PUSH = "push"
    """Keyed by profile id: no pushes to that profile on any device."""


class Reason(StrEnum):
    HARD_BOUNCE = "hard_bounce"
    UNSUBSCRIBE = "unsubscribe"
    SPAM_COMPLAINT = "spam_complaint"
    MANUAL_BLOCKLIST = "manual_blocklist"
    QUARANTINED = "quarantined"
    """Campaign's quarantine (log export): only for destinations that honour it."""
    DENYLISTED = "denylisted"


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
        if self.channel == Channel.PUSH:
            return self.address.strip()
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

    def merged(self, other: dict[Channel, dict[str, Reason]]) -> SuppressionSnapshot:
        """This list plus `other`'s hashes (a reason here wins)."""
        by_channel = {channel: dict(hashes) for channel, hashes in self.by_channel.items()}
        for channel, hashes in other.items():
            into = by_channel.setdefault(channel, {})
            for key, reason in hashes.items():
                into.setdefault(key, reason)
        return SuppressionSnapshot(by_channel)

    def reason_for(self, channel: Channel, address: str | None) -> Reason | None:
        if not address:
            return None
        return self.by_channel.get(channel, {}).get(address_hash(address))


@dataclass(frozen=True)
class SuppressionUpdate:
    """Suppress (`active`) or lift one reason for one address, as of `at`."""

    channel: Channel
    address: str
    """Normalised (lower-case email, E.164 phone)."""
    reason: Reason
    active: bool
    at: datetime
    source: str

    @property
    def row_key(self) -> str:
        return f"{address_hash(self.address)}:{self.reason.value}"

    def supersedes(self, at: datetime, active: bool) -> bool:
        """Whether this update wins over a change made `at` (suppressing if `active`):
        the later one wins; at the same time, suppressing wins over lifting, so that the
        order two simultaneous changes arrive in never lifts a suppression."""
        return self.at > at or (self.at == at and self.active and not active)

    def applied_to(self, current: Suppression | None) -> Suppression | None:
        """The row after this update, or None if it changes nothing.

        The latest change wins by its own time, not by when it is applied (and of two at
        the same time, the suppression): a lift is kept as an inactive row, so an older
        suppression arriving later does not resurrect it, and applying the same update
        twice changes nothing.
        """
        if current is not None and not self.supersedes(current.as_of(), current.active):
            return None
        keep_since = current is not None and current.active and self.active
        return Suppression(
            partition_key=self.channel.value,
            row_key=self.row_key,
            reason=self.reason,
            source=self.source,
            hint=mask(self.address),
            suppressed_at=current.suppressed_at if current and keep_since else self.at,
            active=self.active,
            changed_at=self.at,
        )


_PARALLEL_CHUNKS = 4


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
        update = SuppressionUpdate(channel, address, reason, True, at or datetime.now(UTC), source)
        return self.apply(update)

    def remove(
        self, channel: Channel, address: str, reason: Reason, *, source: str = "operator"
    ) -> bool:
        return self.apply(
            SuppressionUpdate(channel, address, reason, False, datetime.now(UTC), source)
        )

    def apply(self, update: SuppressionUpdate) -> bool:
        """One update as a guarded read-modify-write; whether suppression state changed."""
        changed = False

        def change(current: Suppression | None) -> Suppression | None:
            nonlocal changed
            updated = update.applied_to(current)
            changed = updated is not None and (current.active if current else False) != (
                updated.active
            )
            return updated

        self._table.mutate(update.channel.value, update.row_key, change)
        return changed

    def apply_many(self, updates: list[SuppressionUpdate]) -> int:
        """Many updates (at most one per address and reason): rows read by parallel point
        reads and written in transactions of up to 100; a transaction that loses a race is
        redone update by update. Returns how many changed suppression state."""
        chunks = [
            updates_of_channel[i : i + MAX_BATCH_OPERATIONS]
            for channel in Channel
            if (updates_of_channel := [u for u in updates if u.channel == channel])
            for i in range(0, len(updates_of_channel), MAX_BATCH_OPERATIONS)
        ]
        with ThreadPoolExecutor(_PARALLEL_CHUNKS) as pool:
            return sum(pool.map(self._apply_chunk, chunks))

    def _apply_chunk(self, updates: list[SuppressionUpdate]) -> int:
        partition = updates[0].channel.value
        current = self._table.get_many(partition, [u.row_key for u in updates])
        operations: list[tuple[str, Suppression, str | None]] = []
        changed = 0
        for update in updates:
            found = current.get(update.row_key)
            updated = update.applied_to(found.entity if found else None)
            if updated is None:
                continue
            was_active = found.entity.active if found else False
            changed += was_active != updated.active
            operations.append(
                ("replace", updated, found.etag) if found else ("create", updated, None)
            )
        if not operations:
            return 0
        try:
            self._table.transact(operations)
        except (ConcurrencyConflict, EntityExists):
            return sum(self.apply(update) for update in updates)
        return changed

    def reasons(self, channel: Channel, address: str) -> list[Reason]:
        prefix = address_hash(address)
        rows = self._table.query_partition(
            channel.value, row_from=f"{prefix}:", row_before=f"{prefix};"
        )
        return [row.reason for row in rows if row.active]

    def snapshot(self, channels: tuple[Channel, ...] = tuple(Channel)) -> SuppressionSnapshot:
        by_channel: dict[Channel, dict[str, Reason]] = {}
        for channel in channels:
            hashes: dict[str, Reason] = {}
            for row in self._table.query_partition(channel.value):
                if row.active:
                    hashes.setdefault(row.row_key.partition(":")[0], row.reason)
            by_channel[channel] = hashes
        return SuppressionSnapshot(by_channel)
