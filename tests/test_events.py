"""Engagement event model, event store (Azurite) and the suppression effects of events."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from core.currents.mapping import KNOWN_TYPES, event_type_from_schema, kind_of, to_event
from core.events.effects import SuppressionBatch, suppression_change
from core.events.model import EngagementEvent, EventChannel, EventType, epoch_millis
from core.events.store import EventStore, hour_key
from core.suppression import Channel, Reason, SuppressionList
from devhost.fakes.currents import EVENT_TYPES, record_for, schema_for

pytestmark = pytest.mark.integration


def _stored(kind: str = "users.messages.email.Open", number: int = 0, **values: object) -> dict:
    record = record_for(kind, number, int(time.time()), salt=uuid.uuid4().hex, **values)
    return to_event(record, kind, kind_of(kind))


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_generated_type_maps_to_a_valid_canonical_event(event_type: str) -> None:
    stored = _stored(event_type, 7)
    event = EngagementEvent.model_validate(stored)
    assert event.event_id.startswith("braze:") and event.source == "braze_currents"
    assert event.type is KNOWN_TYPES[event_type].type
    assert event.stored() == stored  # the fast path writes exactly the model's stored form
    assert event_type_from_schema(schema_for(event_type)) == event_type


def test_mapping_keeps_unknown_fields_raw_and_channels_from_subscriptions() -> None:
    click = _stored("users.messages.email.Click", suspected_bot_click_reason=["ua"], new_field=1)
    assert click["url"] == "https://example.com/offer"
    assert click["raw"]["suspected_bot_click_reason"] == ["ua"] and click["raw"]["new_field"] == 1
    change = _stored(
        "users.behaviors.subscription.GlobalStateChange",
        channel="sms",
        channel_identifier="+31612345678",
    )
    assert change["channel"] == "sms" and change["phone"] == "+31612345678"
    unknown = to_event(
        record_for("users.campaigns.Conversion", 1, 1_700_000_000),
        "users.campaigns.Conversion",
        kind_of("users.campaigns.Conversion"),
    )
    assert unknown["type"] == "other" and kind_of("users.campaigns.Conversion").generic


def test_suppression_changes_follow_event_time_not_arrival_order(storage) -> None:  # type: ignore[no-untyped-def]
    address = f"{uuid.uuid4().hex[:10]}@Example.com"
    base = 1_800_000_000

    def event(kind: str, at: int, **values: object) -> dict:
        record = record_for(kind, 1, at, salt=uuid.uuid4().hex, email_address=address, **values)
        return to_event(record, kind, kind_of(kind))

    resubscribe = event(
        "users.behaviors.subscription.GlobalStateChange",
        base + 60,
        subscription_status="Subscribed",
        channel="email",
    )
    unsubscribe = event("users.messages.email.Unsubscribe", base)
    bounce = event("users.messages.email.Bounce", base - 60)
    change = suppression_change(resubscribe)
    assert change is not None and change.address == address.lower() and not change.active

    suppressions = SuppressionList(storage)
    for arriving in ([resubscribe], [unsubscribe, bounce]):  # newest first
        batch = SuppressionBatch()
        for item in arriving:
            batch.offer(item)
        batch.apply(suppressions)
    # The later re-subscribe wins over the older unsubscribe; it never lifts a hard bounce.
    assert suppressions.reasons(Channel.EMAIL, address.lower()) == [Reason.HARD_BOUNCE]
    # Applying the same events again changes nothing.
    again = SuppressionBatch()
    for item in (unsubscribe, resubscribe, bounce):
        again.offer(item)
    assert again.apply(suppressions) == 0
    assert suppressions.reasons(Channel.EMAIL, address.lower()) == [Reason.HARD_BOUNCE]


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def _far_hour() -> datetime:
    """A unique hour far from now, so tests sealing hours never touch real ones."""
    offset = uuid.uuid4().int % 200_000
    return datetime(2040, 1, 1, tzinfo=UTC) + timedelta(hours=offset)


def test_store_dedups_on_event_id_across_segments_and_within_one(storage) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(_far_hour())
    store = EventStore(storage, clock=clock)
    first, second = _stored(number=1), _stored(number=2)
    writer = store.writer("test", f"seg-{uuid.uuid4().hex}")
    assert writer.add(first) and writer.add(second)
    writer.add(first)  # a repeat inside the segment: dropped when placed
    placed = writer.place()
    assert placed.hour == hour_key(clock.now) and placed.stats.stored == 2
    assert placed.stats.duplicates_in_segment == 1

    other = store.writer("test", f"seg-{uuid.uuid4().hex}")
    assert not other.add(second)  # owned by the first segment
    assert other.place().hour is None  # nothing left: not placed at all

    # The same segment written again (a retry) keeps its own events and is placed once.
    again = store.writer("test", writer.segment_id)
    assert again.add(first) and again.add(second)
    replay = again.place()
    assert replay.already_placed and replay.hour == placed.hour
    window = list(store.read_window(clock.now, clock.now + timedelta(hours=1)))
    assert sorted(e.event_id for e in window) == sorted([first["event_id"], second["event_id"]])
    assert all(e.ingested_at is not None for e in window)


def test_concurrent_claims_keep_each_event_in_one_segment(storage) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(_far_hour())
    store = EventStore(storage, clock=clock)
    shared = _stored(number=3)
    a = store.writer("test", f"seg-{uuid.uuid4().hex}")
    b = store.writer("test", f"seg-{uuid.uuid4().hex}")
    assert a.add(shared) and b.add(shared)  # both saw it as new before either claimed
    a.add(_stored(number=4))
    b.add(_stored(number=5))
    assert a.place().stats.stored == 2
    lost = b.place()
    assert lost.stats.stored == 1 and lost.stats.duplicates_in_store == 1
    ids = [e.event_id for e in store.read_window(clock.now, clock.now + timedelta(hours=1))]
    assert ids.count(shared["event_id"]) == 1 and len(ids) == 3


def test_sealed_hours_get_no_new_segments(storage) -> None:  # type: ignore[no-untyped-def]
    start = _far_hour()
    clock = Clock(start + timedelta(minutes=59, seconds=59))
    store = EventStore(storage, clock=clock)
    store.seal(start, start + timedelta(hours=1))  # a reader read this hour already
    writer = store.writer("test", f"seg-{uuid.uuid4().hex}")
    writer.add(_stored(number=6))
    placed = writer.place()
    assert placed.hour == hour_key(start + timedelta(hours=1))
    assert list(store.read_window(start, start + timedelta(hours=1))) == []
    later = list(store.read_window(start + timedelta(hours=1), start + timedelta(hours=2)))
    assert len(later) == 1 and later[0].ingested_at == start + timedelta(hours=1)


def test_model_round_trips_through_the_stored_form() -> None:
    event = EngagementEvent(
        event_id="push:d1:abc",
        source="push",
        source_type="apns",
        type=EventType.SENT,
        channel=EventChannel.PUSH,
        occurred_at=datetime(2026, 11, 24, 10, 0, 1, 250000, tzinfo=UTC),
        push_token="tok",
    )
    stored = event.stored()
    assert stored["occurred_at"] == epoch_millis(event.occurred_at) and "raw" not in stored
    assert EngagementEvent.from_stored(stored) == event


def test_many_suppression_updates_in_batches_match_one_by_one(storage) -> None:  # type: ignore[no-untyped-def]
    from core.suppression import SuppressionUpdate

    tag = uuid.uuid4().hex[:8]
    at = datetime(2030, 1, 1, tzinfo=UTC)
    addresses = [f"{i}-{tag}@example.com" for i in range(230)]
    suppressions = SuppressionList(storage)
    # A third is known already: 40 lifted later than the batch, 37 suppressed earlier.
    for address in addresses[:40]:
        suppressions.apply(
            SuppressionUpdate(Channel.EMAIL, address, Reason.UNSUBSCRIBE, False, at, "setup")
        )
    for address in addresses[40:77]:
        suppressions.add(Channel.EMAIL, address, Reason.UNSUBSCRIBE, source="setup", at=at)
    earlier = at - timedelta(days=1)
    updates = [
        SuppressionUpdate(Channel.EMAIL, a, Reason.UNSUBSCRIBE, True, moment, "test")
        for i, a in enumerate(addresses)
        for moment in [(earlier if i < 40 else at) + timedelta(hours=1)]
    ]
    # 40 older than their lift: ignored; 37 already active: not a change; 153 new.
    assert suppressions.apply_many(updates) == 153
    assert suppressions.apply_many(updates) == 0
    assert suppressions.reasons(Channel.EMAIL, addresses[0]) == []
    assert suppressions.reasons(Channel.EMAIL, addresses[50]) == [Reason.UNSUBSCRIBE]
    assert suppressions.reasons(Channel.EMAIL, addresses[-1]) == [Reason.UNSUBSCRIBE]
