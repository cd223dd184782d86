"""Streaming readers for segment export files: CSV/TSV with a header, JSON Lines, gzip.

Rows come out one at a time as (line number, values aligned to `columns`). Compression is
recognised by gzip's magic bytes, not the file name. Text must be UTF-8 (a BOM is
allowed); the strict decoder raises UnicodeDecodeError at the first bad byte, which the
split pass (core/sync/split.py) turns into the rejection of the whole file before anything
is sent.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

import orjson
from isal import igzip, isal_zlib

from core.sync.definitions import FileFormat, InputSpec

GZIP_MAGIC = b"\x1f\x8b"
_READ_BYTES = 1 << 20


_ISAL_ERROR: type[Exception] = isal_zlib.IsalError  # type: ignore[assignment]  # its stub says otherwise
DECOMPRESSION_ERRORS: tuple[type[Exception], ...] = (OSError, EOFError, _ISAL_ERROR)
"""What reading a damaged gzip file raises (ISA-L's own error is not an OSError)."""


@dataclass(frozen=True)
class InputLimits:
    """How large a record (its bytes in the file, line breaks included: a quoted line
    break continues a record) and one CSV field may be. A file with a larger one is
    rejected as a whole (`line_too_long`, `field_too_long`) as soon as it is met, before
    anything is sent: a line that long is a broken export, and reading it whole would
    take memory and time that grow with it. From SWITCHBOARD_MAX_LINE_BYTES and
    SWITCHBOARD_MAX_FIELD_BYTES."""

    max_line_bytes: int = 4 << 20
    max_field_bytes: int = 1 << 20


DEFAULT_LIMITS = InputLimits()


class FileRejected(Exception):
    """The whole file is unusable; `code` is the reason code for the run report."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SourceRow:
    line: int
    values: Sequence[Any]
    raw: str | None = None
    """The record's text as in the file (without its line break), where it is not the
    values joined by the delimiter: a CSV record with a quote, a JSON Lines line."""


Malformed = tuple[int, str, str]
"""A record that cannot be read as a row: (line, what is wrong, its text as in the file)."""


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


def too_long(limit: int, line: int) -> FileRejected:
    return FileRejected(
        "line_too_long",
        f"the record at line {line} is longer than {limit} bytes "
        "(SWITCHBOARD_MAX_LINE_BYTES); nothing was sent",
    )


class BoundedLines:
    """The text lines of a byte stream as Python's text reader gives them with `newline=""`
    (split at CRLF, CR or LF, which stay on the line; strict UTF-8, a BOM at the start
    dropped), read no further than the limits allow: once the lines of one record (since
    `record_done`) pass `max_line_bytes`, it raises `line_too_long` without reading the
    rest of the line. A line is read with a size bound, so memory stays bounded and the
    time linear however long it is."""

    def __init__(self, stream: IO[bytes], limits: InputLimits) -> None:
        self._text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="strict", newline="")
        self._limit = limits.max_line_bytes
        self._done = False
        self._texts: list[str] = []
        self.quoted = False
        """Whether a line of the current record holds a quote."""
        self._lines = self._read()

    def record_done(self) -> None:
        self._done = True

    def header_before(self, exc: UnicodeDecodeError, delimiter: str) -> list[str] | None:
        """The header record, when the byte that is not UTF-8 (met while reading it: the
        text reader decodes a chunk ahead of the lines it gives) lies past its end; else
        None."""
        try:
            before = self._text.buffer.tell() - len(exc.object)
        except (OSError, ValueError, AttributeError):
            return None
        if before not in (0, len(codecs.BOM_UTF8)):
            return None  # a header longer than the first chunk: its start is not in `exc`
        # The decoder is given the first chunk less its BOM, if it has one.
        encoding = "utf-8" if before else "utf-8-sig"
        text = io.StringIO(bytes(exc.object[: exc.start]).decode(encoding), newline="")
        try:
            header = next(csv.reader(text, delimiter=delimiter, strict=True))
        except (StopIteration, csv.Error):
            return None
        whole = text.getvalue()[: text.tell()].endswith(("\n", "\r"))
        return header if whole else None

    def _no_partial_bom(self) -> None:
        """A file of only the first byte or two of a BOM is not UTF-8 (Python's utf-8-sig
        decoder drops them at the end without a word)."""
        try:
            consumed = self._text.buffer.tell()
        except (OSError, ValueError, AttributeError):
            return
        if 0 < consumed < len(codecs.BOM_UTF8):
            raise UnicodeDecodeError(
                "utf-8", codecs.BOM_UTF8[:consumed], 0, consumed, "part of a byte order mark"
            )

    def record_text(self) -> str:
        """The text of the record's lines handed out since `record_done`, without the last
        line break."""
        text = "".join(self._texts)
        if text.endswith("\r\n"):
            return text[:-2]
        return text[:-1] if text.endswith(("\n", "\r")) else text

    def __iter__(self) -> Iterator[str]:
        return self._lines

    def _read(self) -> Iterator[str]:
        readline, limit, texts = self._text.readline, self._limit, self._texts
        record = 0  # bytes of the current record's lines so far
        first = line_number = 1  # the current record's first line, the next line's
        while True:
            if self._done:  # a record ended: the next line starts the next one
                self._done = False
                record, first = 0, line_number
                texts.clear()
                self.quoted = False
            # At most the bound's worth of characters (a character is one byte or more),
            # and two for a line break: a longer line is refused on its first part.
            line = readline(limit - record + 2)
            if not line:
                if line_number == 1:
                    self._no_partial_bom()
                return
            record += len(line) if line.isascii() else len(line.encode("utf-8"))
            if record > limit:
                raise too_long(limit, first)
            line_number += 1
            texts.append(line)
            if '"' in line:
                self.quoted = True
            yield line


class RowReader:
    """Iterates the rows of one file; `columns` names the values of each row."""

    def __init__(
        self,
        stream: IO[bytes],
        spec: InputSpec,
        wanted: Sequence[str],
        limits: InputLimits = DEFAULT_LIMITS,
    ) -> None:
        self.spec = spec
        self.limits = limits
        self._undecodable: UnicodeDecodeError | None = None
        self._lines = BoundedLines(decompressed(stream), limits)
        self.columns: list[str]
        if spec.format == FileFormat.JSONL:
            self.columns = list(wanted)
        else:
            csv.field_size_limit(limits.max_field_bytes)  # the process's: the same everywhere
            self._csv = csv.reader(self._lines, delimiter=spec.field_delimiter, strict=True)
            try:
                header = next(self._csv)
            except StopIteration:
                raise FileRejected("empty_file", "file has no header line") from None
            except UnicodeDecodeError as exc:
                # Past a whole header, the header's own problems come first (file order,
                # as the C splitter meets them): the bad byte is raised by the first row.
                before = self._lines.header_before(exc, spec.field_delimiter)
                if before is None:
                    raise
                header, self._undecodable = before, exc
            except csv.Error as exc:
                self._field_limit(exc, 1)
                raise FileRejected("bad_header", f"header line is not valid CSV: {exc}") from None
            self._lines.record_done()
            self.columns = header_columns(header)

    def _field_limit(self, exc: csv.Error, line: int) -> None:
        if "field larger than field limit" in str(exc):
            raise FileRejected(
                "field_too_long",
                f"a field of the record at line {line} is longer than "
                f"{self.limits.max_field_bytes} bytes (SWITCHBOARD_MAX_FIELD_BYTES); "
                "nothing was sent",
            )

    def __iter__(self) -> Iterator[SourceRow | Malformed]:
        """SourceRow per record, or (line, error message, text) for one that cannot parse."""
        if self._undecodable is not None:
            raise self._undecodable
        if self.spec.format == FileFormat.JSONL:
            yield from self._json_lines()
        else:
            yield from self._csv_rows()

    def _csv_rows(self) -> Iterator[SourceRow | Malformed]:
        width = len(self.columns)
        reader = self._csv
        lines = self._lines
        while True:
            start = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                self._field_limit(exc, start)
                text = lines.record_text()
                lines.record_done()
                yield start, f"malformed CSV: {exc}", text
                continue
            if len(values) != width and values:
                text = lines.record_text()
                lines.record_done()
                yield start, f"expected {width} fields, found {len(values)}", text
                continue
            raw = lines.record_text() if lines.quoted else None
            lines.record_done()
            if values:  # else a blank line
                yield SourceRow(start, values, raw)

    def _json_lines(self) -> Iterator[SourceRow | Malformed]:
        paths = [column.split(".") for column in self.columns]
        for number, line in enumerate(self._lines, start=1):
            text = self._lines.record_text()
            self._lines.record_done()
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield number, f"malformed JSON: {exc.msg} at column {exc.colno}", text
                continue
            if not isinstance(record, dict):
                yield number, "a JSON Lines record must be an object", text
                continue
            values = [_lookup(record, column, path) for column, path in
                      zip(self.columns, paths, strict=True)]  # fmt: skip
            yield SourceRow(number, values, text)


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
