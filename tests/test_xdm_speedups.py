"""The log export's C speedups write exactly the reference's bytes (core/export/xdm.py).

Every Currents event type, hand-made edge cases and seeded random events go through both
paths; the outputs, offsets, counts and notable lines must be identical, and bad input must
fail the same way. The helpers (SHA-256, timestamps, SMTP codes) are compared one by one.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any

import orjson
import pytest

from core.currents.mapping import KNOWN_TYPES, kind_of, to_event
from core.events.model import EventType
from core.export import xdm
from core.export.quarantine import ADDRESS_EVENT_TYPES, address_key, with_errors_key
from core.export.xdm import (
    NotableEvents,
    SegmentLines,
    XdmOptions,
    failure_code,
    iso,
    segment_lines,
)
from devhost.fakes.currents import record_for

speedups = xdm.SPEEDUPS
OPTIONS = XdmOptions("switchboard", "crmId")
INGESTED = "2026-11-24T08:00:00.000Z"
WITH_ERRORS = frozenset(
    with_errors_key(channel, address_key(address))
    for channel, address in [
        ("email", "a@b.example"), ("email", "ümlaut@b.example"), ("sms", "+31600000000"),
        ("push", "token-1"), ("email", "e1"),
    ]
)  # fmt: skip
NOTABLE = NotableEvents(frozenset(ADDRESS_EVENT_TYPES - {EventType.DELIVERED}), WITH_ERRORS)
MOMENT = 1_764_000_000_123


def test_the_speedups_are_built() -> None:
    # `make test` builds them (native/); without them the export is several times slower.
    assert speedups is not None


def _both(
    data: bytes,
    max_events: int = 1_000,
    options: XdmOptions = OPTIONS,
    notable: NotableEvents = NOTABLE,
) -> SegmentLines:
    """Run through a segment in slices on both paths; they must agree at every step."""
    offset, merged = 0, None
    while offset < len(data) or merged is None:
        native = segment_lines(data, offset, max_events, INGESTED, options, notable)
        reference = segment_lines(
            data, offset, max_events, INGESTED, options, notable, native=False
        )
        assert native == reference
        merged = native if merged is None else _join(merged, native)
        if native.next_offset == offset:
            break
        offset = native.next_offset
    return merged


def _join(a: SegmentLines, b: SegmentLines) -> SegmentLines:
    return SegmentLines(
        b.next_offset, a.events + b.events, a.broadlog + b.broadlog,
        a.broadlog_count + b.broadlog_count, a.trackinglog + b.trackinglog,
        a.trackinglog_count + b.trackinglog_count, a.notable + b.notable,
    )  # fmt: skip


def _lines(*events: dict[str, Any]) -> bytes:
    return b"".join(orjson.dumps(event) + b"\n" for event in events)


def _event(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "braze:1", "source": "braze_currents", "source_type": "t",
        "type": "delivered", "channel": "email", "occurred_at": MOMENT,
    }  # fmt: skip
    base.update(fields)
    return {key: value for key, value in base.items() if value is not _ABSENT}


_ABSENT = object()


def test_every_currents_event_type_gives_the_same_records() -> None:
    events = []
    for number, event_type in enumerate(sorted(KNOWN_TYPES) * 3):
        record = record_for(event_type, number, MOMENT // 1000 + number)
        events.append(to_event(record, event_type, kind_of(event_type)))
    written = _both(_lines(*events), max_events=7)
    assert written.events == len(events)
    assert written.broadlog_count > 10 and written.trackinglog_count > 5
    records = [orjson.loads(line) for line in written.broadlog.splitlines()]
    assert records[0]["_id"] == hashlib.sha256(b"broadLog|" + records[0]["_experience"][
        "campaign"]["broadlogID"].encode()).hexdigest()  # fmt: skip


EDGE_CASES: list[dict[str, Any]] = [
    _event(email="a@b.example", external_id="CRM-1", dispatch_id="d", campaign_id="c"),
    _event(type="bounced_hard", bounce_reason="550 5.1.1 <a@b.example>: user unknown"),
    _event(type="bounced_soft", bounce_reason="  452 mailbox full"),
    _event(type="bounced_soft", bounce_reason="4.2.2x not a code, 421 neither"),
    _event(type="bounced_soft", bounce_reason="Relais refusé : 5.7.1 accès refusé"),
    _event(type="bounced_soft", bounce_reason="\u0665.\u0661.\u0661 Arabic-Indic digits"),
    _event(type="bounced_hard", bounce_reason="é" * 600 + " 5.1.1"),
    _event(type="bounced_hard", bounce_reason="x" * 499 + "é5.1.1"),
    _event(type="delivery_failed", channel="sms", phone="+31600000000", raw={"error": "E30"}),
    _event(type="delivery_failed", channel="push", raw={"error": ""}),
    _event(type="delivery_failed", channel="push", raw={"error": 30}),
    _event(type="delivery_failed", channel="push", raw={"error": None}),
    _event(type="delivery_failed", channel="push", raw=None),
    _event(type="rejected", channel="whatsapp", external_id="", email="", phone="+1"),
    _event(type="aborted", channel="in_app", canvas_id="cv", canvas_name="Canvas"),
    _event(type="sent", channel="new_channel", dispatch_id="", send_id="s"),
    _event(type="sent", dispatch_id="", send_id=""),
    _event(type="sent", campaign_name=None, canvas_name="n", external_id=None),
    _event(type="deferred", channel="email", email="x@y.example"),
    _event(type="dispatched", channel="webhook"),
    _event(type="opened", raw={"machine_open": "TRUE"}),
    _event(type="opened", raw={"machine_open": True}),
    _event(type="opened", raw={"machine_open": 1}),
    _event(type="opened", raw={"machine_open": None, "is_suspected_bot_click": True}),
    _event(type="opened", raw={"machine_open": "trüe"}),
    _event(type="opened", raw={"machine_open": 1.5}),
    _event(type="opened", raw={"is_suspected_bot_click": "true"}),
    _event(type="opened", channel="push"),
    _event(type="opened", channel="push", raw={"machine_open": "true"}),
    _event(type="clicked", url='https://example.com/?q="a"&b=\\c\u2028\u00e9\U0001f600'),
    _event(type="clicked", url="", raw={"is_suspected_bot_click": True}),
    _event(type="clicked", channel="sms", url="https://x.example"),
    _event(type="unsubscribed", email="u@v.example"),
    _event(type="spam_complaint", email="s@v.example"),
    _event(type="read", channel="whatsapp"),
    _event(type="subscription_changed", channel="none", subscription_status="Subscribed"),
    _event(event_id='braze:\u0000\u001f\t"\\/é😀', source="s\u007f", source_type=None),
    _event(occurred_at=0),
    _event(occurred_at=253_402_300_799_999),
    _event(occurred_at=True),
    _event(external_id=12, email="a@b.example"),
    _event(email=["a@b.example"]),
    _event(campaign_id=5),
    _event(dispatch_id=7),
    _event(channel="email", email="a@b.example", phone="+1", external_id="X"),
    _event(type="unknown_type", channel=None),
    _event(email=" A@B.example\x1c"),
    _event(email="Ümlaut@b.example"),
    _event(email="ümlaut@b.example "),
    _event(channel="sms", phone="+31600000000", email="a@b.example"),
    _event(channel="push", push_token="token-1"),
    _event(channel="push", push_token=" token-1"),
    _event(channel="push", push_token=5),
    _event(channel="whatsapp", phone=""),
    _event(channel="in_app", email="a@b.example"),
    _event(email="x" * 600),
    _event(type=None),
    _event(channel=None),
    _event(raw={"nested": {"deep": [1, 2, {"x": None}]}, "error": "E1"}, type="rejected"),
]


@pytest.mark.parametrize("namespace", ["crmId", "ECID", "Email"])
def test_edge_cases_give_the_same_records(namespace: str) -> None:
    written = _both(_lines(*EDGE_CASES), max_events=5, options=XdmOptions("acme", namespace))
    assert written.events == len(EDGE_CASES)


def test_deliveries_come_back_only_for_addresses_with_errors() -> None:
    data = _lines(*EDGE_CASES)
    everyone = NotableEvents(frozenset(ADDRESS_EVENT_TYPES))
    nobody = NotableEvents(frozenset(ADDRESS_EVENT_TYPES - {EventType.DELIVERED}))
    all_lines = _both(data, notable=everyone).notable
    none_lines = _both(data, notable=nobody).notable
    some_lines = _both(data).notable
    assert set(none_lines) < set(some_lines) < set(all_lines)
    delivered = [orjson.loads(line) for line in some_lines]
    field = {"email": "email", "sms": "phone", "push": "push_token"}
    addresses = {e[field[e["channel"]]] for e in delivered if e["type"] == "delivered"}
    assert {"a@b.example", " A@B.example\x1c", "ümlaut@b.example ", "+31600000000",
            "token-1", " token-1"} <= addresses  # fmt: skip
    assert "Ümlaut@b.example" in addresses  # (.lower() makes it ümlaut@b.example)


def test_json_text_as_other_writers_write_it() -> None:
    # Escapes, spacing and key order the store's own writer never produces.
    lines = [
        b'{ "event_id" : "braze:\\u0031\\ud83d\\ude00\\/", "source":"s", "source_type":"t",'
        b' "type":"\\u0073ent", "channel":"email", "occurred_at":1764000000123 }',
        b'{"event_id":"a","source":"s","source_type":"t","type":"opened","channel":"email",'
        b'"occurred_at":1764000000123,"raw":{"machine_open":"true"},"raw":{"x":1}}',
        b'{"occurred_at":-0,"channel":"email","type":"sent","source_type":"t","source":"s",'
        b'"event_id":"b"}\r',
        b'{"event_id":"c","source":"s","source_type":"t","type":"sent","channel":"email",'
        b'"occurred_at":1764000000123,"url":"x","url":null}',
        b"",
        b'{"event_id":"d","source":"s","source_type":"t","type":"sent","channel":"email",'
        b'"occurred_at":1764000000123}',
    ]
    written = _both(b"\n".join(lines) + b"\n   ", max_events=2)
    assert written.events == 5 and written.next_offset == len(b"\n".join(lines)) + 4


@pytest.mark.parametrize(
    "line",
    [
        b'{"event_id":"a","type":"sent"',
        b'{"event_id":"a","type":"sent"} x',
        b'{"event_id":"\\ud800","type":"sent","channel":"email"}',
        b'{"event_id":"\xff","type":"sent","channel":"email"}',
        b'{"event_id":"a\x01","type":"sent"}',
        b'{"event_id":01,"type":"sent"}',
        b"[1, 2]",
        b"   ",
        b'{"channel":"email"}',
        *(
            orjson.dumps(_event(occurred_at=moment))
            for moment in (253_402_300_800_000, 1_764_000_000_123.5, 2**63 - 1, -(10**18))
        ),
        orjson.dumps(_event(source=_ABSENT, type="opened")),
    ],
)
def test_bad_lines_fail_as_the_reference_fails(line: bytes) -> None:
    data = _lines(_event()) + line + b"\n"
    errors = []
    for native in (True, False):
        with pytest.raises(Exception) as raised:  # noqa: PT011 (whatever the reference raises)
            segment_lines(data, 0, 100, INGESTED, OPTIONS, NOTABLE, native=native)
        errors.append(type(raised.value))
    assert errors[0] is errors[1]


def test_random_events_give_the_same_records() -> None:
    rng = random.Random(24)
    texts = ["", "a", "CRM-1", "x@y.example", "é", "\u0000", '"', "\\", "😀", " 5.1.1 ", "550"]
    values: list[Any] = [*texts, None, 0, 1, True, False, 1.5, [], {}, {"error": "E"}]
    kinds = [str(kind) for kind in EventType] + ["other"]
    fields = [
        "external_id", "email", "phone", "campaign_id", "campaign_name", "canvas_id",
        "canvas_name", "send_id", "dispatch_id", "url", "bounce_reason", "raw",
    ]  # fmt: skip
    events = []
    for number in range(3_000):
        event = _event(
            event_id=f"e{number}{rng.choice(texts)}",
            type=rng.choice(kinds),
            channel=rng.choice(["email", "sms", "push", "whatsapp", "x"]),
            occurred_at=rng.choice([MOMENT, rng.randrange(0, 253_402_300_799_999)]),
        )
        for name in rng.sample(fields, rng.randrange(len(fields))):
            event[name] = rng.choice(values)
        if rng.random() < 0.3:
            event["raw"] = {
                key: rng.choice(values)
                for key in rng.sample(["error", "machine_open", "is_suspected_bot_click"], 2)
            }
        events.append(event)
    data = _lines(*events)
    # Random events may be ones the reference refuses (a raw that is not an object): keep
    # the ones it takes, then compare.
    kept = []
    for event in events:
        try:
            segment_lines(_lines(event), 0, 1, INGESTED, OPTIONS, NOTABLE, native=False)
        except (AttributeError, TypeError, ValueError):
            continue
        kept.append(event)
    assert len(kept) > 2_000
    data = _lines(*kept)
    written = _both(data, max_events=333)
    assert written.events == len(kept)


def test_sha256_matches_hashlib() -> None:
    rng = random.Random(1)
    for size in [*range(130), 1_000, 65_537]:
        data = rng.randbytes(size)
        assert speedups.sha256_hexdigest(data) == hashlib.sha256(data).hexdigest()


def test_timestamps_match_the_reference() -> None:
    rng = random.Random(2)
    moments = [0, 999, 1_000, 86_399_999, 951_782_400_000, 4_107_542_400_000]
    moments += [rng.randrange(0, 253_402_300_800_000) for _ in range(50_000)]
    for moment in moments:
        assert speedups.iso_millis(moment) == iso(moment)
    assert speedups.iso_millis(253_402_300_800_000) is None
    assert speedups.iso_millis(-1) is None


def test_smtp_codes_match_the_reference() -> None:
    rng = random.Random(3)
    alphabet = "245.0139 x_-\t\x1c:;"
    samples = ["550 5.1.1 user", "5.1.1", "x5.1.1", "5.1.1x", "5.1.1_", "5.1234.1", "5.1.1234"]
    samples += [
        "".join(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(30_000)
    ]
    for text in samples:
        assert speedups.smtp_code(text) == failure_code(text), text
    assert re.search(r"\s", "\x1c")  # (Python's \s takes \x1c-\x1f: the C does too)


def test_mutated_lines_give_the_same_records_or_the_same_error() -> None:
    # The C parser must never take a line the reference refuses, nor read one differently.
    rng = random.Random(5)
    seeds = [orjson.dumps(event) for event in EDGE_CASES] + [
        b'{"event_id":"\\u0062\\ud83d\\ude00\\n","source":"s","source_type":"t","type":"sent",'
        b'"channel":"email","occurred_at":1764000000123,"raw":{"a":[1.5e3,-0,{"b":[]}]}}',
    ]
    alphabet = b'{}[]":,\\/ -.0123456789eEtrufalsn\x00\x1f\x7f\xc3\xa9\xed\xa0\x80\xff'
    taken = 0
    for _ in range(6_000):
        line = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(line))
            action = rng.randrange(3)
            if action == 0:
                line[at] = rng.choice(alphabet)
            elif action == 1:
                line.insert(at, rng.choice(alphabet))
            else:
                del line[at]
        data = bytes(line) + b"\n"
        outcomes = []
        for native in (True, False):
            try:
                outcomes.append(
                    segment_lines(data, 0, 10, INGESTED, OPTIONS, NOTABLE, native=native)
                )
            except Exception as error:  # whatever the reference raises
                outcomes.append(type(error))
        assert outcomes[0] == outcomes[1], data
        taken += isinstance(outcomes[0], SegmentLines)
    assert taken > 600  # lines still valid after the mutations: compared record for record


def test_threads_writing_records_at_once_each_get_their_own() -> None:
    # A Functions worker may run two exports on two threads; the reference's callbacks let
    # the other thread in mid-call (the GIL is released in Python code).
    from concurrent.futures import ThreadPoolExecutor

    mixed = _lines(*EDGE_CASES) * 30  # lines handed to the reference: Python mid-call
    plain = _lines(*[_event(event_id=f"p{n}", email=f"u{n}@x.example") for n in range(900)])
    expected = {
        data: segment_lines(data, 0, 10**6, INGESTED, OPTIONS, NOTABLE, native=False)
        for data in (mixed, plain)
    }

    def run(data: bytes) -> bool:
        return all(
            segment_lines(data, 0, 10**6, INGESTED, OPTIONS, NOTABLE) == expected[data]
            for _ in range(40)
        )

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, [mixed, plain] * 4))
