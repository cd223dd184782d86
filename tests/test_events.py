"""Engagement event model, event store (Azurite) and the suppression effects of events."""

from __future__ import annotations

import io
import time
import uuid
from datetime import UTC, datetime, timedelta

import fastavro
import pytest

from core.currents.mapping import KNOWN_TYPES, event_type_from_schema, kind_of, to_event
from core.events.effects import SuppressionBatch, suppression_change
from core.events.model import EngagementEvent, EventChannel, EventType, epoch_millis
from core.events.store import EventStore, hour_key
from core.suppression import Channel, Reason, SuppressionList
from devhost.fakes.currents import BRAND_NUMBER, EVENT_TYPES, avro_bytes, record_for, schema_for

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


def _through_avro(kind: str, record: dict) -> dict:
    """A record as Braze's writer schema carries it: written and read back as Avro."""
    (read,) = fastavro.reader(io.BytesIO(avro_bytes(kind, [record])))
    return to_event(dict(read), kind, kind_of(kind))


# Which field holds the person's number, by family (currents-avro-fields.md, addendum).
_PERSON_PHONE = {"InboundReceive": "user_phone_number", "ShortLinkClick": "user_phone_number"}
_PHONE_TYPES = [
    kind for kind in EVENT_TYPES
    if any("phone_number" in f["name"] for f in schema_for(kind)["fields"])
]  # fmt: skip


@pytest.mark.parametrize("kind", _PHONE_TYPES)
def test_the_event_phone_is_the_person_never_the_brand(kind: str) -> None:
    person = f"+316{uuid.uuid4().int % 10**8:08d}"
    name = kind.rpartition(".")[2]
    field = _PERSON_PHONE.get(name) or (
        "user_phone_number" if name == "Click" else
        "phone_number" if "subscription" in kind else "to_phone_number"
    )  # fmt: skip
    record = record_for(kind, 3, 1_800_000_000, salt=uuid.uuid4().hex, **{field: person})
    event = _through_avro(kind, record)
    assert event["phone"] == person
    assert BRAND_NUMBER not in (event.get("phone"), event.get("email"))
    if "inbound_phone_number" in record:
        assert event["raw"]["inbound_phone_number"] == BRAND_NUMBER  # kept, as the brand's


def test_inbound_keywords_change_the_person_number_and_nothing_else() -> None:
    person = f"+316{uuid.uuid4().int % 10**8:08d}"
    for channel in ("sms", "whatsapp", "rcs"):
        kind = f"users.messages.{channel}.InboundReceive"
        for action, active in (("Unsubscribed", True), ("subscribed", False)):
            event = _stored(kind, user_phone_number=person, action=action)
            change = suppression_change(event)
            assert change is not None and change.channel is Channel.PHONE
            assert (change.address, change.reason, change.active) == (
                person,
                Reason.UNSUBSCRIBE,
                active,
            )
        for action in ("None", None):
            assert (
                suppression_change(_stored(kind, user_phone_number=person, action=action)) is None
            )


@pytest.mark.parametrize(
    "kind",
    ["users.messages.pushnotification.TokenStateChange",
     "users.behaviors.pushnotification.TokenStateChange"],
)  # fmt: skip
def test_millisecond_times_are_kept(kind: str) -> None:
    seconds = 1_800_000_000
    written = "users.messages.pushnotification.TokenStateChange"  # the writer schema's name
    record = record_for(written, 1, seconds, salt=uuid.uuid4().hex, time_ms=seconds * 1000 + 457)
    (read,) = fastavro.reader(io.BytesIO(avro_bytes(written, [record])))
    event = to_event(dict(read), kind, kind_of(kind))
    assert event["occurred_at"] == seconds * 1000 + 457 and "time_ms" not in event.get("raw", {})
    assert EngagementEvent.model_validate(event).occurred_at.microsecond == 457_000
    # A time_ms that is not the same second as `time` is not trusted over it; it is kept.
    record["time_ms"] = (seconds + 3600) * 1000
    event = to_event(record, kind, kind_of(kind))
    assert event["occurred_at"] == seconds * 1000 and event["raw"]["time_ms"] == record["time_ms"]


def _tie(address: str, phone: bool, at: int) -> tuple[dict, dict]:
    """A suppressing event and a lifting one at the same second, for the same address."""
    salt = uuid.uuid4().hex
    change = "users.behaviors.subscription.GlobalStateChange"
    if phone:
        inbound = "users.messages.sms.InboundReceive"
        stop = record_for(
            inbound, 1, at, salt=salt, user_phone_number=address, action="Unsubscribed"
        )
        lift = record_for(change, 2, at, salt=salt, channel="sms", channel_identifier=address,
                          subscription_status="Subscribed")  # fmt: skip
        return to_event(stop, inbound, kind_of(inbound)), to_event(lift, change, kind_of(change))
    unsubscribe = "users.messages.email.Unsubscribe"
    stop = record_for(unsubscribe, 1, at, salt=salt, email_address=address)
    lift = record_for(change, 2, at, salt=salt, email_address=address, channel="email",
                      subscription_status="Subscribed")  # fmt: skip
    return to_event(stop, unsubscribe, kind_of(unsubscribe)), to_event(
        lift, change, kind_of(change)
    )


@pytest.mark.parametrize("phone", [False, True], ids=["email", "phone"])
def test_simultaneous_changes_end_suppressed_in_any_order(storage, phone: bool) -> None:  # type: ignore[no-untyped-def]
    suppressions = SuppressionList(storage)
    channel = Channel.PHONE if phone else Channel.EMAIL
    for together in (True, False):  # in one file, or in two files one after the other
        for reverse in (False, True):
            tag = uuid.uuid4()
            address = f"+316{tag.int % 10**8:08d}" if phone else f"tie-{tag.hex[:10]}@example.com"
            stop, lift = _tie(address, phone, 1_800_000_000)
            events = [lift, stop] if reverse else [stop, lift]
            for events_of_batch in [events] if together else [[e] for e in events]:
                batch = SuppressionBatch()
                for event in events_of_batch:
                    batch.offer(event)
                batch.apply(suppressions)
            assert suppressions.reasons(channel, address) == [Reason.UNSUBSCRIBE]
            # A lift one millisecond later does lift it.
            later = suppression_change({**lift, "occurred_at": lift["occurred_at"] + 1})
            assert later is not None and suppressions.apply(later)
            assert suppressions.reasons(channel, address) == []


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
