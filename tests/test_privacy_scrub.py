"""Finding a person in text and taking their records out of files (core/privacy)."""

from __future__ import annotations

import gzip

import orjson
import pytest

from core.privacy.person import Person
from core.privacy.scrub import scrub_file

PERSON = Person.of(profile_ids=["CRM-1"], emails=["Ann@Example.com"], phones=["+31 6 1234 5678"])


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("CRM-1", True), ("x,CRM-1,y", True), ('"CRM-1"', True), ("CRM-10", False),
        ("XCRM-1", False), ("ann@example.com", True), ("ANN@EXAMPLE.COM", True),
        ("joann@example.com", False), ("ann@example.com.au", False), ("ann@example.com.", True),
        ("+31612345678", True), ("+316123456789", False), ("line 1\nid=CRM-1\n", True),
    ],
)  # fmt: skip
def test_identifiers_are_found_as_whole_values(text: str, found: bool) -> None:
    assert PERSON.matcher().in_text(text) is found


def test_csv_records_go_whole_quoted_line_breaks_and_raw_rows_included() -> None:
    data = (
        b'line,reason_code,message,raw_row\n'
        b'3,not_date,bad,"CRM-1,ann@example.com,""multi\nline"""\n'
        b'4,not_date,bad,"CRM-2,bob@example.com,x"\n'
    )  # fmt: skip
    scrubbed = scrub_file("rejects/vip/run.csv", data, PERSON.matcher())
    assert scrubbed is not None and scrubbed.removed == 1
    assert (
        scrubbed.data
        == b'line,reason_code,message,raw_row\n4,not_date,bad,"CRM-2,bob@example.com,x"\n'
    )


def test_json_lines_gzip_stays_gzip_and_other_lines_stay_as_they_were() -> None:
    people = (("CRM-1", "x@example.com"), ("CRM-2", "ANN@example.com"), ("CRM-3", "c@x.com"))
    lines = [orjson.dumps({"external_id": i, "email": e}) for i, e in people]
    data = gzip.compress(b"\n".join(lines) + b"\n")
    scrubbed = scrub_file("events/segments/s.jsonl.gz", data, PERSON.matcher())
    assert scrubbed is not None and scrubbed.removed == 2 and scrubbed.data is not None
    assert gzip.decompress(scrubbed.data) == lines[2] + b"\n"


def test_a_json_document_loses_list_items_or_goes_whole_when_it_is_about_them() -> None:
    listed = orjson.dumps({"profiles": ["CRM-2", "CRM-1", "CRM-3"], "app": "shop"})
    scrubbed = scrub_file("push-dispatches/d/request.json", listed, PERSON.matcher())
    assert scrubbed is not None and orjson.loads(scrubbed.data or b"") == {
        "profiles": ["CRM-2", "CRM-3"], "app": "shop"
    }  # fmt: skip
    about = orjson.dumps({"profile_id": "CRM-1", "tokens": []})
    gone = scrub_file("poison/q/abc.json", about, PERSON.matcher())
    assert gone is not None and gone.data is None


def test_files_without_them_are_left_alone_and_unreadable_ones_with_them_go() -> None:
    assert scrub_file("a.csv", b"id\nCRM-10\n", PERSON.matcher()) is None
    assert scrub_file("a.bin", b"\xff\xfeCRM-1", PERSON.matcher()) == scrub_file(
        "b.bin", b"\xff\xfeCRM-1", PERSON.matcher()
    )
    unreadable = scrub_file("a.bin", b"\xff\xfeCRM-1", PERSON.matcher())
    assert unreadable is not None and unreadable.data is None


def test_addresses_that_are_none_are_refused() -> None:
    with pytest.raises(ValueError, match="not an e-mail address"):
        Person.of(emails=["not-an-address"])
