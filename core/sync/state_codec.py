"""How a bucket's delta state is written: sections of binary profile records (format 6).

A bucket's state is one or more sections: the base, then those later runs appended. Each
section is

    header      one line of JSON (version, fingerprint, run, result, withheld), then "\\n"
    length      8 bytes, little-endian: the size of the body that follows
    body        the name tables, then one record per profile

The name tables list the attribute names and the audience names the section's records
refer to by index (varint count, then varint length and the name's JSON each). A record:

    flags       1 byte: 1 = a raw digest follows (other bits are reserved, 0)
    digest      8 bytes      (the raw digest of the row acknowledged)
    identity    varint length, the identity's JSON
    attributes  varint length L, an L-byte bitmap of attribute indices (bit i of byte
                i // 8 for index i), then the 8-byte hash of each attribute set, in index
                order
    audiences   varint count, then each audience index (ascending): the audiences
                Switchboard added

A run that appends a section, or rewrites the whole, keeps the tables it loaded (the last
section's) and adds the names of its mapping they lack, sorted by their JSON: the tables
of later sections only ever extend earlier ones, so a record stays valid, byte for byte,
under any later section's tables and is written back unparsed. A later record of an
identity takes the place of an earlier one. Binary records are about a third of the JSON
lines with hex hashes that format 5 wrote (545 bytes per profile of 17 attributes), so a
run inflates and walks a third as much.

Formats 3 to 5 (JSON lines, `digest TAB identity TAB [{name: hash hex}, [audience]]`)
are still read; a bucket stored in them is rewritten whole as format 6 by its next write.

Each section is stored as a Zstandard frame (`compress`): about 14% smaller than ISA-L's
gzip at the same compression speed for these mostly random hashes, and three times as
fast to decompress (0.08 s against 0.26 s for a million profiles' state). Sections
written as gzip members before are still read (`decompress` takes either, one after the
other).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import zstandard
from isal import isal_zlib

FORMAT_VERSION = 6
TEXT_VERSIONS = (3, 4, 5)
"""Written as JSON lines; read, then rewritten as format 6."""
DIGESTS_SINCE = 5
"""Raw digests before format 5 were BLAKE2b: not compared."""
HAS_DIGEST = 1
_LENGTH_BYTES = 8


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_LEVEL = 1
_contexts = threading.local()
"""A thread's Zstandard contexts: they are not to be shared between threads."""


def compress(text: bytes) -> bytes:
    """A section as stored: one Zstandard frame."""
    if not hasattr(_contexts, "compressor"):
        # The frame's checksum (4 bytes) makes damaged state an error, never other text.
        _contexts.compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True)
    frame: bytes = _contexts.compressor.compress(text)
    return frame


def decompress(data: bytes, lengths: Sequence[int] = ()) -> bytes:
    """Stored sections, one after the other, as text: Zstandard frames, or gzip members
    written before (a bucket's base may be the one and its sections the other).
    `lengths`: each part's stored size, when known (a Zstandard frame is then read in one
    call, 20 times as fast as through a streaming reader)."""
    if not hasattr(_contexts, "decompressor"):
        _contexts.decompressor = zstandard.ZstdDecompressor()
    if lengths and sum(lengths) == len(data):
        texts, at = [], 0
        for length in lengths:
            part = data[at : at + length]
            at += length
            one_frame = part.startswith(_ZSTD_MAGIC) and zstandard.frame_content_size(part) >= 0
            reader = _contexts.decompressor
            try:
                texts.append(reader.decompress(part) if one_frame else _stream(part))
            except zstandard.ZstdError as exc:
                raise ValueError(f"sync state part cut short or damaged: {exc}") from None
        return b"".join(texts)
    return _stream(data)


def _stream(data: bytes) -> bytes:
    """Frames and members one after the other, their boundaries unknown."""
    texts = []
    while data:
        if data.startswith(_ZSTD_MAGIC):
            reader: Any = _contexts.decompressor.decompressobj()
        elif data.startswith(_GZIP_MAGIC):
            reader = isal_zlib.decompressobj(wbits=31)
        else:
            raise ValueError("sync state part is neither a Zstandard frame nor gzip")
        texts.append(reader.decompress(data))
        if not reader.eof:
            raise ValueError("sync state part cut short")
        data = reader.unused_data
    return b"".join(texts)


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: bytes | memoryview, at: int) -> tuple[int, int]:
    """The value at `at` and the offset after it."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


@dataclass
class Tables:
    """A section's attribute and audience names, in index order."""

    attributes: list[str] = field(default_factory=list)
    audiences: list[str] = field(default_factory=list)

    def extended(self, attributes: Iterable[str], audiences: Iterable[str]) -> Tables:
        """These tables with the names they lack appended, sorted by their JSON."""
        return Tables(_extend(self.attributes, attributes), _extend(self.audiences, audiences))

    def encode(self) -> bytes:
        out = bytearray()
        for names in (self.attributes, self.audiences):
            out += varint(len(names))
            for name in names:
                token = orjson.dumps(name)
                out += varint(len(token)) + token
        return bytes(out)


def _extend(names: list[str], more: Iterable[str]) -> list[str]:
    known = set(names)
    return names + sorted({name for name in more if name not in known}, key=orjson.dumps)


def _read_tables(data: bytes, at: int) -> tuple[Tables, int]:
    tables = Tables()
    for names in (tables.attributes, tables.audiences):
        count, at = read_varint(data, at)
        for _ in range(count):
            size, at = read_varint(data, at)
            names.append(orjson.loads(data[at : at + size]))
            at += size
    return tables, at


@dataclass
class TableIndex:
    """Tables being written, with each name's index."""

    tables: Tables
    attributes: dict[str, int] = field(init=False)
    audiences: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.attributes = {name: i for i, name in enumerate(self.tables.attributes)}
        self.audiences = {name: i for i, name in enumerate(self.tables.audiences)}


def section(header: bytes, tables: Tables, records: Iterable[bytes]) -> bytes:
    body = bytearray(tables.encode())
    for record in records:
        body += record
    return header + b"\n" + len(body).to_bytes(_LENGTH_BYTES, "little") + bytes(body)


@dataclass
class Section:
    header: dict[str, Any]
    tables: Tables
    records: int
    """Offset of the first record in the text."""
    end: int


def sections(text: bytes) -> Iterator[Section]:
    """The sections of a format-6 state, in order."""
    at = 0
    while at < len(text):
        line_end = text.index(b"\n", at)
        header = orjson.loads(text[at:line_end])
        start = line_end + 1 + _LENGTH_BYTES
        end = start + int.from_bytes(text[line_end + 1 : start], "little")
        if end > len(text):
            raise ValueError("sync state section cut short")
        tables, records = _read_tables(text, start)
        yield Section(header, tables, records, end)
        at = end


def header_version(text: bytes) -> Any:
    """The version the first header names (None when there is no header)."""
    line_end = text.find(b"\n")
    first = text[: line_end if line_end >= 0 else len(text)]
    return orjson.loads(first).get("version") if first else None


@dataclass
class Record:
    """One profile record as stored: where its parts are in the text."""

    flags: int
    digest: bytes | None
    identity: bytes
    """The identity's JSON."""
    start: int
    tail: int
    """Offset of the attributes."""
    end: int


def records(text: bytes, start: int, end: int) -> Iterator[Record]:
    at = start
    while at < end:
        begin = at
        flags = text[at]
        at += 1
        digest = None
        if flags & ~HAS_DIGEST:
            raise ValueError(f"sync state record with unknown flags {flags}")
        if flags & HAS_DIGEST:
            digest, at = text[at : at + 8], at + 8
        size, at = read_varint(text, at)
        identity, at = text[at : at + size], at + size
        tail = at
        at = _skip_tail(text, at)
        yield Record(flags, digest, identity, begin, tail, at)
    if at != end:
        raise ValueError("sync state record runs past its section")


def _skip_tail(text: bytes, at: int) -> int:
    size, at = read_varint(text, at)
    present = sum(bin(byte).count("1") for byte in text[at : at + size])
    at += size + 8 * present
    count, at = read_varint(text, at)
    for _ in range(count):
        _, at = read_varint(text, at)
    return at


def read_tail(text: bytes, at: int, tables: Tables) -> tuple[dict[str, bytes], set[str]]:
    """A record's attribute hashes and audiences, by name."""
    size, at = read_varint(text, at)
    bitmap, at = text[at : at + size], at + size
    hashes: dict[str, bytes] = {}
    for index in range(8 * size):
        if bitmap[index >> 3] >> (index & 7) & 1:
            hashes[tables.attributes[index]] = text[at : at + 8]
            at += 8
    count, at = read_varint(text, at)
    audiences = set()
    for _ in range(count):
        index, at = read_varint(text, at)
        audiences.add(tables.audiences[index])
    return hashes, audiences


def record(identity: bytes, digest: bytes | None, tail: bytes) -> bytes:
    flags = HAS_DIGEST if digest else 0
    return b"".join((bytes((flags,)), digest or b"", varint(len(identity)), identity, tail))


def tail(hashes: dict[str, bytes], audiences: Iterable[str], out: TableIndex) -> bytes:
    """The attributes and audiences part of a record, under the tables being written."""
    indices = sorted(out.attributes[name] for name in hashes)
    names = out.tables.attributes
    bitmap = bytearray((indices[-1] >> 3) + 1 if indices else 0)
    for index in indices:
        bitmap[index >> 3] |= 1 << (index & 7)
    parts = [varint(len(bitmap)), bytes(bitmap), *(hashes[names[i]] for i in indices)]
    owned = sorted(out.audiences[name] for name in audiences)
    parts += [varint(len(owned)), *(varint(index) for index in owned)]
    return b"".join(parts)
