"""First pass over a segment file: validate the whole file, partition rows by identity.

Past 500 lines because the reading loop, the per-bucket holding/spilling and the C fast
path share one pass over the file and its limits; the readers live in readers.py.

Every row goes to bucket `hash(identity) mod buckets`, so all rows of one person, and that
person's delta state, meet in one bucket. A bucket is the unit of work and of state:
processed on its own with only its state in memory, so memory stays flat however large
the file, and buckets can be processed by parallel workers.

Files of up to `in_memory_max_rows` rows keep their buckets in memory as they are. Larger
ones are compressed (gzip'd JSON Lines), still in memory, up to `held_max_bytes`; past
that, each bucket spills to a work blob, `sync-work/{run_id}/bucket-{n:04d}.jsonl.gz`,
which the workers read back. A run that fans out writes the work it held as work blobs
(`upload_held_work`); one that runs in this process never stores it (a work blob's three
requests per bucket were a quarter of a 1M-row run). Nothing is sent during this pass, so
a file that turns out not to be UTF-8 halfway is still rejected as a whole.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import logging
import mmap
import posixpath
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import orjson
from isal import igzip, isal_zlib

from core.errors import StorageError
from core.storage import Storage
from core.storage.blobs import BlobRef, BlockStager, BlockWriter
from core.sync.definitions import FileFormat, SyncDefinition
from core.sync.mapping import RowMapper
from core.sync.readers import (
    DECOMPRESSION_ERRORS,
    DEFAULT_LIMITS,
    FileRejected,
    InputLimits,
    Malformed,
    RowReader,
    SourceRow,
    decompressed,
    header_columns,
)
from core.sync.speedups import SPEEDUPS
from core.sync.unchanged import UnchangedIndex

log = logging.getLogger(__name__)
WORK_CONTAINER = "sync-work"
# Every bucket holds uncompressed rows and one unstaged block while the file is split:
# these sizes keep the split's memory bounded however large the file (at most 160 KB per
# bucket; a block blob takes 50,000 blocks, 6 GB per bucket at this size).
# Larger blocks mean fewer requests (each costs the storage SDK about a millisecond of
# Python): a 1M-row file split in 8.1 s with 64 KB blocks, 7.3 s with 128 KB, 6.8 s with
# 256 KB; but 256 KB blocks are only filled by files of a few million rows, so peak memory
# still grew from 1M rows (218 MB) to 5M (260 MB).
_WORK_BLOCK_BYTES = 128 * 1024
_COMMITTERS = 4
_DELETES_PER_BATCH = 256
_PENDING_BYTES = 32 * 1024
_SEGMENT_BYTES = 4 << 20
LINE_STRIDE = 10**10
"""Lines of the n-th part of a multi-part export are offset by n * LINE_STRIDE."""
_READ_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"


def bucket_of(identity: str, buckets: int) -> int:
    digest = hashlib.blake2b(identity.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def identity_key(raw: Any) -> str:
    """The bucketing key of a raw identity value (mapping validates it later)."""
    return raw.strip().lower() if isinstance(raw, str) else str(raw)


@dataclass
class SplitResult:
    columns: list[str]
    buckets: int
    rows: int = 0
    counts: list[int] = field(default_factory=list)
    malformed: list[Malformed] = field(default_factory=list)
    in_memory: HeldWork | None = None
    """Each bucket's work, when it all fit in memory (else it is in work blobs)."""
    work_blobs: dict[int, str] = field(default_factory=dict)
    settled: list[int] = field(default_factory=list)
    """Rows per bucket settled during the split (core/sync/unchanged.py), in `counts` but
    not `rows` (empty: none)."""
    settled_by_line: int = 0
    """Of those, the rows settled from their line's hash, without parsing them."""
    work_bytes: list[int] = field(default_factory=list)
    """Per bucket, the size of its work lines (inflated)."""

    def work_rows(self, bucket: int) -> int:
        """Rows left to the bucket itself."""
        return self.counts[bucket] - (self.settled[bucket] if self.settled else 0)


Piece = tuple[int, int, int]
"""Where held bytes are: (segment, offset, size)."""


class _Arena:
    """Held work in anonymous memory maps of `_SEGMENT_BYTES`, outside the allocator: a
    segment is unmapped, its memory back with the system, once nothing in it is held.
    (Freed through the allocator, the tens of MB a file held before it spilled stayed with
    the process, and its buckets then ran on top of them: peak memory at 5M rows went
    from 280 to 320 MB.) Appends end before the first release: work is released when it
    is spilled or taken, once the split is done with it."""

    def __init__(self) -> None:
        self._segments: list[mmap.mmap | None] = []
        self._held: list[int] = []  # pieces still held, per segment
        self._used = _SEGMENT_BYTES  # of the last segment: a first append maps one
        self.bytes = 0
        """Appended in all (what is held, until the first release)."""

    def append(self, data: bytes) -> list[Piece]:
        pieces: list[Piece] = []
        self.bytes += len(data)
        view = memoryview(data)
        while view:
            if self._used == _SEGMENT_BYTES:
                self._segments.append(mmap.mmap(-1, _SEGMENT_BYTES))
                self._held.append(0)
                self._used = 0
            index, size = len(self._segments) - 1, min(len(view), _SEGMENT_BYTES - self._used)
            segment = self._segments[index]
            assert segment is not None
            segment[self._used : self._used + size] = view[:size]
            pieces.append((index, self._used, size))
            self._held[index] += 1
            self._used += size
            view = view[size:]
        return pieces

    def read(self, pieces: list[Piece]) -> bytes:
        parts = []
        for index, offset, size in pieces:
            segment = self._segments[index]
            assert segment is not None, "held work read after its release"
            parts.append(segment[offset : offset + size])
        return b"".join(parts)

    def release(self, pieces: list[Piece]) -> None:
        for index, _, _ in pieces:
            self._held[index] -= 1
            segment = self._segments[index]
            if not self._held[index] and segment is not None:
                segment.close()
                self._segments[index] = None

    def close(self) -> None:
        for segment in self._segments:
            if segment is not None:
                segment.close()
        self._segments, self._held, self._used = [], [], _SEGMENT_BYTES


class _BucketFile:
    """One bucket's work as gzip'd JSON Lines, compressed in groups rather than row by row:
    held in memory until the partitioner spills it, then streamed into a block blob.

    Each group is a gzip member of its own (a gzip file may hold many): a compressor kept
    per bucket held about 350 KB of ISA-L's tables, 89 MB of a 1M-row split for 256
    buckets, for 6% better compression than members of `_PENDING_BYTES`."""

    def __init__(self, arena: _Arena) -> None:
        # One growing buffer, not a list of small bytes objects: orjson's results carry
        # their whole initial allocation, which would cost kilobytes per row.
        self.pending = bytearray()
        self.arena = arena
        self.held: list[Piece] = []
        self.writer: BlockWriter | None = None

    def add(self, row: SourceRow) -> int:
        """The row as a work line; returns the line's size."""
        line = work_line(row)
        self.pending += line
        self.pending += b"\n"
        if len(self.pending) >= _PENDING_BYTES:
            self._compress()
        return len(line) + 1

    def add_lines(self, lines: bytes) -> None:
        """Work lines written elsewhere (by the C splitter, a group at a time)."""
        self.pending += lines
        if len(self.pending) >= _PENDING_BYTES:
            self._compress()

    def _compress(self) -> None:
        if self.pending:
            self._emit(isal_zlib.compress(self.pending, 1, 31))
            self.pending.clear()

    def _emit(self, data: bytes) -> None:
        if self.writer is not None:
            self.writer.write(data)
        elif data:
            self.held += self.arena.append(data)

    def spill(self, writer: BlockWriter) -> None:
        """From now on into `writer`, starting with what was held."""
        self.writer = writer
        writer.write(self.arena.read(self.held))
        self.arena.release(self.held)
        self.held = []

    def finish(self) -> None:
        """Everything compressed: held, or handed to the writer, which is left to commit."""
        self._compress()


class HeldWork:
    """Each bucket's work lines, kept in this process: as they are for a small file, else
    gzip'd in an arena (inflated when the bucket is taken)."""

    def __init__(self, lines: list[bytes], held: tuple[_Arena, list[list[Piece]]] | None = None):
        self._lines = lines
        self._arena: _Arena | None = held[0] if held else None
        self._pieces: list[list[Piece]] = held[1] if held else []
        self.compressed = held is not None

    def __len__(self) -> int:
        return len(self._pieces) if self.compressed else len(self._lines)

    def stored(self, bucket: int) -> bytes:
        """A bucket's work as it is held (gzip when `compressed`)."""
        if self._arena is None:
            return self._lines[bucket]
        return self._arena.read(self._pieces[bucket])

    def take(self, bucket: int) -> bytes:
        """A bucket's work lines; memory holds them no longer (a bucket is taken once)."""
        data = self.stored(bucket)
        if self._arena is None:
            self._lines[bucket] = b""
            return data
        self._arena.release(self._pieces[bucket])
        self._pieces[bucket] = []
        return inflate_work(data) if data else data

    def release(self) -> None:
        """Nothing is needed any more (the work is in work blobs now)."""
        if self._arena is not None:
            self._arena.close()
        self._lines, self._pieces = [b""] * len(self), [[] for _ in range(len(self))]


class _Partitioner:
    """Rows into buckets: as they are until `in_memory_max_rows`, then compressed, still in
    memory, until they take `held_max_bytes`; only then spilled to work blobs."""

    def __init__(
        self, storage: Storage, run_id: str, buckets: int, in_memory_max_rows: int,
        held_max_bytes: int,
    ) -> None:  # fmt: skip
        self.storage = storage
        # Work blobs' blocks upload on threads while the file is still being read.
        self.stager = BlockStager()
        self.run_id = run_id
        self.buckets = buckets
        self.limit = in_memory_max_rows
        self.held_max_bytes = held_max_bytes
        self.spilled = False
        self.memory: list[list[SourceRow]] | None = [[] for _ in range(buckets)]
        self.memory_lines: list[bytearray] = [bytearray() for _ in range(buckets)]
        """Work lines from the C splitter, while the file still fits in memory."""
        self.rows = 0
        self.work_bytes = [0] * buckets
        self.files: dict[int, _BucketFile] = {}
        self.names: dict[int, str] = {}
        self.arena = _Arena()

    def add(self, bucket: int, row: SourceRow) -> None:
        self.rows += 1
        if self.memory is None:
            self.work_bytes[bucket] += (self.files.get(bucket) or self._file(bucket)).add(row)
            self._spill_if_full()
            return
        self.memory[bucket].append(row)
        if self.rows > self.limit:
            self._compress_all()

    def add_lines(self, bucket: int, lines: bytes, rows: int) -> None:
        """Work lines of one bucket; `rows`: how many rows the file has given so far."""
        self.rows = rows
        self.work_bytes[bucket] += len(lines)
        if self.memory is None:
            (self.files.get(bucket) or self._file(bucket)).add_lines(lines)
            self._spill_if_full()
            return
        self.memory_lines[bucket] += lines
        if self.rows > self.limit:
            self._compress_all()

    def _compress_all(self) -> None:
        assert self.memory is not None
        kept_rows, self.memory = self.memory, None
        for bucket, rows in enumerate(kept_rows):
            for row in rows:
                self.work_bytes[bucket] += self._file(bucket).add(row)
        kept_lines, self.memory_lines = self.memory_lines, []
        for bucket, lines in enumerate(kept_lines):
            if lines:
                self._file(bucket).add_lines(bytes(lines))
        self._spill_if_full()

    def _spill_if_full(self) -> None:
        if self.spilled or self.arena.bytes <= self.held_max_bytes:
            return
        self.spilled = True
        for bucket, bucket_file in self.files.items():
            bucket_file.spill(self._writer(bucket))
        self.arena.close()

    def _file(self, bucket: int) -> _BucketFile:
        if bucket not in self.files:
            self.files[bucket] = _BucketFile(self.arena)
            if self.spilled:
                self.files[bucket].spill(self._writer(bucket))
        return self.files[bucket]

    def _writer(self, bucket: int) -> BlockWriter:
        name = f"{self.run_id}/bucket-{bucket:04d}.jsonl.gz"
        self.names[bucket] = name
        return self.storage.blobs.writer(
            WORK_CONTAINER, name, overwrite=True, block_bytes=_WORK_BLOCK_BYTES,
            stager=self.stager,
        )  # fmt: skip

    def close(self) -> HeldWork | None:
        """Commit every work blob, several at a time (each is a round trip or two); or,
        if nothing was spilled, each bucket's work as it is held."""
        try:
            for bucket_file in self.files.values():
                bucket_file.finish()
            self._spill_if_full()
            writers = [f.writer for f in self.files.values() if f.writer is not None]
            with ThreadPoolExecutor(_COMMITTERS, thread_name_prefix="commit-work") as pool:
                for _ in pool.map(BlockWriter.close, writers):
                    pass
        finally:
            self.stager.close()
        if self.spilled:
            return None
        if self.memory is not None:
            for bucket, rows in enumerate(self.memory):
                for row in rows:
                    self.memory_lines[bucket] += work_line(row) + b"\n"
            self.work_bytes = [len(lines) for lines in self.memory_lines]
            return HeldWork([bytes(lines) for lines in self.memory_lines])
        held = [self.files[b].held if b in self.files else [] for b in range(self.buckets)]
        return HeldWork([], (self.arena, held))

    def abandon(self) -> None:
        """The file was rejected: wait for blocks in flight, commit nothing."""
        self.stager.close()
        self.arena.close()


def line_label(line: int, parts: list[str]) -> str:
    """`15`, or `export_2.csv:15` in a run over several parts."""
    if len(parts) <= 1:
        return str(line)
    part, number = divmod(line, LINE_STRIDE)
    return f"{posixpath.basename(parts[part])}:{number}"


def split_file(
    storage: Storage,
    sync: SyncDefinition,
    blobs: list[BlobRef],
    *,
    run_id: str,
    buckets: int,
    in_memory_max_rows: int,
    held_max_bytes: int,
    native: bool = True,
    unchanged: UnchangedIndex | None = None,
    limits: InputLimits = DEFAULT_LIMITS,
) -> SplitResult:
    """Read every part once; raises FileRejected when the input is unusable as a whole
    (a record or field over `limits` included).

    Rows of part n carry `n * LINE_STRIDE + line` as their line, so lines stay unique.
    CSV and TSV are split by C (native/switchboard_sync.c) when `native`; a file it does
    not take (malformed quoting, lone carriage returns) is split again by the reference.
    With `unchanged`, the C splitter settles rows acknowledged before exactly as they are
    (core/sync/unchanged.py).
    """
    readers: list[_Reader] = [functools.partial(_read_parts, limits=limits)]
    if native and SPEEDUPS is not None and _splits_natively(sync):
        native_read = functools.partial(_read_parts_native, unchanged=unchanged, limits=limits)
        readers.insert(0, native_read)
    for read in readers:
        partitioner = _Partitioner(storage, run_id, buckets, in_memory_max_rows, held_max_bytes)
        try:
            result = read(storage, sync, blobs, buckets, partitioner)
        except ReferenceNeeded:
            partitioner.abandon()
            if unchanged is not None:
                unchanged.abandon_lines()
            log.info("segment file split again by the reference", extra={"run_id": run_id})
            continue
        except BaseException:
            partitioner.abandon()
            if unchanged is not None:
                unchanged.abandon_lines()
            raise
        result.in_memory = partitioner.close()
        result.rows = partitioner.rows
        result.work_blobs = partitioner.names
        result.work_bytes = partitioner.work_bytes
        if unchanged is not None:
            unchanged.line_index()  # the state is read ahead, however the file was split
        return result
    raise AssertionError("the reference takes every file")


def _splits_natively(sync: SyncDefinition) -> bool:
    """CSV and TSV whose delimiter is one ASCII character (C splits bytes)."""
    delimiter = sync.input.field_delimiter
    return sync.input.format != FileFormat.JSONL and len(delimiter.encode()) == 1


_Reader = Callable[[Storage, SyncDefinition, list[BlobRef], int, _Partitioner], SplitResult]


_READ_AHEAD_CHUNKS = 2


class ReferenceNeeded(Exception):
    """The C splitter met input it leaves to the reference (the file is split again)."""


def read_header(
    text: IO[bytes], delimiter: str, limits: InputLimits = DEFAULT_LIMITS
) -> tuple[list[str], bytes, bytes]:
    """The header's columns, the bytes read after it, and the header line (without its
    line break: what the part's line hashes are seeded with)."""
    buffer = b""
    while b"\n" not in buffer:
        if len(buffer) > limits.max_line_bytes:
            raise ReferenceNeeded  # which rejects it, or says it is not UTF-8
        chunk = text.read(_READ_BYTES)
        if not chunk:
            break
        buffer += chunk
    buffer = buffer.removeprefix(_BOM)
    end = buffer.find(b"\n")
    line, rest = (buffer, b"") if end < 0 else (buffer[: end + 1], buffer[end + 1 :])
    header_line = line.removesuffix(b"\n").removesuffix(b"\r")
    if line.count(b'"') % 2 or b"\r" in header_line or len(line) > limits.max_line_bytes:
        raise ReferenceNeeded  # a quoted line break in the header, a lone CR, too long
    try:
        header = next(
            csv.reader([header_line.decode("utf-8")], delimiter=delimiter, strict=True), None
        )
    except csv.Error:
        # Quotes csv reads its own way (`x"y`, `"a"b`), maybe with a quoted line break:
        # the reference reads the header as the file goes on, and gives the verdict.
        raise ReferenceNeeded from None
    if header is None or not line:  # a blank first line is a header of no columns
        raise FileRejected("empty_file", "file has no header line")
    return header_columns(header), rest, header_line


def _read_parts_native(
    storage: Storage,
    sync: SyncDefinition,
    blobs: list[BlobRef],
    buckets: int,
    partitioner: _Partitioner,
    *,
    unchanged: UnchangedIndex | None = None,
    limits: InputLimits = DEFAULT_LIMITS,
) -> SplitResult:
    result: SplitResult | None = None
    splitter: Any = None
    settling = False
    with _file_errors():
        for part, blob in enumerate(blobs):
            # Chunks are fetched ahead: the requests overlap with the splitting.
            text = decompressed(storage.blobs.open_reader(blob, ahead=_READ_AHEAD_CHUNKS))
            columns, data, header = read_header(text, sync.input.field_delimiter, limits)
            result = _part_result(result, sync, columns, buckets, blob)
            if splitter is None:
                splitter = SPEEDUPS.Splitter(
                    len(columns), columns.index(sync.identity.column),
                    sync.input.field_delimiter, buckets, _PENDING_BYTES, identity_key,
                )  # fmt: skip
                splitter.limits(limits.max_line_bytes, limits.max_field_bytes)
                settling = unchanged is not None and unchanged.attach(splitter, columns, buckets)
            splitter.line_seed(header)
            for malformed, ready in feed_splitter(splitter, text, data, part * LINE_STRIDE + 2):
                result.malformed += malformed
                for bucket, lines in ready:
                    partitioner.add_lines(bucket, lines, splitter.rows)
                if unchanged is not None:
                    unchanged.keep_lines(splitter)
                    unchanged.take_excluded(splitter, columns)
        assert result is not None and splitter is not None  # at least one part
        for bucket, lines in splitter.drain():
            partitioner.add_lines(bucket, lines, splitter.rows)
        if unchanged is not None:
            unchanged.keep_lines(splitter)
            unchanged.take_excluded(splitter, result.columns)
            unchanged.commit_lines()
        result.counts = splitter.counts()
        if settling:
            assert unchanged is not None
            result.settled_by_line = splitter.settled_by_line
            result.settled = [0] * buckets
            for bucket, settled in unchanged.settled(splitter).items():
                partitioner.add_lines(bucket, settled.line(), splitter.rows)  # the last line
                result.counts[bucket] += settled.rows
                result.settled[bucket] = settled.rows
        partitioner.rows = splitter.rows
    return result


def feed_splitter(
    splitter: Any, text: IO[bytes], data: bytes, line: int, read_bytes: int = _READ_BYTES
) -> Iterator[tuple[list[Malformed], list[tuple[int, bytes]]]]:
    """Feed the rest of a part (`data`, then `text`) to a switchboard_sync.Splitter, a
    chunk at a time; yields each chunk's (malformed rows, work lines ready per bucket).
    Raises ReferenceNeeded for input the splitter leaves to the reference, and
    UnicodeDecodeError (the reference's) for text that is not UTF-8."""
    while True:
        chunk = text.read(read_bytes)
        final = not chunk
        data += chunk
        fed = splitter.feed(data, line, final)
        if fed is None:
            raise ReferenceNeeded
        consumed, line, malformed, ready, bad_utf8 = fed
        yield malformed, ready
        if bad_utf8 >= 0:
            data[bad_utf8:].decode("utf-8")  # raises with the reference's reason
            raise ReferenceNeeded  # it did not: the decoder knows best
        data = data[consumed:]
        if final:
            return


def _part_result(
    result: SplitResult | None, sync: SyncDefinition, columns: list[str], buckets: int,
    blob: BlobRef,
) -> SplitResult:  # fmt: skip
    """The split's result once a part's header is read: new at the first part, checked
    against the first part's columns after it."""
    if result is None:
        if sync.identity.column not in columns:
            raise FileRejected(
                "missing_column", f"identity column {sync.identity.column!r} is not in the file"
            )
        return SplitResult(columns, buckets, counts=[0] * buckets)
    if columns != result.columns:
        raise FileRejected("parts_differ", f"{blob.name} has other columns than part 1")
    return result


@contextlib.contextmanager
def _file_errors() -> Iterator[None]:
    """A file that cannot be decoded or decompressed is rejected as a whole."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise FileRejected(
            "not_utf8",
            f"file is not valid UTF-8 ({exc.reason}); export it as UTF-8, nothing was sent",
        ) from None
    except DECOMPRESSION_ERRORS as exc:
        raise FileRejected("corrupt_compression", f"cannot decompress the file: {exc}") from None


def _read_parts(
    storage: Storage,
    sync: SyncDefinition,
    blobs: list[BlobRef],
    buckets: int,
    partitioner: _Partitioner,
    *,
    limits: InputLimits = DEFAULT_LIMITS,
) -> SplitResult:
    result: SplitResult | None = None
    with _file_errors():
        for part, blob in enumerate(blobs):
            reader = RowReader(
                storage.blobs.open_reader(blob), sync.input, RowMapper.wanted_columns(sync),
                limits,
            )  # fmt: skip
            result = _part_result(result, sync, reader.columns, buckets, blob)
            identity_index = result.columns.index(sync.identity.column)
            offset = part * LINE_STRIDE
            for entry in reader:
                if isinstance(entry, tuple):
                    result.malformed.append((offset + entry[0], entry[1], entry[2]))
                    continue
                if offset:
                    entry = SourceRow(offset + entry.line, entry.values, entry.raw)
                bucket = bucket_of(identity_key(entry.values[identity_index]), buckets)
                result.counts[bucket] += 1
                partitioner.add(bucket, entry)
    assert result is not None  # at least one part
    return result


def upload_held_work(storage: Storage, run_id: str, held: HeldWork) -> dict[int, str]:
    """Work held in memory, as work blobs for the workers of a run that fans out: one
    request per bucket, a few at a time. Returns bucket -> blob name."""
    assert held.compressed, "files small enough to keep as they are never fan out"
    names = {
        bucket: f"{run_id}/bucket-{bucket:04d}.jsonl.gz"
        for bucket in range(len(held)) if held.stored(bucket)
    }  # fmt: skip

    def upload(bucket: int) -> None:
        storage.blobs.create(WORK_CONTAINER, names[bucket], held.stored(bucket), overwrite=True)

    with ThreadPoolExecutor(_COMMITTERS, thread_name_prefix="upload-work") as pool:
        for _ in pool.map(upload, names):
            pass
    held.release()
    return names


def fetch_work_blob(storage: Storage, name: str) -> bytes:
    """A bucket's work blob as stored (gzip): a worker fetches the next bucket's on a
    thread while it runs this one."""
    found = storage.blobs.read_versioned(WORK_CONTAINER, name)
    if found is None:
        raise LookupError(f"work blob {WORK_CONTAINER}/{name} is gone")
    return found[0]


def inflate_work(data: bytes) -> bytes:
    """A fetched work blob's lines (all its gzip members): inflated in one call (a bucket
    is a few MB at most, and gzip's line reader costs more per row than the rest)."""
    lines: bytes = igzip.decompress(data)  # type: ignore[no-untyped-call]
    return lines


def work_line(row: SourceRow) -> bytes:
    """`[line, value, ...]`, and the record's text after the values when it has one."""
    if row.raw is None:
        return orjson.dumps([row.line, *row.values])
    return orjson.dumps([row.line, *row.values, row.raw])


def work_rows(lines: bytes, width: int) -> Iterator[SourceRow]:
    """The rows of a work blob's lines (of `width` values each), one by one."""
    for line in io.BytesIO(lines):
        line_number, *values = orjson.loads(line)
        raw = values.pop() if len(values) > width else None
        yield SourceRow(line_number, values, raw)


def delete_work(storage: Storage, run_id: str) -> None:
    """Remove a run's work blobs, up to 256 per request (the Blob Batch API): deleting
    them one by one was most of a large run's finalising. A blob already gone (a
    concurrent finisher got it) is fine."""
    container = storage.blob_service.get_container_client(WORK_CONTAINER)
    names = [blob.name for blob in storage.blobs.list(WORK_CONTAINER, f"{run_id}/")]
    for start in range(0, len(names), _DELETES_PER_BATCH):
        batch = names[start : start + _DELETES_PER_BATCH]
        for reply in container.delete_blobs(*batch, raise_on_any_failure=False):
            if reply.status_code not in (202, 404):
                raise StorageError(f"deleting work blobs of run {run_id}: {reply.status_code}")
