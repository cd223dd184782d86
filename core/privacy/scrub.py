"""A file without one person: the records, lines or list items about them taken out.

Files are read by their kind: CSV and TSV by record (a quoted field may hold a line break,
and a rejects file's `raw_row` a whole record of its own), JSON Lines by line, a JSON
document by the items of its lists; gzip is recognised by its magic bytes and kept. What
cannot be read that way (or a JSON document that is about the person itself) is deleted
whole. Nothing is done to a file the person is not in.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass
from typing import Any

import orjson

from core.privacy.person import Matcher

_GZIP = b"\x1f\x8b"


@dataclass(frozen=True)
class Scrubbed:
    data: bytes | None
    """The file without the person, or None: delete it."""
    removed: int
    """Records, lines or list items taken out (0 when the file is deleted)."""


def scrub_file(name: str, data: bytes, matcher: Matcher) -> Scrubbed | None:
    """The file `name` without the person, or None when they are not in it."""
    packed = data[:2] == _GZIP
    try:
        plain = gzip.decompress(data) if packed else data
    except (OSError, EOFError):
        return Scrubbed(None, 0) if matcher.may_be_in(data) else None
    if not matcher.may_be_in(plain):
        return None
    try:
        text = plain.decode("utf-8")
    except UnicodeDecodeError:
        return Scrubbed(None, 0)
    if not matcher.in_text(text):
        return None  # the bytes were part of a longer value
    base = name.lower().removesuffix(".gz")
    if base.endswith((".csv", ".tsv")):
        result = _records(text, "\t" if base.endswith(".tsv") else ",", matcher)
    elif base.endswith(".json"):
        result = _document(text, matcher)
    else:  # JSON Lines and any other text: line by line
        result = _lines(text, matcher)
    if result is None:
        return Scrubbed(None, 0)
    kept, removed = result
    if removed == 0 and matcher.in_text(kept):
        return Scrubbed(None, 0)  # in it, but in no record that can go alone
    encoded = kept.encode()
    return Scrubbed(gzip.compress(encoded, compresslevel=6) if packed else encoded, removed)


def scrub_text(text: str, matcher: Matcher) -> tuple[str, int]:
    """A text value (a table property): its lines about the person taken out."""
    result = _lines(text, matcher)
    assert result is not None
    return result


def _lines(text: str, matcher: Matcher) -> tuple[str, int]:
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if not matcher.in_text(line)]
    return "".join(kept), len(lines) - len(kept)


def _records(text: str, delimiter: str, matcher: Matcher) -> tuple[str, int] | None:
    try:
        records = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error:
        return None
    if not records:
        return text, 0
    header, rows = records[0], records[1:]
    if any(matcher.in_text(field) for field in header):
        return None
    kept = [row for row in rows if not any(matcher.in_text(field) for field in row)]
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(kept)
    return out.getvalue(), len(rows) - len(kept)


def _document(text: str, matcher: Matcher) -> tuple[str, int] | None:
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError:
        return _lines(text, matcher)  # JSON Lines under a .json name
    removed = 0

    def without(value: Any) -> Any:
        nonlocal removed
        if isinstance(value, list):
            kept = [item for item in value if not matcher.in_value(item)]
            removed += len(value) - len(kept)
            return [without(item) for item in kept]
        if isinstance(value, dict):
            return {key: without(item) for key, item in value.items()}
        return value

    scrubbed = without(document)
    if matcher.in_value(scrubbed):
        return None  # the document is about them itself
    return orjson.dumps(scrubbed).decode(), removed
