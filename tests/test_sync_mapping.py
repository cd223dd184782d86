"""Readers, typed mapping and the delta computation, without storage."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Any

import pytest

from core.destinations.braze import users_track_object
from core.sync.definitions import FieldMapping, InputSpec, load_document
from core.sync.mapping import RowMapper, RowRejected, looks_like_mojibake
from core.sync.readers import (
    DEFAULT_LIMITS,
    BoundedLines,
    FileRejected,
    InputLimits,
    RowReader,
    SourceRow,
)
from core.sync.state import SyncState

DOC = load_document(Path(__file__).parent / "data" / "syncs.yaml")
VIP = DOC.get("vip")
assert VIP is not None
HEADER = "crmId,email,firstName,birthDate,country,points,tier"


def rows(text: bytes, spec: InputSpec = VIP.input, wanted: list[str] | None = None) -> list:
    return list(RowReader(io.BytesIO(text), spec, wanted or []))


def mapped(line: str, header: str = HEADER):  # type: ignore[no-untyped-def]
    reader = RowReader(io.BytesIO(f"{header}\n{line}\n".encode()), VIP.input, [])
    row = next(iter(reader))
    assert isinstance(row, SourceRow)
    return RowMapper(VIP, reader.columns).map(row.values)


def test_csv_with_bom_gzip_and_quoted_newlines() -> None:
    text = f'\ufeff{HEADER}\nC1,a@x.io,"Ana\nMaria",1988-04-12,PT,1,gold\n\nC2,b@x.io,B,,,,\n'
    plain = rows(text.encode())
    assert [r.line for r in plain] == [2, 5]
    assert plain[0].values[2] == "Ana\nMaria"
    assert rows(gzip.compress(text.encode()))[1].values[0] == "C2"


def test_row_with_wrong_field_count_is_reported_with_its_line() -> None:
    result = rows(f"{HEADER}\nC1,a@x.io\nC2,b@x.io,B,,,,\n".encode())
    assert result[0] == (2, "expected 7 fields, found 2", "C1,a@x.io")
    assert result[1].line == 3


def test_tsv_and_jsonl() -> None:
    tsv = rows(b"crmId\temail\nC1\ta@x.io\n", InputSpec(format="tsv"))
    assert tsv[0].values == ["C1", "a@x.io"]
    jsonl = b'{"id": "J1", "profile": {"email": "j@x.io"}}\nnot json\n[1]\n'
    got = rows(jsonl, InputSpec(format="jsonl"), ["id", "profile.email", "missing"])
    assert got[0].values == ["J1", "j@x.io", None]
    assert got[1][0] == 2 and "malformed JSON" in got[1][1]
    assert got[2] == (3, "a JSON Lines record must be an object", "[1]")


def test_text_that_is_not_utf8_raises_while_reading() -> None:
    latin1 = f"{HEADER}\nC1,a@x.io,Chlo\xe9,,,,\n".encode("latin-1")
    with pytest.raises(UnicodeDecodeError):
        rows(latin1)
    assert rows(gzip.compress(f"{HEADER}\nC1,a@x.io,Chloé,,,,\n".encode()))[0].values[2] == "Chloé"


def test_empty_file_and_duplicate_header() -> None:
    with pytest.raises(FileRejected, match="no header"):
        RowReader(io.BytesIO(b""), VIP.input, [])
    with pytest.raises(FileRejected, match="repeats columns"):
        RowReader(io.BytesIO(b"a,a\n"), VIP.input, [])


def test_standard_fields_are_normalised() -> None:
    row = mapped("C1, Ana@Example.COM ,Ana,1988-04-12,portugal,1200,")
    assert row.identity == "C1"
    assert row.attributes == {
        "email": "ana@example.com", "first_name": "Ana", "dob": "1988-04-12",
        "country": "PT", "loyalty_points": 1200, "tier": None,
    }  # fmt: skip
    assert row.email == "ana@example.com"


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (",a@x.io,A,,,,", "missing_identity"),
        ("C1,not-an-email,A,,,,", "invalid_email"),
        ("C1,a@x.io,A,12/04/1988,,,", "not_date"),
        ("C1,a@x.io,A,1850-01-01,,,", "invalid_dob"),
        ("C1,a@x.io,A,,Atlantis,,", "invalid_country"),
        ("C1,a@x.io,A,,,12.5,", "not_integer"),
        ("C1,a@x.io," + "x" * 256 + ",,,,", "string_too_long"),
        ("C1,a@x.io,JosÃ©,,,,", "mojibake"),
    ],
)
def test_bad_values_are_rejected_with_a_code(line: str, code: str) -> None:
    with pytest.raises(RowRejected) as caught:
        mapped(line)
    assert caught.value.code == code


def test_memberships_and_statuses() -> None:
    header = (
        HEADER + ",segmentMembership.ups.seg-vip.status,segmentMembership.ups.seg-lapsed.status"
    )
    row = mapped("C1,a@x.io,A,,,,,realized,exited", header)
    assert row.memberships == {"vip": True, "lapsed": False}
    assert mapped("C1,a@x.io,A,,,,,existing,", header).memberships == {"vip": True}
    with pytest.raises(RowRejected, match="realized/existing/exited"):
        mapped("C1,a@x.io,A,,,,,maybe,", header)


def test_missing_mapped_column_rejects_the_file() -> None:
    with pytest.raises(FileRejected, match="'points' is not in the file"):
        mapped("C1,a@x.io,A,,,", "crmId,email,firstName,birthDate,country,tier")


def test_mojibake_detection_spares_real_text() -> None:
    assert looks_like_mojibake("JosÃ©")
    assert not looks_like_mojibake("João Müller Chloé Ørsted 東京")


def test_diff_sends_only_changed_attributes_and_owned_memberships() -> None:
    state = SyncState({}, None)
    first = state.diff(
        "C1", {"first_name": "Ana", "tier": None}, {"vip": True}, frozenset({"tier"})
    )
    assert first.attributes == {"first_name": "Ana"} and first.added == ("vip",)
    state.acknowledge("C1", first, None)
    same = state.diff("C1", {"first_name": "Ana", "tier": None}, {"vip": True}, frozenset({"tier"}))
    assert same.empty
    changed = state.diff("C1", {"first_name": "Anna"}, {"vip": False, "lapsed": False}, frozenset())
    assert changed.attributes == {"first_name": "Anna"}
    assert changed.removed == ("vip",)  # never "lapsed": we did not add it
    state.acknowledge("C1", state.diff("C1", {"tier": "gold"}, {}, frozenset()), None)
    cleared = state.diff("C1", {"tier": None}, {}, frozenset({"tier"}))
    assert cleared.attributes == {"tier": None}  # send_nulls clears what we had sent


def test_items_carry_update_only_and_membership_shapes() -> None:
    state = SyncState({}, None)
    change = state.diff("C1", {"email": "a@x.io"}, {"vip": True}, frozenset())
    assert users_track_object(VIP, "C1", change) == {
        "external_id": "C1", "_update_existing_only": True, "email": "a@x.io",
        "audience_vip": True,
    }  # fmt: skip
    arrays = DOC.get("arrays")
    assert arrays is not None
    change = state.diff("J1", {}, {"alpha": True}, frozenset())
    assert users_track_object(arrays, "J1", change) == {
        "external_id": "J1",
        "cdp_audiences": {"add": ["alpha"]},
    }  # upsert: no _update_existing_only


def test_destination_error_codes_carry_no_identifiers() -> None:
    from core.sync.engine import _reason_code

    assert (
        _reason_code("BLACKLISTED_EXTERNAL_USER_ID") == "destination_blacklisted_external_user_id"
    )
    assert _reason_code("'ana.silva@example.com' is not valid") == "destination_is_not_valid"
    assert _reason_code("+31612345678") == "destination_error"


def test_a_coercer_failing_unforeseen_rejects_the_row_instead_of_the_bucket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import core.sync.mapping as mapping_module

    def broken(value: object) -> str:
        raise OverflowError("date value out of range")

    monkeypatch.setattr(mapping_module, "_date", broken)
    convert = mapping_module.coercer(FieldMapping(source="d", target="d", type="date"))
    with pytest.raises(RowRejected) as caught:
        convert("2026-01-01")
    assert caught.value.code == "unreadable_value"


def _text_lines(data: bytes) -> list[str] | str:
    try:
        return list(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline=""))
    except UnicodeDecodeError:
        return "not_utf8"


def _bounded_lines(data: bytes, chunk: int) -> list[str] | str:
    class Chunks(io.RawIOBase):
        def __init__(self) -> None:
            self.data, self.at = data, 0

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            piece = self.data[self.at : self.at + min(chunk, size if size > 0 else chunk)]
            self.at += len(piece)
            return piece

    try:
        return list(BoundedLines(Chunks(), InputLimits(1 << 20, 1 << 20)))  # type: ignore[arg-type]
    except UnicodeDecodeError:
        return "not_utf8"


def test_bounded_lines_split_and_decode_as_the_text_reader_does() -> None:
    import random

    rng = random.Random(5)
    pieces = [b"a", b",", b"\r", b"\n", b"\r\n", b'"', b"\xc3\xa9", b"\xef\xbb\xbf", b" ", b"\xff"]
    for _ in range(3000):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 40)))
        if rng.random() < 0.8:
            data = data.replace(b"\xff", b"")
        expected = _text_lines(data)
        for chunk in (1, 2, 3, 7, 1 << 20):
            assert _bounded_lines(data, chunk) == expected, (data, chunk)


def test_a_record_longer_than_the_limit_rejects_the_file_without_reading_it_whole() -> None:
    try:
        _limits_are_kept()
    finally:  # the csv module's field limit is the process's
        csv.field_size_limit(DEFAULT_LIMITS.max_field_bytes)


def _limits_are_kept() -> None:
    limits = InputLimits(max_line_bytes=64, max_field_bytes=32)
    spec = VIP.input
    ok = b"crmId,email\n" + b"A," + b"x" * 20 + b"\n"
    assert len(list(RowReader(io.BytesIO(ok), spec, [], limits))) == 1

    class Endless(io.RawIOBase):  # a line that never ends: read only as far as the limit
        reads = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            self.reads += 1
            assert self.reads * 1000 < 3 << 20  # it stops within a chunk or two of 1 MiB
            data = b"crmId,email\nA," if self.reads == 1 else b"y" * 1000
            buffer[: len(data)] = data
            return len(data)

    with pytest.raises(FileRejected) as caught:
        list(RowReader(Endless(), spec, [], limits))  # type: ignore[arg-type]
    assert caught.value.code == "line_too_long" and "line 2" in str(caught.value)
    quoted = b'crmId,email\nA,"' + b"z\n" * 40 + b'"\n'  # short lines, one long record
    with pytest.raises(FileRejected) as caught:
        list(RowReader(io.BytesIO(quoted), spec, [], InputLimits(64, 4096)))
    assert caught.value.code == "line_too_long"
    wide = b"crmId,email\nA," + b"w" * 40 + b"\n"
    with pytest.raises(FileRejected) as caught:
        list(RowReader(io.BytesIO(wide), spec, [], InputLimits(4096, 32)))
    assert caught.value.code == "field_too_long"
    jsonl = InputSpec(format="jsonl")
    with pytest.raises(FileRejected) as caught:
        list(RowReader(io.BytesIO(b'{"a": "' + b"j" * 100 + b'"}\n'), jsonl, ["a"], limits))
    assert caught.value.code == "line_too_long"
