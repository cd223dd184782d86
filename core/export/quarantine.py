"""Non-deliverable addresses: Campaign's quarantine rules over engagement events.

    hard error (hard bounce, rejection, dead push token)  -> Quarantine at once
    soft error (soft bounce, delivery failure)            -> counted when at least 24 h after
        the last counted one (the count restarts when that one is over 10 days old);
        Quarantine at the threshold (default 5), With errors below it
    spam complaint                                         -> On denylist
    delivered, while With errors                           -> Valid again (count cleared)
    Quarantine and On denylist never lift by themselves.

States live in blob shards by address hash, `exportstate/quarantine/v1/{channel}/{shard}.json.gz`
(JSON: sha256 of the address -> state), read and written whole with ETag conditions: a
window touches thousands of addresses, and a few dozen shard reads beat thousands of
point reads. No raw address is kept (the export takes it from the window's events).
`applied_window` makes applying a window's events idempotent: a retried export finds
them applied and reports what the first attempt reported.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel

from core.errors import ConcurrencyConflict
from core.events.model import EventType, from_epoch_millis
from core.storage import Storage
from core.suppression import Channel, Reason, mask

SIGNIFICANT_GAP = timedelta(hours=24)
COUNT_RESET_AFTER = timedelta(days=10)
_PARALLEL_IO = 8
_CONTENDED_ATTEMPTS = 5
_SHARDS = 64
STATE_CONTAINER = "exportstate"


def shard_of(key: str) -> int:
    return int(key[:4], 16) % _SHARDS


class AddressStatus(StrEnum):
    VALID = "Valid"
    WITH_ERRORS = "With errors"
    QUARANTINE = "Quarantine"
    ON_DENYLIST = "On denylist"


_HARD = {
    ("email", EventType.BOUNCED_HARD), ("push", EventType.BOUNCED_HARD),
    ("sms", EventType.REJECTED), ("whatsapp", EventType.REJECTED), ("rcs", EventType.REJECTED),
}  # fmt: skip
_SOFT = {
    ("email", EventType.BOUNCED_SOFT), ("sms", EventType.DELIVERY_FAILED),
    ("whatsapp", EventType.DELIVERY_FAILED), ("rcs", EventType.DELIVERY_FAILED),
    ("push", EventType.DELIVERY_FAILED),
}  # fmt: skip
ADDRESS_EVENT_TYPES = frozenset(
    {kind for _, kind in _HARD | _SOFT} | {EventType.SPAM_COMPLAINT, EventType.DELIVERED}
)
"""The only event types `relevant` can find an address in."""
ADDRESS_FIELDS = {
    "email": "email",
    "sms": "phone",
    "whatsapp": "phone",
    "rcs": "phone",
    "push": "push_token",
}


_SUPPRESSION_CHANNEL = {
    "email": Channel.EMAIL, "sms": Channel.PHONE, "whatsapp": Channel.PHONE, "rcs": Channel.PHONE,
}  # fmt: skip


class AddressState(BaseModel):
    channel: str
    key: str
    """sha256 of the normalised address."""
    status: AddressStatus = AddressStatus.VALID
    failure_type: str | None = None
    failure_reason: str | None = None
    error_count: int = 0
    first_error_at: datetime | None = None
    last_error_at: datetime | None = None
    last_counted_at: datetime | None = None
    hint: str = ""
    applied_window: datetime | None = None
    # What the export of `applied_window` reported, so that a retried export of that window
    # reports the very same record (the state has moved on by then):
    status_before: AddressStatus | None = None
    """The status before `applied_window`'s events."""
    window_event_id: str | None = None
    """The latest of the window's events for this address."""
    window_event_at: datetime | None = None
    external_id: str | None = None
    """The profile id the window's events named (for the record's identityMap)."""


@dataclass(slots=True)
class AddressEvent:
    """What the rules need of one event; the address is kept for the export row only."""

    at: datetime
    event_id: str
    kind: str
    reason: str | None
    external_id: str | None


@dataclass
class TouchedAddress:
    channel: str
    address: str
    events: list[AddressEvent] = field(default_factory=list)

    @property
    def key(self) -> str:
        return address_key(self.address)


def address_key(address: str) -> str:
    return hashlib.sha256(address.encode()).hexdigest()


def relevant(event: dict[str, Any]) -> tuple[str, str] | None:
    """(channel, address) if the event can change an address's state (delivered only
    matters for addresses With errors: the caller checks that)."""
    channel, kind = event["channel"], event["type"]
    pair = (channel, kind)
    field_name = ADDRESS_FIELDS.get(channel)
    if field_name is None:
        return None
    if pair in _HARD or pair in _SOFT or kind in (EventType.SPAM_COMPLAINT, EventType.DELIVERED):
        address = event.get(field_name)
        if isinstance(address, str) and address:
            return channel, address.strip().lower() if channel == "email" else address.strip()
    return None


def with_errors_key(channel: str, key: str) -> str:
    """How `delivery_matters` names an address With errors: `{channel}|{address key}`."""
    return f"{channel}|{key}"


def delivery_matters(event: dict[str, Any], with_errors: frozenset[str]) -> bool:
    """Whether a delivery changes a state: only that of an address With errors."""
    found = relevant(event)
    return found is not None and with_errors_key(found[0], address_key(found[1])) in with_errors


def apply_event(state: AddressState, event: AddressEvent, channel: str, threshold: int) -> None:
    """One event through the rules (events of an address come in time order)."""
    pair = (channel, event.kind)
    if event.kind == EventType.DELIVERED:
        if state.status == AddressStatus.WITH_ERRORS:
            state.status, state.error_count, state.last_counted_at = AddressStatus.VALID, 0, None
        return
    if event.kind == EventType.SPAM_COMPLAINT:
        state.status = AddressStatus.ON_DENYLIST
        state.failure_type, state.failure_reason = "ignored", "spam complaint"
        return
    state.first_error_at = state.first_error_at or event.at
    state.last_error_at = event.at
    state.failure_reason = (event.reason or event.kind)[:500]
    if pair in _HARD:
        state.error_count += 1
        state.failure_type = "hard"
        if state.status != AddressStatus.ON_DENYLIST:
            state.status = AddressStatus.QUARANTINE
        return
    state.failure_type = state.failure_type if state.status == AddressStatus.QUARANTINE else "soft"
    last = state.last_counted_at
    if last is not None and event.at - last < SIGNIFICANT_GAP:
        return  # within 24 h of the last counted error: not significant
    if last is not None and event.at - last > COUNT_RESET_AFTER:
        state.error_count = 0
    state.error_count += 1
    state.last_counted_at = event.at
    if state.status in (AddressStatus.VALID, AddressStatus.WITH_ERRORS):
        state.status = (
            AddressStatus.QUARANTINE
            if state.error_count >= threshold
            else AddressStatus.WITH_ERRORS
        )


class QuarantineBook:
    """Address states in blob shards, updated window by window."""

    def __init__(self, storage: Storage, threshold: int) -> None:
        self.blobs = storage.blobs
        self.threshold = threshold

    @staticmethod
    def shard_name(channel: str, shard: int) -> str:
        return f"quarantine/v1/{channel}/{shard:02d}.json.gz"

    def _read(self, name: str) -> tuple[dict[str, dict[str, Any]], str | None]:
        found = self.blobs.read_versioned(STATE_CONTAINER, name)
        if found is None:
            return {}, None
        rows: dict[str, dict[str, Any]] = orjson.loads(gzip.decompress(found[0]))
        return rows, found[1]

    def _existing_shards(self) -> list[str]:
        return [ref.name for ref in self.blobs.list(STATE_CONTAINER, "quarantine/v1/")]

    def suppressed(self) -> dict[Channel, dict[str, Reason]]:
        """Address hashes in Quarantine or On denylist, as a suppression list keys them
        (e-mail under email; SMS, WhatsApp and RCS numbers under phone)."""
        found: dict[Channel, dict[str, Reason]] = {Channel.EMAIL: {}, Channel.PHONE: {}}
        by_status = {
            AddressStatus.QUARANTINE.value: Reason.QUARANTINED,
            AddressStatus.ON_DENYLIST.value: Reason.DENYLISTED,
        }
        with ThreadPoolExecutor(_PARALLEL_IO) as pool:
            for rows, _ in pool.map(self._read, self._existing_shards()):
                for key, row in rows.items():
                    reason = by_status.get(row["status"])
                    channel = _SUPPRESSION_CHANNEL.get(row["channel"])
                    if reason is not None and channel is not None:
                        found[channel].setdefault(key, reason)
        return found

    def with_errors(self, window_start: datetime) -> frozenset[str]:
        """Every address With errors before the window (a delivery clears those), also when
        an earlier attempt at this window applied it already, named by `with_errors_key`."""
        window = window_start.isoformat().replace("+00:00", "Z")
        errors = AddressStatus.WITH_ERRORS.value
        found: set[str] = set()
        with ThreadPoolExecutor(_PARALLEL_IO) as pool:
            for rows, _ in pool.map(self._read, self._existing_shards()):
                found.update(
                    with_errors_key(row["channel"], key)
                    for key, row in rows.items()
                    if row["status"] == errors
                    or (row.get("applied_window") == window and row.get("status_before") == errors)
                )
        return frozenset(found)

    def apply_window(
        self, window_start: datetime, touched: Iterable[TouchedAddress]
    ) -> Iterator[tuple[TouchedAddress, AddressState]]:
        """Apply each address's events of the window once; yields the states after the
        window in (channel, shard, address key) order, a shard at a time."""
        groups: dict[tuple[str, int], list[TouchedAddress]] = {}
        for item in touched:
            groups.setdefault((item.channel, shard_of(item.key)), []).append(item)
        ordered = sorted(groups.items())
        with ThreadPoolExecutor(_PARALLEL_IO) as pool:
            for results in pool.map(lambda group: self._apply_shard(window_start, *group), ordered):
                yield from sorted(results, key=lambda pair: pair[0].key)

    def _apply_shard(
        self, window_start: datetime, shard: tuple[str, int], items: list[TouchedAddress]
    ) -> list[tuple[TouchedAddress, AddressState]]:
        name = self.shard_name(*shard)
        for _ in range(_CONTENDED_ATTEMPTS):
            rows, etag = self._read(name)
            results: list[tuple[TouchedAddress, AddressState]] = []
            changed = False
            for item in items:
                found = rows.get(item.key)
                current = AddressState.model_validate(found) if found else None
                state, new = self._state_after(shard[0], item, current, window_start)
                if state is not None:
                    results.append((item, state))
                if state is not None and new:
                    rows[item.key] = state.model_dump(mode="json", exclude_none=True)
                    changed = True
            if not changed:
                return results
            try:
                self.blobs.write_versioned(
                    STATE_CONTAINER, name, gzip.compress(orjson.dumps(rows), mtime=0), etag
                )
                return results
            except ConcurrencyConflict:
                continue  # only one export runs at a time; a stale lease holder lost here
        raise ConcurrencyConflict(f"quarantine shard {name} still contended")

    def _state_after(
        self,
        channel: str,
        item: TouchedAddress,
        current: AddressState | None,
        window_start: datetime,
    ) -> tuple[AddressState | None, bool]:
        """The state after the window's events, and whether it is new (to be written)."""
        applied = current.applied_window if current else None
        if current is not None and applied is not None and applied >= window_start:
            return current, False  # applied by an earlier attempt at this window
        before = current.model_dump() if current else None
        state = (
            current.model_copy()
            if current
            else AddressState(channel=channel, key=item.key, hint=mask(item.address))
        )
        for event in sorted(item.events, key=lambda e: (e.at, e.event_id)):
            apply_event(state, event, channel, self.threshold)
        if current is None and state.status == AddressStatus.VALID and state.error_count == 0:
            return None, False  # only deliveries to an address never seen failing
        if before is not None and state.model_dump() == before:
            return None, False
        last = max(item.events, key=lambda e: (e.at, e.event_id))
        state.applied_window = window_start
        state.status_before = current.status if current else AddressStatus.VALID
        state.window_event_id, state.window_event_at = last.event_id, last.at
        state.external_id = next(
            (e.external_id for e in sorted(item.events, key=lambda e: (e.at, e.event_id))
             if e.external_id), None,
        )  # fmt: skip
        return state, True


def address_event(event: dict[str, Any]) -> AddressEvent:
    return AddressEvent(
        at=from_epoch_millis(event["occurred_at"]),
        event_id=event["event_id"],
        kind=event["type"],
        reason=event.get("bounce_reason") or (event.get("raw") or {}).get("error"),
        external_id=event.get("external_id"),
    )
