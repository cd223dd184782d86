"""Streaming readers for segment export files: CSV/TSV with a header, JSON Lines, gzip.

Rows come out one at a time as (line number, values aligned to `columns`). Compression is
recognised by gzip's magic bytes, not the file name. Text must be UTF-8 (a BOM is
allowed); the strict decoder raises UnicodeDecodeError at the first bad byte, which the
split pass (core/sync/split.py) turns into the rejection of the whole file before anything
is sent.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

import orjson
from isal import igzip

from core.sync.definitions import FileFormat, InputSpec

GZIP_MAGIC = b"\x1f\x8b"
_READ_BYTES = 1 << 20
# Field size guard: a CSV field larger than this is corrupt input, not data.
csv.field_size_limit(1 << 20)


class FileRejected(Exception):
    """The whole file is unusable; `code` is the reason code for the run report."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SourceRow:
    line: int
    values: Sequence[Any]


def decompressed(stream: IO[bytes]) -> IO[bytes]:
    """The stream itself, or a gzip reader over it when it starts with gzip's magic (ISA-L's,
    several times faster than zlib's, with the same interface and errors)."""
    buffered: Any = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(stream)
    if buffered.peek(2)[:2] == GZIP_MAGIC:
        return cast(IO[bytes], igzip.IGzipFile(fileobj=buffered, mode="rb"))  # type: ignore[no-untyped-call]
    return cast(IO[bytes], buffered)


def header_columns(header: list[str]) -> list[str]:
    """The column names of a parsed header line; raises FileRejected if one repeats."""
    columns = [name.strip() for name in header]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise FileRejected("bad_header", f"header repeats columns {duplicated}")
    return columns


class RowReader:
    """Iterates the rows of one file; `columns` names the values of each row."""

    def __init__(self, stream: IO[bytes], spec: InputSpec, wanted: Sequence[str]) -> None:
        self.spec = spec
        self._text = io.TextIOWrapper(
            decompressed(stream), encoding="utf-8-sig", errors="strict", newline=""
        )
        self.columns: list[str]
        if spec.format == FileFormat.JSONL:
            self.columns = list(wanted)
        else:
            self._csv = csv.reader(self._text, delimiter=spec.field_delimiter, strict=True)
            try:
                header = next(self._csv)
            except StopIteration:
                raise FileRejected("empty_file", "file has no header line") from None
            except csv.Error as exc:
                raise FileRejected("bad_header", f"header line is not valid CSV: {exc}") from None
            self.columns = header_columns(header)

    def __iter__(self) -> Iterator[SourceRow | tuple[int, str]]:
        """SourceRow per record, or (line, error message) for a record that cannot parse."""
        if self.spec.format == FileFormat.JSONL:
            yield from self._json_lines()
        else:
            yield from self._csv_rows()

    def _csv_rows(self) -> Iterator[SourceRow | tuple[int, str]]:
        width = len(self.columns)
        reader = self._csv
        while True:
            start = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield start, f"malformed CSV: {exc}"
                continue
            if not values:
                continue  # blank line
            if len(values) != width:
                yield start, f"expected {width} fields, found {len(values)}"
                continue
            yield SourceRow(start, values)

    def _json_lines(self) -> Iterator[SourceRow | tuple[int, str]]:
        paths = [column.split(".") for column in self.columns]
        for number, line in enumerate(self._text, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield number, f"malformed JSON: {exc.msg} at column {exc.colno}"
                continue
            if not isinstance(record, dict):
                yield number, "a JSON Lines record must be an object"
                continue
            yield SourceRow(number, [_lookup(record, column, path) for column, path in
                                     zip(self.columns, paths, strict=True)])  # fmt: skip


def _lookup(record: dict[str, Any], column: str, path: list[str]) -> Any:
    """A flat key wins (`segmentMembership.ups.x.status` as one key), else a nested path."""
    if column in record:
        return record[column]
    value: Any = record
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value
