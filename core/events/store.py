"""The engagement event store: gzip JSON Lines segments in Blob storage, indexed by
ingestion hour in Table storage, deduplicated on event id.

    blob  events/segments/{source}/{segment_id}.jsonl.gz  one per source unit (a Currents file)
    blob  events/dedup/v1/{event hour}/{shard}.bin        16-byte records: blake2b-8 of an
                                                          event id + blake2b-8 of its segment
    table eventsegments     PK ingestion hour YYYYMMDDHH, RK segment id; RK `~hour` guards the hour
    table eventsegmentids   PK segment id: the hour a segment is (being) placed under

Why segments and not one table row per event: millions of events a day would be millions
of table transactions to write and as many entities to page through per export window; a
segment is one blob write, and a window is a range query over a handful of hour partitions
(docs/decisions.md, "Event store").

Exactly once:
- Duplicates. An event id belongs to the first segment that claims it in the dedup shard of
  its event hour (a re-delivered event has the same id and the same event time). A segment
  keeps only events it owns; rewriting the same segment after a crash finds its own claims.
- Placement in time. A segment becomes visible in one ingestion hour in a transaction that
  also updates that hour's guard row. A reader (the log export) seals the hours it reads
  first; a placement racing the seal fails on the guard's ETag and moves to a later hour,
  so no segment lands in an hour that has already been read.
- A segment id is written by one writer at a time (callers claim their unit of work first).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import zlib
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import orjson
from isal import isal_zlib

from core.errors import ConcurrencyConflict, EntityExists
from core.events.model import EngagementEvent
from core.storage import Storage
from core.storage.tables import EntityTable, TableEntity, safe_key

EVENTS_CONTAINER = "events"
DEDUP_SHARDS = 16
_DIGEST_BYTES = 8
_RECORD_BYTES = 2 * _DIGEST_BYTES
_GUARD = "~hour"
_HOUR_MS = 3_600_000
_FLUSH_BYTES = 1 << 20
_CONTENDED_ATTEMPTS = 30
_PARALLEL_IO = 8


def hour_key(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H")


def hour_start(key: str) -> datetime:
    return datetime.strptime(key, "%Y%m%d%H").replace(tzinfo=UTC)


def hours_between(start: datetime, end: datetime) -> list[str]:
    """Hour keys of [start, end), both aligned to hours."""
    keys, moment = [], start
    while moment < end:
        keys.append(hour_key(moment))
        moment += timedelta(hours=1)
    return keys


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=_DIGEST_BYTES).digest()


class SegmentEntry(TableEntity):
    """Table `eventsegments`: a placed segment, or (RowKey `~hour`) the hour's guard row."""

    table_name: ClassVar[str] = "eventsegments"

    blob: str = ""
    source: str = ""
    events: int = 0
    committed_at: datetime | None = None
    sealed: bool = False
    """Guard rows: a reader has read this hour; nothing may be placed in it any more."""
    commits: int = 0
    """Guard rows: segments placed in the hour (bumped by each placement, for its ETag)."""


class SegmentPlacement(TableEntity):
    """Table `eventsegmentids`: where a segment is (being) placed, written before placing."""

    table_name: ClassVar[str] = "eventsegmentids"

    hour: str


@dataclass
class SegmentStats:
    offered: int = 0
    stored: int = 0
    duplicates_in_segment: int = 0
    duplicates_in_store: int = 0


@dataclass(frozen=True)
class PlacedSegment:
    segment_id: str
    hour: str | None
    """None when nothing was left to store (every event was a duplicate)."""
    blob: str | None
    stats: SegmentStats
    already_placed: bool = False


@dataclass
class _Shard:
    owners: dict[bytes, bytes]
    data: bytes = b""
    etag: str | None = None
    """As read: a claim first tries to write on top of this version."""


class _DedupIndex:
    """The dedup shards, loaded lazily and cached for one writer."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._cache: dict[tuple[str, int], _Shard] = {}

    @staticmethod
    def blob_name(hour: str, shard: int) -> str:
        return f"dedup/v1/{hour}/{shard:02d}.bin"

    def owner(self, hour: str, shard: int, digest: bytes) -> bytes | None:
        loaded = self._cache.get((hour, shard))
        if loaded is None:
            self._load_hour(hour)
            loaded = self._cache[(hour, shard)]
        return loaded.owners.get(digest)

    def _read(self, name: str) -> _Shard:
        found = self._store.storage.blobs.read_versioned(EVENTS_CONTAINER, name)
        return _Shard(_parse_shard(found[0]), *found) if found else _Shard({})

    def _load_hour(self, hour: str) -> None:
        """All shards of an event hour at once: one listing, then the existing ones in
        parallel (a file's events touch every shard of their hour anyway)."""
        blobs = self._store.storage.blobs
        existing = [ref.name for ref in blobs.list(EVENTS_CONTAINER, f"dedup/v1/{hour}/")]
        with ThreadPoolExecutor(_PARALLEL_IO) as pool:
            loaded = dict(zip(existing, pool.map(self._read, existing), strict=True))
        for shard in range(DEDUP_SHARDS):
            name = self.blob_name(hour, shard)
            self._cache[(hour, shard)] = loaded.get(name) or _Shard({})

    def claim_all(self, claims: dict[tuple[str, int], list[bytes]], owner: bytes) -> set[bytes]:
        """Claim every listed id for `owner` (shards in parallel); returns the ids another
        segment owns already."""
        with ThreadPoolExecutor(_PARALLEL_IO) as pool:
            lost = pool.map(
                lambda item: self._claim(item[0][0], item[0][1], item[1], owner), claims.items()
            )
            return set().union(*lost)

    def _claim(self, hour: str, shard: int, digests: list[bytes], owner: bytes) -> set[bytes]:
        name = self.blob_name(hour, shard)
        current = self._cache.get((hour, shard)) or self._read(name)
        for _ in range(_CONTENDED_ATTEMPTS):
            owners = current.owners
            lost = {d for d in digests if owners.get(d, owner) != owner}
            missing = [d for d in dict.fromkeys(digests) if d not in owners]
            if not missing:
                return lost
            try:
                self._store.storage.blobs.write_versioned(
                    EVENTS_CONTAINER,
                    name,
                    current.data + b"".join(d + owner for d in missing),
                    current.etag,
                )
                return lost
            except ConcurrencyConflict:
                current = self._read(name)  # another writer got there first: merge again
        raise ConcurrencyConflict(f"dedup shard {name} still contended")


def _parse_shard(data: bytes) -> dict[bytes, bytes]:
    view = memoryview(data)
    return {
        bytes(view[i : i + _DIGEST_BYTES]): bytes(view[i + _DIGEST_BYTES : i + _RECORD_BYTES])
        for i in range(0, len(data) - len(data) % _RECORD_BYTES, _RECORD_BYTES)
    }


class SegmentWriter:
    """Collects one segment's events (stored form), dropping duplicates, then places it.

    Per event it keeps only 16 bytes (the id's hash and the event hour, in arrays), so its
    memory does not grow with the size of the file it reads: duplicates within the
    segment are found when it is placed, and the rare segment that has some is rewritten.
    """

    def __init__(self, store: EventStore, source: str, segment_id: str) -> None:
        self._store = store
        self.source = source
        self.segment_id = segment_id
        self.stats = SegmentStats()
        self._owner = _digest(segment_id)
        self._dedup = _DedupIndex(store)
        self._digests = array("Q")
        self._hours = array("q")
        self.blob = f"segments/{safe_key(source)}/{segment_id}.jsonl.gz"
        self._writer = store.storage.blobs.writer(
            EVENTS_CONTAINER,
            self.blob,
            overwrite=True,
            content_type="application/x-ndjson",
            block_bytes=_FLUSH_BYTES,  # small blocks: a large segment costs no more memory
        )
        self._gzip = zlib.compressobj(3, zlib.DEFLATED, 31)
        self._buffer = bytearray()

    def add(self, event: dict[str, Any]) -> bool:
        """Offer one event in stored form; False if another segment owns its id already.

        A repeat of an event earlier in this same segment is dropped when placing.
        """
        if not self.admit(event):
            return False
        self._buffer += orjson.dumps(event)
        self._buffer += b"\n"
        if len(self._buffer) >= _FLUSH_BYTES:
            self._flush()
        self.stats.stored += 1
        return True

    def admit(self, event: dict[str, Any]) -> bool:
        """The dedup decision against the store for one event (its id noted for claiming)."""
        self.stats.offered += 1
        digest = _digest(event["event_id"])
        hour_index = event["occurred_at"] // _HOUR_MS
        owner = self._dedup.owner(_hour_name(hour_index), digest[0] % DEDUP_SHARDS, digest)
        if owner is not None and owner != self._owner:
            self.stats.duplicates_in_store += 1
            return False
        self._digests.append(int.from_bytes(digest, "big"))
        self._hours.append(hour_index)
        return True

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write(self._gzip.compress(bytes(self._buffer)))
            self._buffer.clear()

    def place(self) -> PlacedSegment:
        """Commit the blob, claim the events' ids, and make the segment visible."""
        self._flush()
        self._writer.write(self._gzip.flush())
        self._writer.close()
        ordered = sorted(self._digests)
        repeated = {a for a, b in itertools.pairwise(ordered) if a == b}
        del ordered
        claims: dict[tuple[str, int], list[bytes]] = {}
        for value, hour_index in zip(self._digests, self._hours, strict=True):
            digest = value.to_bytes(_DIGEST_BYTES, "big")
            key = (_hour_name(hour_index), digest[0] % DEDUP_SHARDS)
            claims.setdefault(key, []).append(digest)
        lost = {int.from_bytes(d, "big") for d in self._dedup.claim_all(claims, self._owner)}
        del claims
        blob = self.blob
        if lost or repeated:  # keep each id once, and only the ids this segment owns
            blob, dropped_repeats = self._rewrite(lost, repeated)
            self.stats.stored -= len(lost) + dropped_repeats
            self.stats.duplicates_in_store += len(lost)
            self.stats.duplicates_in_segment += dropped_repeats
        if self.stats.stored == 0:
            self._store.storage.blobs.delete(EVENTS_CONTAINER, blob)
            return PlacedSegment(self.segment_id, None, None, self.stats)
        return self._store.place(self.segment_id, self.source, blob, self.stats)

    def _rewrite(self, lost: set[int], repeated: set[int]) -> tuple[str, int]:
        """The segment again, without `lost` ids and with each `repeated` one once."""
        blobs = self._store.storage.blobs
        source = blobs.ref(EVENTS_CONTAINER, self.blob)
        target = self.blob.replace(".jsonl.gz", ".kept.jsonl.gz")
        gzip = zlib.compressobj(3, zlib.DEFLATED, 31)
        written: set[int] = set()
        dropped_repeats = 0
        with blobs.writer(EVENTS_CONTAINER, target, overwrite=True) as writer:
            for line in _gzip_lines(blobs.iter_chunks(source)):
                value = int.from_bytes(_digest(orjson.loads(line)["event_id"]), "big")
                if value in lost:
                    continue
                if value in repeated:
                    if value in written:
                        dropped_repeats += 1
                        continue
                    written.add(value)
                writer.write(gzip.compress(line + b"\n"))
            writer.write(gzip.flush())
        blobs.delete(EVENTS_CONTAINER, self.blob)
        return target, dropped_repeats


@functools.cache
def _hour_name(hour_index: int) -> str:
    return datetime.fromtimestamp(hour_index * 3600, UTC).strftime("%Y%m%d%H")


def _gzip_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    inflate = zlib.decompressobj(31)
    rest = b""
    for chunk in chunks:
        data = rest + inflate.decompress(chunk)
        *lines, rest = data.split(b"\n")
        yield from (line for line in lines if line)
    rest += inflate.flush()
    if rest.strip():
        yield rest


@dataclass
class EventStore:
    storage: Storage
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        self.index: EntityTable[SegmentEntry] = self.storage.tables.get(SegmentEntry)
        self.placements: EntityTable[SegmentPlacement] = self.storage.tables.get(SegmentPlacement)

    def writer(self, source: str, segment_id: str) -> SegmentWriter:
        return SegmentWriter(self, source, segment_id)

    def placed(self, segment_id: str) -> SegmentEntry | None:
        """The index entry of a segment placed earlier, if any."""
        placement = self.placements.get(safe_key(segment_id), "placement")
        if placement is None:
            return None
        found = self.index.get(placement.entity.hour, safe_key(segment_id))
        return found.entity if found else None

    def place(self, segment_id: str, source: str, blob: str, stats: SegmentStats) -> PlacedSegment:
        """Make a committed segment blob visible in the current (unsealed) ingestion hour."""
        earlier = self.placed(segment_id)
        if earlier is not None:  # placed before a crash or by an earlier attempt
            return PlacedSegment(segment_id, earlier.partition_key, earlier.blob, stats, True)
        key = safe_key(segment_id)
        for _ in range(_CONTENDED_ATTEMPTS):
            now = self.clock()
            hour = hour_key(now)
            guard = self.index.get(hour, _GUARD)
            while guard is not None and guard.entity.sealed:  # read already: use a later hour
                hour = hour_key(hour_start(hour) + timedelta(hours=1))
                guard = self.index.get(hour, _GUARD)
            # Recorded first: after a crash, the retry looks for the segment in this hour.
            self.placements.upsert(
                SegmentPlacement(partition_key=key, row_key="placement", hour=hour)
            )
            commits = guard.entity.commits + 1 if guard else 1
            entry = SegmentEntry(
                partition_key=hour, row_key=key, blob=blob, source=source,
                events=stats.stored, committed_at=max(now, hour_start(hour)),
            )  # fmt: skip
            new_guard = SegmentEntry(partition_key=hour, row_key=_GUARD, commits=commits)
            try:
                self.index.transact(
                    [
                        ("replace", new_guard, guard.etag)
                        if guard
                        else ("create", new_guard, None),
                        ("create", entry, None),
                    ]
                )
            except (ConcurrencyConflict, EntityExists):
                if self.index.get(hour, key) is not None:  # a concurrent retry placed it
                    return PlacedSegment(segment_id, hour, blob, stats, True)
                continue
            return PlacedSegment(segment_id, hour, blob, stats)
        raise ConcurrencyConflict(f"could not place segment {segment_id}: hour guard contended")

    # -- reading -------------------------------------------------------------------------

    def seal(self, start: datetime, end: datetime) -> None:
        """Close the ingestion hours of [start, end) to new segments (before reading them)."""

        def sealed(hour: str) -> Callable[[SegmentEntry | None], SegmentEntry | None]:
            def change(current: SegmentEntry | None) -> SegmentEntry | None:
                if current is not None and current.sealed:
                    return None
                base = current or SegmentEntry(partition_key=hour, row_key=_GUARD)
                return base.model_copy(update={"sealed": True})

            return change

        for hour in hours_between(start, end):
            self.index.mutate(hour, _GUARD, sealed(hour))

    def first_hour(self) -> datetime | None:
        """The oldest ingestion hour the store has a guard row for (None when empty)."""
        page = self.index.query_page("RowKey eq @guard", {"guard": _GUARD}, page_size=1)
        return hour_start(page.items[0].partition_key) if page.items else None

    def segments(self, start: datetime, end: datetime) -> Iterator[SegmentEntry]:
        """Segments placed in the ingestion hours of [start, end), in hour order."""
        keys = hours_between(start, end)
        if not keys:
            return
        rows = self.index.query(
            "PartitionKey ge @lo and PartitionKey le @hi and RowKey ne @guard",
            {"lo": keys[0], "hi": keys[-1], "guard": _GUARD},
        )
        yield from sorted(rows, key=lambda r: (r.partition_key, r.row_key))

    def read_segment(self, entry: SegmentEntry) -> Iterator[EngagementEvent]:
        ingested_at = entry.committed_at or hour_start(entry.partition_key)
        for data in self.read_segment_stored(entry):
            yield EngagementEvent.from_stored(data, ingested_at)

    def segment_data(self, entry: SegmentEntry) -> bytes:
        """A segment's JSON Lines, downloaded and inflated whole (a segment is a few MB; bulk
        readers fetch the next one on a thread while working on this one)."""
        blobs = self.storage.blobs
        inflate = isal_zlib.decompressobj(31)  # ISA-L: zlib's inflate, about twice as fast
        parts = [inflate.decompress(chunk) for chunk in blobs.iter_chunks(
            blobs.ref(EVENTS_CONTAINER, entry.blob))]  # fmt: skip
        parts.append(inflate.flush())
        return b"".join(parts)

    def read_segment_stored(self, entry: SegmentEntry) -> Iterator[dict[str, Any]]:
        """A segment's events in stored form, unvalidated (for bulk readers)."""
        blobs = self.storage.blobs
        for line in _gzip_lines(blobs.iter_chunks(blobs.ref(EVENTS_CONTAINER, entry.blob))):
            yield orjson.loads(line)

    def read_window(self, start: datetime, end: datetime) -> Iterator[EngagementEvent]:
        """Every stored event ingested in [start, end)."""
        for entry in self.segments(start, end):
            yield from self.read_segment(entry)
