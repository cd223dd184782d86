"""Sync configurations and value pools that exercise every kind of value the mapping
knows: the tests of the C path (tests/test_sync_speedups.py) and the fuzz targets
(fuzz/targets.py) draw rows from them."""

from __future__ import annotations

from typing import Any

from core.sync.definitions import SyncDefinition, parse_document


def sync_document(sync_id: str, **overrides: Any) -> dict[str, Any]:
    return {"id": sync_id, "identity": {"column": "id", "namespace": "crmId"}, **overrides}


def configured_sync(sync_id: str, configuration: str, **overrides: Any) -> SyncDefinition:
    document = {**sync_document(sync_id), **CONFIGURATIONS[configuration], **overrides}
    return parse_document({"version": 1, "syncs": [document]}).syncs[0]


FULL_COLUMNS = [
    "id", "email", "first", "last", "dob", "gender", "country", "language", "phone", "city",
    "zone", "points", "value", "vip", "bought", "tier", "tags", "score", "prefs", "subscribe",
    "consent", "segmentMembership.ups.vip.status", "segmentMembership.ups.lapsed.status",
]  # fmt: skip
FIELDS: list[dict[str, Any]] = [
    {"source": "email", "target": "email"},
    {"source": "first", "target": "first_name"},
    {"source": "last", "target": "last_name"},
    {"source": "dob", "target": "dob", "type": "date"},
    {"source": "gender", "target": "gender"},
    {"source": "country", "target": "country"},
    {"source": "language", "target": "language"},
    {"source": "phone", "target": "phone"},
    {"source": "city", "target": "home_city"},
    {"source": "zone", "target": "time_zone"},
    {"source": "points", "target": "points", "type": "integer"},
    {"source": "value", "target": "value", "type": "decimal"},
    {"source": "vip", "target": "vip", "type": "boolean"},
    {"source": "bought", "target": "bought", "type": "datetime"},
    {"source": "tier", "target": "tier", "max_length": 6},
    {"source": "tags", "target": "tags", "type": "array"},
    {"source": "score", "target": "score", "type": "float"},
    {"source": "prefs", "target": "prefs", "type": "object"},
    {"source": "subscribe", "target": "email_subscribe"},
]
SEGMENTS: dict[str, Any] = {
    "segments": [{"id": "vip", "name": "vip"}, {"id": "lapsed", "name": "lapsed"}]
}
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "boolean-audiences": {
        "fields": FIELDS, "audiences": SEGMENTS,
        "consent": {"channel": "email", "column": "consent"},
    },
    "array-upsert-nulls": {
        "fields": [
            {**f, "send_nulls": f["target"] in ("first_name", "tier", "tags")} for f in FIELDS
        ] + [{"source": "last", "target": "surname", "required": True}],
        "audiences": {**SEGMENTS, "representation": "array"}, "mode": "upsert",
    },
    "email-identity": {
        "identity": {"column": "email", "namespace": "email", "destination_key": "email"},
        "fields": [f for f in FIELDS if f["target"] != "email"], "audiences": SEGMENTS,
    },
    "mirror-array": {
        "fields": FIELDS[:6], "audiences": {**SEGMENTS, "representation": "array"},
        "mode": "mirror",
    },
        "phone-identity": {
        "identity": {"column": "phone", "namespace": "phone", "destination_key": "phone"},
        # The address as a custom attribute: Braze would identify by a mapped `email`.
        "fields": [
            {"source": "email", "target": "contact_email"},
            *(f for f in FIELDS if f["target"] in ("first_name", "points")),
        ],
    },
}  # fmt: skip

POOLS: dict[str, list[str]] = {
    "email": ["{i}@example.com", " User{i}@Example.COM ", "not-an-email", "", "a@b",
              "ü{i}@example.com", "a b@c.de", "a@b@c.de", "@x.y", "x@.y", "x@y.",
              "v" * 250 + "@x.com", "x@y.z"],
    "first": ["Ana", " Ana ", "", "Müller", "JosÃ©", "Ã©x", "x" * 300, "漢字", "\u00a0Ana\u3000",
              'Quote "q"', "tab\there", "new\nline", "emoji 😀", "\x85"],
    "dob": ["1990-01-31", "1990-02-30", "2024-02-29", "2023-02-29", "19900131", "1899-12-31",
            "2100-01-01", " 1990-01-31 ", "", "1990-1-31", "abc", "0001-01-01", "1900-01-01"],
    "gender": ["M", "f", "Female", "unknown", "u", "x", "", " M ", "prefer not to say", "É"],
    "country": ["PT", "nl", "Netherlands", "deu", "Côte d'Ivoire", "XX", "", "  fr "],
    "language": ["pt", "en-US", "EN_gb", "xx", "", "pt-BR"],
    "phone": ["+3161{i:07d}", "0031 6 1234 {i:04d}", "(06) 123", "+1-555-123-4567", "+0123456789",
              "+١٢٣٤٥٦٧٨٩٠", "", "+31 6 12.34.56.78", "12345", "+" + "9" * 16],
    "zone": ["Europe/Lisbon", "Mars/Olympus", "", "UTC", "europe/lisbon"],
    "points": ["0", "42", "-7", "+5", "007", "1_000", "1e3", "12.0", "9223372036854775807",
               "9223372036854775808", "-9223372036854775809", "", " 3 ", "٣", "1" * 21, "-0"],
    "value": ["12.50", "0.1", "-0", "007.5", "1e5", "1_000.5", "NaN", "Infinity", "0.00001",
              "0.0001", "123456789012345.6", "1234567890123456.7", ".5", "5.", "", "abc",
              "+3.25", " 2.5 ", "100", "0.000123456789012345"],
    "vip": ["true", "False", "YES", "n", "1", "0", "maybe", "", " t ", "TRUE",
            "\uff54\uff52\uff55\uff45"],
    "bought": ["2026-01-01T10:00:00Z", "2026-01-01T10:00:00", "2026-01-01T10:00:00+02:00",
               "2026-01-01T10:00:00.123Z", "2026-01-01T10:00:00.000Z", "2026-01-01T10:00:00.5Z",
               "2026-01-01 10:00:00", "2026-13-01T00:00:00Z", "2026-01-01T24:00:00Z", "",
               "2026-01-01T10:00:00.123456+00:00", "2026-01-01T10:00:00.000001Z",
               "20260101T100000Z", "2026-01-01", "2024-02-29T23:59:59Z"],
    "tier": ["gold", "silver", "", "platinum", "ÿÿÿÿÿÿ", " gold "],
    "tags": ["news|offers", "offers", "a|a|b", " a | b |", "|", "", '["x","y"]', '["x",1]', "[bad",
             "x" * 300, "|".join(["v"] * 101), "|".join(str(i) for i in range(101)), "é|É"],
    "score": ["54.123", "1e16", "1.5e-7", "-1E+2", "inf", "0.1", "3", "", "1_0.5", "2.50"],
    "prefs": ['{"a":1}', '{"b":{"c":[1,2]}}', "[1]", "nope", '{"a b":1}', '{"b":2,"a":1}', ""],
    "subscribe": ["opted_in", "Subscribed", "unsubscribed", "maybe", ""],
    "consent": ["y", "Y", "n", "", "yes", "NO", " y ", "ÿ", "opted_in"],
    "status": ["realized", "existing", "exited", "", "EXITED", " Realized ", "bogus", "réalisé"],
}  # fmt: skip
POOLS["last"] = POOLS["city"] = POOLS["first"]
TYPICAL = {
    "email": "user{i}@example.com", "first": "Ana", "last": "Silva", "dob": "1980-05-1{d}",
    "gender": "F", "country": "PT", "language": "pt", "phone": "+3161{i:07d}", "city": "Porto",
    "zone": "Europe/Lisbon", "points": "{i}", "value": "{i}.5", "vip": "true",
    "bought": "2026-03-0{d}T10:00:00Z", "tier": "gold", "tags": "news|offers", "score": "{i}.25",
    "prefs": '{"n":{i}}', "subscribe": "opted_in", "consent": "y", "status": "realized",
}  # fmt: skip
