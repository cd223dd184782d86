"""What the destination already has from us: the delta state of one sync, per bucket.

Per profile: an 8-byte digest of the raw source values last acknowledged (a row whose raw
values are unchanged needs no typing or diffing at all), an 8-byte hash of every
attribute value acknowledged (so only changed attributes are sent), and the audiences
Switchboard itself added (only those are ever removed).

State is split into the same identity-hash buckets as the input. A bucket's state is a
base, then the sections later runs appended, each a header line and the binary records
of the profiles that run changed (core/sync/state_codec.py says how: a later record of an
identity replaces its earlier one, and the last header is the one that counts), each
compressed on its own. Once the sections outgrow half the base (or there are
`_MAX_SECTIONS`), the next write rewrites the whole. A header records the mapping's
fingerprint; raw digests from another mapping are ignored (attribute hashes still hold).

Where it is stored: each worker of a run writes the state of the buckets it changed into
one pack blob, `sync-state/{sync_id}/{destination}/packs/{run}-{id}.gz`, a compressed
section per bucket in bucket order; the table `syncstate` has a pointer per bucket naming its
parts (blob, offset, length). Reading many buckets then takes a ranged read per few
megabytes (`StateReader`), and writing them a few requests per hundred buckets
(`PackWriter`), where a blob per bucket took three requests per bucket. The pointer's
ETag is the bucket's version: a write names the one its state was loaded at, so two
writers of the same bucket cannot both win. Packs no pointer names are deleted later
(`collect_garbage`). A bucket blob from before packs (`bucket-{n:04d}.jsonl.gz`) is still
read, and its bucket's next write moves it into a pack.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import mmap
import threading
import uuid
from binascii import unhexlify
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any, ClassVar, NamedTuple, cast

import orjson
from azure.storage.blob import BlobBlock
from xxhash import xxh64_digest

from core.errors import (
    ConcurrencyConflict,
    ConfigError,
    CorruptState,
    EntityExists,
    StorageError,
)
from core.storage import Storage
from core.storage.blobs import BlobRef, BlockWriter
from core.storage.tables import EntityTable, TableEntity, safe_key
from core.sync import state_codec
from core.sync.lines import LineIndexes
from core.sync.speedups import SPEEDUPS
from core.sync.state_codec import (
    DIGESTS_SINCE,
    FORMAT_VERSION,
    TEXT_VERSIONS,
    TableIndex,
    Tables,
)

log = logging.getLogger(__name__)
STATE_CONTAINER = "sync-state"
_INDEX_VERSION = 3
_INDEX_READERS = 4
_INDEX_BLOCK_BYTES = 1 << 20
"""Staged as it fills: a worker holds about this much of its index file at a time."""
_MAX_SECTIONS = 32
_QUEUED_TEXT_BYTES = 4 << 20
_BLOCK_BYTES = 64 << 20
_PACKS = "packs/"
_LEGACY_PREFIX = "bucket-"
_SPAN_BYTES = 8 << 20
"""A ranged read of state: 20 buckets' at 1M profiles, 4 at 5M."""
_SPAN_GAP_BYTES = 256 << 10
_POINTERS_PER_TRANSACTION = 100
"""A table transaction's limit: a pack is committed at least this often."""
_FLUSH_BYTES = 4 << 20
"""Compressed state a pack writer holds before it commits what it has."""
_QUEUED_BATCHES = 2
"""Batches a pack writer holds waiting for their commit before adding waits too."""
_NULL_HASH = b"\x00" * 8


def value_hash(value: Any) -> bytes:
    """Stable 8-byte hash of a JSON value (key order does not matter): XXH64 of a typed
    text, fast enough for every attribute of every row (BLAKE2b was half a row's cost)."""
    kind = type(value)
    # Typed prefixes keep "1", 1, 1.0 and True apart; scalars skip the JSON encoder.
    if kind is str:
        text = "s" + value
    elif kind is bool:
        text = "b1" if value else "b0"
    elif kind is int:
        text = "i" + str(value)
    elif kind is float:
        text = "f" + repr(value)
    else:
        return xxh64_digest(b"j" + orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
    return xxh64_digest(text.encode())


def raw_digest(values: Sequence[Any]) -> bytes:
    """Digest of a row's raw source values (those the mapping reads): XXH64 of one JSON
    encoding of the list, so no Python work per value (this runs for every row of every
    file; BLAKE2b was a third of the split's time once rows were settled there)."""
    return xxh64_digest(orjson.dumps(values))


class ProfileState:
    """One profile's acknowledged state.

    Loaded lazily: a profile read from a snapshot keeps its stored record, and its
    attribute hashes and audiences stay unread inside it until a row needs them. A
    profile no row touched is written back as that same record, with no work per profile;
    in a typical run that is nearly all of them.
    """

    __slots__ = (
        "_at", "_audiences", "_hashes", "_stored", "_tables", "_verbatim", "changed", "digest",
    )  # fmt: skip

    def __init__(
        self, digest: bytes | None = None, stored: bytes = b"", at: int = 0,
        verbatim: bool = False, tables: Tables | None = None,
    ) -> None:  # fmt: skip
        self.digest = digest
        self._stored = stored
        """The stored record (format 6, with `tables`) or line (before); its attributes
        from `at` on. Empty: a new profile."""
        self._at = at
        self._tables = tables
        self._verbatim = verbatim
        """Whether the record can be written back as it is (nothing changed since)."""
        self.changed = not stored
        """Whether this run changed it (it goes in the section a run appends)."""
        self._hashes: dict[str, bytes] | None = None if stored else {}
        self._audiences: set[str] | None = None if stored else set()

    def _parse(self) -> None:
        """Read when first needed (most profiles never are); a damaged record raises
        CorruptState then, as a damaged section does when the state is read."""
        try:
            if self._tables is not None:
                self._hashes, self._audiences = state_codec.read_tail(
                    self._stored, self._at, self._tables
                )
            else:  # a line of format 5 or before
                hashes, audiences = orjson.loads(memoryview(self._stored)[self._at :])
                self._hashes = {name: bytes.fromhex(h) for name, h in hashes.items()}
                self._audiences = set(audiences)
        except _UNREADABLE as exc:
            raise CorruptState(f"a stored profile cannot be read ({type(exc).__name__})") from None
        self._stored, self._verbatim = b"", False

    @property
    def hashes(self) -> dict[str, bytes]:
        """The attribute hashes, for reading or changing (either way the record is rebuilt)."""
        if self._hashes is None:
            self._parse()
        assert self._hashes is not None
        return self._hashes

    @property
    def audiences(self) -> set[str]:
        if self._audiences is None:
            self._parse()
        assert self._audiences is not None
        return self._audiences

    def names(self) -> tuple[Iterable[str], Iterable[str]]:
        """The attribute and audience names it holds."""
        return self.hashes.keys(), self.audiences

    def set_digest(self, digest: bytes | None) -> None:
        self.digest = digest
        self._verbatim = False
        self.changed = True

    def record(self, identity: str, out: TableIndex) -> bytes:
        """The profile's format-6 record under the tables being written."""
        if self._verbatim:
            return self._stored
        if self._hashes is None and self._tables is not None:  # only the digest changed
            tail = self._stored[self._at :]
        else:
            tail = state_codec.tail(self.hashes, self.audiences, out)
        return state_codec.record(orjson.dumps(identity), self.digest, tail)


@dataclass(frozen=True)
class Change:
    """What to send for one profile: changed attributes and membership moves."""

    attributes: dict[str, Any]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    hashes: dict[str, bytes] = field(default_factory=dict)
    """Hashes of the changed attribute values, computed once by the diff."""

    @property
    def empty(self) -> bool:
        return not (self.attributes or self.added or self.removed)


class SyncState:
    """The acknowledged state of one bucket of one sync, in memory while it is processed.

    Decoded for the C path (`native`), its profiles stay in C, read from the snapshot's
    text; `profiles` is then empty until `use_reference` reads them in Python instead.
    """

    def __init__(
        self, profiles: dict[str, ProfileState], etag: str | None, fingerprint: str = ""
    ) -> None:
        self.profiles = profiles
        self.native: Any = None
        """switchboard_sync.State, holding the profiles, or None."""
        self._text = b""
        """The stored state, until its profiles are read (`use_reference`)."""
        self.binary = True
        """Whether it was stored in format 6 (else it is rewritten whole)."""
        self.tables = Tables()
        """The name tables of its last section: those written next extend them."""
        self.names: tuple[list[str], list[str]] | None = None
        """The mapping's attribute and audience names, once rows are processed: the
        tables written next hold them (as C's do, from its mapping)."""
        self._same_mapping = True
        self.etag = etag
        self.layout: Layout | None = None
        """How the stored snapshot is built, when it says so (else it is rewritten)."""
        self.fingerprint = fingerprint
        self.last_run: str | None = None
        """The run that committed this snapshot, with its bucket result: a run resumed after
        committing a bucket but before recording it finds its own result here."""
        self.last_result: dict[str, Any] = {}
        self._changed = False
        self.withheld: dict[str, bytes] = {}
        """Identity -> raw digest of rows held back last run for lack of consent. The row
        itself says so (its consent column), so the same raw row is held back again
        without typing it; a snapshot keeps only those seen again in its run."""
        self.withheld_now: dict[str, bytes] = {}
        """This run's: what the next snapshot keeps."""

    @property
    def dirty(self) -> bool:
        """Whether anything changed since loading (else there is nothing to commit)."""
        changed = self._changed or (self.native is not None and self.native.changed)
        return changed or self.withheld_now != self.withheld

    def use_reference(self) -> None:
        """Read the profiles in Python: this bucket runs on the reference after all."""
        if self._text:
            read = _profiles if self.binary else _text_profiles
            self.profiles = read(self._text, self._same_mapping)
        self.native, self._text = None, b""

    def withheld_again(self, identity: str, digest: bytes) -> bool:
        """The same raw row as one held back for lack of consent last run."""
        if self.withheld.get(identity) != digest:
            return False
        self.withheld_now[identity] = digest
        return True

    def withhold(self, identity: str, digest: bytes) -> None:
        """This row is held back because it grants no consent."""
        self.withheld_now[identity] = digest

    def index(self) -> DigestIndex:
        """The raw digests acknowledged and those held back for lack of consent, each
        sorted, 8 bytes apiece (core/sync/unchanged.py); a digest two profiles share
        (never, short of a collision) is left out."""
        if self.native is not None:
            profiles = bytes(self.native.digests())
        else:
            counted = Counter(p.digest for p in self.profiles.values() if p.digest is not None)
            profiles = b"".join(sorted(digest for digest, times in counted.items() if times == 1))
        return profiles, b"".join(sorted(set(self.withheld_now.values())))

    def mark_seen(self, settled: DigestIndex, state_etag: str) -> set[str]:
        """Rows the split settled (their raw digests: profiles acknowledged, rows held back)
        against this state at `state_etag`: their identities are seen in this file
        (marked in C, or returned for the reference's seen set) and rows held back are
        held back again. Raises ConcurrencyConflict if the state changed since the split."""
        if _plain_etag(self.etag or "") != _plain_etag(state_etag):
            raise ConcurrencyConflict("sync state changed since the file was split")
        withheld = {settled[1][at : at + 8] for at in range(0, len(settled[1]), 8)}
        again = {i: d for i, d in self.withheld.items() if d in withheld}
        self.withheld_now.update(again)
        seen: set[str] = set()
        if self.native is not None:  # the digests stay bytes, for C
            marked = int(self.native.mark_seen(settled[0]))
            self.native.mark_seen_identities(list(again))
        else:
            profiles = {settled[0][at : at + 8] for at in range(0, len(settled[0]), 8)}
            seen = {i for i, p in self.profiles.items() if p.digest in profiles}
            marked = len(seen)
            seen.update(again)
        # The split settled distinct identities, so distinct digests.
        if marked != len(settled[0]) // 8 or len(again) != len(withheld):
            raise ConcurrencyConflict("sync state changed since the file was split")
        return seen

    def unchanged_raw(self, identity: str, digest: bytes) -> bool:
        known = self.profiles.get(identity)
        return known is not None and known.digest == digest

    def diff(
        self,
        identity: str,
        attributes: dict[str, Any],
        memberships: dict[str, bool],
        send_nulls: frozenset[str],
        *,
        whole: bool = False,
    ) -> Change:
        """What changed since the acknowledged state; `whole`: every value and membership
        as the row has them (a full refresh), nulls only where they clear a value."""
        known = self.profiles.get(identity)
        acknowledged = known.hashes if known else {}
        hashes = {} if whole else acknowledged
        owned = known.audiences if known else set()
        changed: dict[str, Any] = {}
        changed_hashes: dict[str, bytes] = {}
        for name, value in attributes.items():
            if value is None:
                # Null means "the source is empty": cleared only where the mapping says so
                # and only if we had sent something.
                if name in send_nulls and acknowledged.get(name, _NULL_HASH) != _NULL_HASH:
                    changed[name] = None
                    changed_hashes[name] = _NULL_HASH
                continue
            digest = value_hash(value)
            if hashes.get(name) != digest:
                changed[name] = value
                changed_hashes[name] = digest
        added = tuple(sorted(n for n, m in memberships.items() if m and (whole or n not in owned)))
        removed = tuple(
            sorted(n for n, m in memberships.items() if not m and (whole or n in owned))
        )
        return Change(changed, added, removed, changed_hashes)

    def acknowledge(self, identity: str, change: Change, digest: bytes | None) -> None:
        """Record what the destination applied: a row's change (`digest`: its raw digest),
        or audiences taken back from a profile (None: its last row no longer says what the
        destination holds, so the next row is diffed rather than settled as unchanged)."""
        self._changed = True
        profile = self.profiles.setdefault(identity, ProfileState())
        profile.changed = True
        profile.hashes.update(change.hashes)
        profile.audiences.update(change.added)
        profile.audiences.difference_update(change.removed)
        profile.set_digest(digest)

    def remember_digest(self, identity: str, digest: bytes) -> None:
        """An unchanged row: its raw form may differ (e.g. 'existing' for 'realized')."""
        known = self.profiles.get(identity)
        if known is not None and known.digest != digest:
            known.set_digest(digest)
            self._changed = True


class Part(NamedTuple):
    """One compressed section of a bucket's stored state: a byte range of a blob in the sync's
    state folder (a pack, or the bucket's own blob from before packs) and its text size."""

    blob: str
    offset: int
    length: int
    text: int


@dataclass(frozen=True)
class Layout:
    """Where a bucket's state is: its base, then the sections appended since (their text
    sizes decide when a write rewrites the whole)."""

    parts: tuple[Part, ...]

    @property
    def base_text(self) -> int:
        return self.parts[0].text

    @property
    def appended_text(self) -> int:
        return sum(part.text for part in self.parts[1:])

    @property
    def sections(self) -> int:
        return len(self.parts) - 1

    @property
    def legacy(self) -> bool:
        """A bucket blob from before packs: read whole (its sections are in its own text),
        rewritten into a pack by the bucket's next write."""
        return not self.parts[0].blob.startswith(_PACKS)


@dataclass(frozen=True)
class StoredBucket:
    etag: str
    """The bucket's version: its pointer's ETag (or its legacy blob's)."""
    layout: Layout


class BucketPointer(TableEntity):
    """Table `syncstate`: where one bucket's state is (PartitionKey the sync, RowKey
    `destination|bucket`). Its ETag guards the bucket: a write names the ETag its state
    was loaded at, so two runs that loaded the same state cannot both commit."""

    table_name: ClassVar[str] = "syncstate"

    parts: list[list[Any]]
    """Part fields, base first."""
    buckets: int = 0
    """How many buckets the sync's state is split into (0: not known to the writer)."""


DigestIndex = tuple[bytes, bytes]
"""Sorted 8-byte raw digests: of the profiles acknowledged, and of rows held back for lack
of consent (core/sync/unchanged.py)."""
StoredState = tuple[bytes, str, Layout | None]
"""A bucket's state (its sections as stored, or decompressed), the version it was read at,
and its layout."""


@dataclass(frozen=True)
class Snapshot:
    bucket: int
    body: bytes
    """The whole state, or the section to append: its text, or (`compressed`) as stored."""
    compressed: bool
    text_size: int
    etag: str | None
    """The pointer ETag the state was loaded at (None: there was no pointer): the write's
    condition."""
    index: DigestIndex = (b"", b"")
    """SyncState.index, for the run's digest index file."""
    appended_to: Layout | None = None
    """The stored state the text is appended to as a section (None: it replaces it)."""

    @classmethod
    def of(
        cls, bucket: int, text: bytes, etag: str | None, index: DigestIndex = (b"", b""),
        appended_to: Layout | None = None,
    ) -> Snapshot:  # fmt: skip
        """A writer thread compresses a small text, while the next bucket runs; a larger one
        is compressed before it is queued, so a queued write holds at most
        `_QUEUED_TEXT_BYTES` of text (at 5M rows, four queued snapshots' text was 40 MB)."""
        compressed = len(text) > _QUEUED_TEXT_BYTES
        body = state_codec.compress(text) if compressed else text
        return cls(bucket, body, compressed, len(text), etag, index, appended_to)

    @property
    def text(self) -> bytes:
        return state_codec.decompress(self.body) if self.compressed else self.body

    @property
    def data(self) -> bytes:
        """As stored (state_codec.compress)."""
        return self.body if self.compressed else state_codec.compress(self.body)


BINARY_START = b'{"version":6,'
"""How a format-6 state starts (state._encode writes the version first)."""


def _plain_etag(etag: str) -> str:
    """Listings and writes quote ETags differently: compared without the quotes."""
    return etag.strip('"')


def _encode(state: SyncState, *, changed_only: bool = False) -> bytes:
    """The whole snapshot, or (`changed_only`) the section of the profiles this run
    changed, in format 6 (state_codec): stored profiles in their order, then new ones in
    the order they were acknowledged."""
    header = orjson.dumps({
        "version": FORMAT_VERSION,
        "fingerprint": state.fingerprint,
        "run": state.last_run,
        "result": state.last_result,
        # Sorted: rows the split settled are held back again before the bucket's own rows.
        "withheld": {i: digest.hex() for i, digest in sorted(state.withheld_now.items())},
    })  # fmt: skip
    if state.native is not None:
        encode = state.native.encode_changed if changed_only else state.native.encode
        text: bytes = encode(header)
        return text
    out = TableIndex(_tables_out(state))
    written = (
        (identity, profile) for identity, profile in state.profiles.items()
        if profile.changed or not changed_only
    )  # fmt: skip
    records = (profile.record(identity, out) for identity, profile in written)
    return state_codec.section(header, out.tables, records)


encode_state = _encode
"""The whole snapshot of a state (for writers outside a run: core/sync/state_erasure.py)."""


def _tables_out(state: SyncState) -> Tables:
    """The tables a write uses: those loaded, extended by the mapping's names (C adds them
    from its mapping alike). A state read from JSON lines had no tables: every name its
    profiles hold is added (C never writes such a state: its bucket ran on the
    reference)."""
    attributes, audiences = state.names or ([], [])
    if not state.binary:
        for profile in state.profiles.values():
            held_attributes, held_audiences = profile.names()
            attributes, audiences = [*attributes, *held_attributes], [*audiences, *held_audiences]
    return state.tables.extended(attributes, audiences)


def _text_profiles(text: bytes, same_mapping: bool) -> dict[str, ProfileState]:
    """The profiles of a state stored as JSON lines (format 5 and before): a later line of
    an identity (an appended section's) takes the earlier one's place."""
    profiles: dict[str, ProfileState] = {}
    for line in text.split(b"\n"):
        if not line or line.startswith(b"{"):
            continue  # blank, or a section's header
        first = line.find(b"\t")
        second = line.find(b"\t", first + 1)
        digest = unhexlify(line[:first]) if first and same_mapping else None
        profiles[orjson.loads(line[first + 1 : second])] = ProfileState(digest, line, second + 1)
    return profiles


def _profiles(text: bytes, same_mapping: bool) -> dict[str, ProfileState]:
    """The profiles of a format-6 state: a later record of an identity (an appended
    section's) takes the earlier one's place. Records are kept as they are, to be written
    back unparsed, unless the mapping changed (its digests no longer say anything)."""
    profiles: dict[str, ProfileState] = {}
    for part in state_codec.sections(text):
        for found in state_codec.records(text, part.records, part.end):
            stored = text[found.start : found.end]
            profiles[orjson.loads(found.identity)] = ProfileState(
                found.digest if same_mapping else None, stored, found.tail - found.start,
                same_mapping, part.tables,
            )  # fmt: skip
    return profiles


_UNREADABLE = (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError)
"""What reading a damaged state text raises (orjson's errors are ValueErrors)."""


def _decode(text: bytes, fingerprint: str, native: bool) -> SyncState:
    header: dict[str, Any]
    found = list(state_codec.sections(text)) if text.startswith(BINARY_START) else []
    version = found[0].header.get("version") if found else state_codec.header_version(text)
    if not text:  # nothing stored yet
        header, tables = {"fingerprint": fingerprint, "version": FORMAT_VERSION}, Tables()
        version = FORMAT_VERSION
    elif version == FORMAT_VERSION:
        found = found or list(state_codec.sections(text))  # a header in another key order
        header, tables = found[-1].header, found[-1].tables
    elif version in TEXT_VERSIONS:
        end = text.find(b"\n")
        last = text.rfind(b"\n{") + 1  # the last header (0: the first line)
        last_end = text.find(b"\n", last)
        header = orjson.loads(text[last : last_end if last_end >= 0 else len(text)])
        tables = Tables()
        text = text[end + 1 :] if end >= 0 else b""
    else:
        raise ValueError(f"unsupported sync state version {version}")
    # Another mapping (or digest): the raw digests no longer say anything, so records are
    # rewritten without them.
    same_mapping = (
        header.get("fingerprint") == fingerprint and header.get("version", 0) >= DIGESTS_SINCE
    )
    state = SyncState({}, None, fingerprint)
    state._text, state._same_mapping = text, same_mapping
    state.binary, state.tables = version == FORMAT_VERSION, tables
    if native and state.binary:  # C reads format 6 only
        with contextlib.suppress(ValueError):  # records C does not read: none we write
            state.native = SPEEDUPS.State(text, same_mapping)
    if state.native is None:
        state.use_reference()
    state.last_run = header.get("run")
    state.last_result = header.get("result") or {}
    if same_mapping:  # else consent may be read differently now
        withheld = header.get("withheld") or {}
        state.withheld = {identity: unhexlify(digest) for identity, digest in withheld.items()}
    return state


class IndexWriter:
    """One worker's digest index file: per bucket it loaded, the snapshot's ETag and its
    SyncState.index, added as each bucket's write is done (from writer threads) and
    committed once at the end, so a run writes one file, not one per bucket. A crash
    leaves no file, and the next run settles nothing in those buckets."""

    def __init__(self, writer: BlockWriter, header: dict[str, Any]) -> None:
        self._writer = writer
        self._lock = threading.Lock()
        writer.write(orjson.dumps(header) + b"\n")

    def add(self, bucket: int, state_etag: str, index: DigestIndex) -> None:
        record = {"bucket": bucket, "state_etag": _plain_etag(state_etag)}
        record |= {"profiles": len(index[0]) // 8, "withheld": len(index[1]) // 8}
        with self._lock:
            self._writer.write(orjson.dumps(record) + b"\n" + index[0] + index[1])

    def close(self) -> None:
        with self._lock:
            self._writer.close()


def _index_records(
    reader: IO[bytes], fingerprint: str, run_id: str
) -> Iterator[tuple[int, str, DigestIndex]] | None:
    """An index file's (bucket, state ETag, index) records as they are read, or None if it
    is of another version, mapping or of run `run_id`."""
    about = orjson.loads(reader.readline())
    if (about.get("version"), about.get("fingerprint")) != (_INDEX_VERSION, fingerprint):
        return None
    if about.get("run") == run_id:
        return None

    def records() -> Iterator[tuple[int, str, DigestIndex]]:
        while line := reader.readline():
            record = orjson.loads(line)
            sizes = 8 * record["profiles"], 8 * record["withheld"]
            index = reader.read(sizes[0]), reader.read(sizes[1])
            if (len(index[0]), len(index[1])) != sizes:
                raise StorageError("a digest index file ends within a record")
            yield record["bucket"], record["state_etag"], index

    return records()


@dataclass
class _Span:
    """A byte range of one blob, fetched once for the parts of several buckets."""

    blob: str
    start: int
    end: int
    users: int = 0
    """Parts assigned to it and not yet taken."""
    data: Future[bytes] = field(default_factory=Future)


class StateReader:
    """The stored state of many buckets in few requests.

    A run writes its buckets into one pack in bucket order, so the parts of consecutive
    buckets lie next to each other: they are fetched as one range of up to `_SPAN_BYTES`
    (a gap of up to `_SPAN_GAP_BYTES` is read through). A span is fetched when a bucket
    first needs it, or ahead by `prefetch` while the file is split, and let go once every
    part in it was taken or its bucket is no longer wanted (`narrow`).
    """

    def __init__(
        self, store: StateStore, stored: dict[int, StoredBucket], order: list[int]
    ) -> None:
        self._store = store
        self._stored = stored
        self._order = [bucket for bucket in order if bucket in stored]
        self._position = {bucket: at for at, bucket in enumerate(self._order)}
        self._wanted = set(self._order)
        self._assigned: dict[tuple[int, int], _Span] = {}
        """(bucket, part index) -> the span holding that part."""
        self._lock = threading.Lock()
        self.held = 0
        """Bytes of the spans fetched or in flight that still have users."""
        self._stop = threading.Event()
        self._prefetching: threading.Thread | None = None

    def text_size(self, bucket: int) -> int:
        """The size of the bucket's state once decompressed (0: none, or not known)."""
        stored = self._stored.get(bucket)
        return sum(part.text for part in stored.layout.parts) if stored is not None else 0

    def take(self, bucket: int) -> StoredState | None:
        """The bucket's state as stored (its sections, in order), or None if it has none."""
        stored = self._stored.get(bucket)
        if stored is None:
            return None
        parts = stored.layout.parts
        spans = [self._span(bucket, at) for at in range(len(parts))]
        try:
            data = b"".join(
                _slice(span.data.result(), part.offset - span.start, part.length)
                for part, span in zip(parts, spans, strict=True)
            )
        finally:
            self.skip(bucket)
        return data, stored.etag, stored.layout

    def skip(self, bucket: int) -> None:
        """The bucket will not be taken (again): what was read for it can go."""
        stored = self._stored.get(bucket)
        with self._lock:
            self._wanted.discard(bucket)
            if stored is not None:
                self._release(bucket, len(stored.layout.parts))

    def narrow(self, buckets: Iterable[int]) -> None:
        """Only these buckets will be taken (the others' rows were all settled)."""
        wanted = set(buckets)
        for bucket in self._wanted - wanted:
            self.skip(bucket)

    def prefetch(self, budget: int) -> None:
        """Fetch spans in bucket order on a thread, up to `budget` bytes held."""
        self._prefetching = threading.Thread(
            target=self._prefetch, args=(budget,), name="prefetch-state", daemon=True
        )
        self._prefetching.start()

    def _prefetch(self, budget: int) -> None:
        for bucket in self._order:
            for at in range(len(self._stored[bucket].layout.parts)):
                if self._stop.is_set() or self.held >= budget:
                    return
                with self._lock:
                    if bucket not in self._wanted:
                        break
                span = self._span(bucket, at)
                try:
                    span.data.result()
                except Exception:  # the bucket's own take fetches again, and reports it
                    log.warning("prefetching sync state stopped", exc_info=True)
                    return

    def stop(self) -> None:
        """Fetch no more ahead, and let go of what was not taken."""
        self._stop.set()
        if self._prefetching is not None:
            self._prefetching.join()
        with self._lock:
            self._assigned.clear()
            self._wanted.clear()
            self.held = 0

    def _release(self, bucket: int, parts: int) -> None:
        for at in range(parts):
            span = self._assigned.pop((bucket, at), None)
            if span is not None:
                span.users -= 1
                if span.users == 0:
                    self.held -= span.end - span.start

    def _span(self, bucket: int, at: int) -> _Span:
        """The span holding part `at` of `bucket`: assigned already, or planned from that
        part over the next wanted buckets' parts in the same blob, and fetched here."""
        with self._lock:
            span = self._assigned.get((bucket, at))
            if span is not None:
                return span
            part = self._stored[bucket].layout.parts[at]
            span = _Span(part.blob, part.offset, part.offset + part.length)
            self._assign(span, bucket, at)
            for later in self._order[self._position.get(bucket, len(self._order)) + 1 :]:
                found = self._part_in(span.blob, later) if later in self._wanted else None
                if found is None:
                    continue  # its parts are elsewhere
                part = self._stored[later].layout.parts[found]
                gap = part.offset - span.end
                if (
                    not 0 <= gap <= _SPAN_GAP_BYTES
                    or part.offset + part.length - span.start > _SPAN_BYTES
                ):
                    break
                self._assign(span, later, found)
            self.held += span.end - span.start
        try:
            span.data.set_result(self._store.read_range(span.blob, span.start, span.end))
        except BaseException as exc:
            with self._lock:  # a later take plans it afresh
                for key in [key for key, held in self._assigned.items() if held is span]:
                    del self._assigned[key]
                self.held -= span.end - span.start
            span.data.set_exception(exc)
            raise
        return span

    def _part_in(self, blob: str, bucket: int) -> int | None:
        """The index of the bucket's part in `blob` not yet assigned to a span, if any."""
        for at, part in enumerate(self._stored[bucket].layout.parts):
            if part.blob == blob and (bucket, at) not in self._assigned:
                return at
        return None

    def _assign(self, span: _Span, bucket: int, at: int) -> None:
        part = self._stored[bucket].layout.parts[at]
        span.end = max(span.end, part.offset + part.length)
        span.users += 1
        self._assigned[(bucket, at)] = span


def _slice(data: bytes, start: int, length: int) -> bytes:
    return data if start == 0 and length == len(data) else data[start : start + length]


@dataclass
class _Queued:
    """A bucket's state in a pack, waiting for its pointer: its bytes are in the pack."""

    bucket: int
    etag: str | None
    """The pointer ETag its state was loaded at (None: create the pointer)."""
    parts: tuple[Part, ...]
    done: Callable[[str], None]


class PackWriter:
    """A worker's new snapshots, in one pack blob: each bucket's compressed section is appended
    as it comes, and every `_POINTERS_PER_TRANSACTION` buckets or `_FLUSH_BYTES` the
    members are staged and committed, then the buckets' pointers are replaced in one
    table transaction under the ETags their state was loaded at. A bucket's `done` runs
    once its pointer is committed: its result may be recorded then. A crash before that
    leaves the pack's members unreferenced (collected later) and the bucket to its retry.
    Batches are written on a thread of their own, in the order they filled (a commit names
    every block before it), so adding goes on meanwhile: the threads writing buckets do not
    wait for a commit's round trips (a pointer transaction of 100 buckets takes Azurite
    about 0.15 s), unless `_QUEUED_BATCHES` are waiting already."""

    def __init__(
        self, store: StateStore, run_id: str, before_commit: Callable[[], None] | None = None
    ) -> None:
        self._store = store
        self._before_commit = before_commit
        """Runs before each pointer commit (what must be durable before a bucket counts
        as finished: the run's audit rows)."""
        self.blob = f"{_PACKS}{run_id}-{uuid.uuid4().hex[:12]}.gz"
        store.storage.blobs.ensure_container(STATE_CONTAINER)
        self._client = store.storage.blob_service.get_blob_client(
            STATE_CONTAINER, store.folder + self.blob
        )
        self._lock = threading.Lock()
        self._size = 0
        """Bytes added: the next member's offset."""
        self._pending: list[bytes] = []
        """Members not yet taken into a batch."""
        self._pending_bytes = 0
        self._queued: list[_Queued] = []
        self._batches = 0
        self._written = threading.Condition()
        self._turn = 0
        """The batch to be written next; batches are numbered as they are taken."""
        self._blocks: list[str] = []
        self._broken = False
        """A batch's blocks failed: the offsets of the batches after it would be wrong."""
        self._committer: ThreadPoolExecutor | None = None
        self._commits: deque[Future[None]] = deque()

    def add(self, snapshot: Snapshot, done: Callable[[str], None]) -> None:
        data = snapshot.data  # compressed before the lock is taken
        with self._lock:
            part = Part(self.blob, self._size, len(data), snapshot.text_size)
            before = snapshot.appended_to.parts if snapshot.appended_to is not None else ()
            self._size += len(data)
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._queued.append(_Queued(snapshot.bucket, snapshot.etag, (*before, part), done))
            full = len(self._queued) >= _POINTERS_PER_TRANSACTION
            if full or self._pending_bytes >= _FLUSH_BYTES:
                self._submit()
        self._wait(_QUEUED_BATCHES)

    def close(self) -> None:
        """Commit what is left, and wait for every batch (raising a batch's error)."""
        try:
            with self._lock:
                if self._queued:
                    self._submit()
            self._wait(0)
        finally:
            with self._lock:
                committer, self._committer = self._committer, None
            if committer is not None:
                committer.shutdown()

    def _submit(self) -> None:
        """The batch filled so far, to the committing thread (with the lock held)."""
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="commit-pack")
        self._commits.append(self._committer.submit(self._write, *self._take()))

    def _wait(self, queued: int) -> None:
        """Until at most `queued` batches wait; a finished batch's error is raised."""
        while True:
            with self._lock:
                if not self._commits or (
                    len(self._commits) <= queued and not self._commits[0].done()
                ):
                    return
                oldest = self._commits.popleft()
            oldest.result()

    def _take(self) -> tuple[int, list[bytes], list[_Queued]]:
        batch = (self._batches, self._pending, self._queued)
        self._batches += 1
        self._pending, self._pending_bytes, self._queued = [], 0, []
        return batch

    def _write(self, number: int, members: list[bytes], queued: list[_Queued]) -> None:
        with self._written:
            self._written.wait_for(lambda: self._turn == number)
            try:
                if self._broken:
                    raise StorageError(f"pack {self.blob}: an earlier batch was not written")
                self._broken = True
                self._commit_blob(members)  # empties `members`
                self._broken = False
                if self._before_commit is not None:
                    self._before_commit()
                self._store.commit_pointers(queued)  # a conflict fails its own buckets only
            finally:
                self._turn += 1
                self._written.notify_all()

    def _commit_blob(self, members: list[bytes]) -> None:
        """Stage the members, then commit every block staged so far. A block is put
        together in an anonymous memory map: an 8 MB buffer freed through glibc raised its
        mmap threshold, and the buffers after it stayed with the process (+40 MB at 3M
        rows). Members are let go as they are copied, so a batch is held about once."""
        members.reverse()  # taken from the end
        while members:
            size = min(_BLOCK_BYTES, sum(len(member) for member in members))
            with mmap.mmap(-1, size) as block:
                while block.tell() < size:
                    member = members.pop()
                    room = size - block.tell()
                    block.write(memoryview(member)[:room])
                    if len(member) > room:
                        members.append(member[room:])  # the rest opens the next block
                block.seek(0)
                block_id = base64.b64encode(f"{len(self._blocks):08d}".encode()).decode()
                # Sent as a stream: an mmap reads like a file and has a length.
                self._client.stage_block(block_id, cast(IO[bytes], block), length=size)
            self._blocks.append(block_id)
        self._client.commit_block_list([BlobBlock(block) for block in self._blocks])


class StateStore:
    def __init__(
        self, storage: Storage, sync_id: str, destination: str, fingerprint: str, buckets: int = 0
    ) -> None:
        self.storage = storage
        self.sync_id = sync_id
        self.destination = destination
        self.fingerprint = fingerprint
        self.buckets = buckets
        """The sync's `processing.state_buckets` (0: not checked, for readers of any)."""
        self.folder = f"{sync_id}/{destination}/"

    def load(self, bucket: int, *, native: bool = False) -> SyncState:
        return self.decode(self.fetch(bucket), native=native)

    def _pointers(self) -> EntityTable[BucketPointer]:
        return self.storage.tables.get(BucketPointer)

    def _row_key(self, bucket: int) -> str:
        return safe_key(f"{self.destination}|{bucket:04d}")

    def stored_buckets(self, only: int | None = None) -> dict[int, StoredBucket]:
        """Every bucket that has state (or bucket `only`, if it has), with its version and
        layout, in two listings: the pointers, and bucket blobs from before packs (a first
        run then fetches nothing; a bucket written after the listing still conflicts at
        its write)."""
        self.storage.blobs.ensure_container(STATE_CONTAINER)
        prefix = self._row_key(0)[:-4]
        rows = (
            {"row_from": prefix, "row_before": prefix[:-1] + "}"} if only is None
            else {"row_from": self._row_key(only), "row_to": self._row_key(only)}
        )  # fmt: skip
        legacy_prefix = self.folder + _LEGACY_PREFIX + ("" if only is None else f"{only:04d}")
        stored: dict[int, StoredBucket] = {}
        for row in self._pointers().query_partition_versioned(safe_key(self.sync_id), **rows):
            written_with = row.entity.buckets
            if self.buckets and written_with and written_with != self.buckets:
                raise ConfigError(
                    f"sync {self.sync_id!r}: its state for {self.destination} is split into "
                    f"{written_with} buckets, and processing.state_buckets is {self.buckets}; "
                    "the count is fixed for a sync's life: set it back, or declare the sync "
                    "under a new id (its delta then starts from scratch)"
                )
            layout = Layout(tuple(Part(*part) for part in row.entity.parts))
            stored[int(row.entity.row_key[len(prefix) :])] = StoredBucket(row.etag, layout)
        for ref in self.storage.blobs.list(STATE_CONTAINER, legacy_prefix):
            name = ref.name[len(self.folder) :]
            bucket = int(name[len(_LEGACY_PREFIX) : len(_LEGACY_PREFIX) + 4])
            legacy = StoredBucket(_plain_etag(ref.etag), Layout((Part(name, 0, ref.size, 0),)))
            stored.setdefault(bucket, legacy)
        return stored

    def reader(self, stored: dict[int, StoredBucket], order: list[int]) -> StateReader:
        return StateReader(self, stored, order)

    def read_range(self, blob: str, start: int, end: int) -> bytes:
        client = self.storage.blob_service.get_blob_client(STATE_CONTAINER, self.folder + blob)
        # Its chunks joined once (readall copies them into a stream, then out of it).
        return b"".join(client.download_blob(offset=start, length=end - start).chunks())

    def indexes(self, etags: dict[int, str], run_id: str) -> dict[int, DigestIndex]:
        """The digest index of each bucket's state as listed (`etags`), where an index
        file has one (IndexWriter); files written by run `run_id` itself are not read (a
        resumed run must find its bucket results in its snapshots). Files none of whose
        buckets is current any more are deleted once an hour old."""
        prefix = f"{self.folder}digests/"
        files = list(self.storage.blobs.list(STATE_CONTAINER, prefix))
        listed = {bucket: _plain_etag(etag) for bucket, etag in etags.items()}
        with ThreadPoolExecutor(_INDEX_READERS, thread_name_prefix="read-index") as pool:
            read = pool.map(lambda ref: self._read_index(ref, listed, run_id), files)
            currents = list(read)
        found: dict[int, DigestIndex] = {}
        stale_before = datetime.now(UTC) - timedelta(hours=1)
        for ref, current in zip(files, currents, strict=True):
            if current is not None:
                found.update(current)
            if current == {} and (ref.last_modified or stale_before) < stale_before:
                self.storage.blobs.delete(STATE_CONTAINER, ref.name)
        return found

    def _read_index(
        self, ref: BlobRef, listed: dict[int, str], run_id: str
    ) -> dict[int, DigestIndex] | None:
        """The indexes of one file's buckets whose state is still as listed, streamed (only
        those are held); None if the file is gone, or of another version, mapping or run."""
        opened = self.storage.blobs.open_current(STATE_CONTAINER, ref.name)
        if opened is None:
            return None
        with opened[0] as reader:
            records = _index_records(reader, self.fingerprint, run_id)
            if records is None:
                return None
            return {bucket: index for bucket, etag, index in records if listed.get(bucket) == etag}

    def line_indexes(self) -> LineIndexes:
        """The line indexes runs' splits leave (core/sync/lines.py)."""
        return LineIndexes(self.storage, STATE_CONTAINER, self.folder, self.fingerprint)

    def index_writer(self, run_id: str) -> IndexWriter:
        name = f"{self.folder}digests/{run_id}-{uuid.uuid4().hex[:12]}.bin"
        header = {"version": _INDEX_VERSION, "fingerprint": self.fingerprint, "run": run_id}
        writer = self.storage.blobs.writer(STATE_CONTAINER, name, block_bytes=_INDEX_BLOCK_BYTES)
        return IndexWriter(writer, header)

    def fetch(self, bucket: int) -> StoredState | None:
        """One bucket's state as stored (its sections), its version and layout, or None if
        it has none yet (a run reads many buckets through a `reader`)."""
        return self.reader(self.stored_buckets(only=bucket), [bucket]).take(bucket)

    @staticmethod
    def inflate(stored: StoredState | None) -> StoredState | None:
        """A fetched snapshot's text (each section is compressed on its own); a worker
        does this on its fetching thread."""
        if stored is None:
            return None
        layout = stored[2]
        lengths = [part.length for part in layout.parts] if layout is not None else []
        return state_codec.decompress(stored[0], lengths), *stored[1:]

    def decode(self, stored: StoredState | None, *, native: bool = False) -> SyncState:
        """The bucket's state from its stored (compressed) form; `native`: see `decode_text`."""
        return self.decode_text(self.inflate(stored), native=native)

    def decode_text(self, inflated: StoredState | None, *, native: bool = False) -> SyncState:
        """The bucket's state from its inflated text; `native`: with its profiles in C
        (switchboard_sync.State) rather than in Python."""
        if inflated is None:
            return _decode(b"", self.fingerprint, native)
        try:
            state = _decode(inflated[0], self.fingerprint, native)
        except _UNREADABLE as exc:
            raise CorruptState(
                f"sync state {self.sync_id}/{self.destination} cannot be read "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
        state.etag, state.layout = inflated[1], inflated[2]
        return state

    def snapshot(
        self, bucket: int, state: SyncState, *, run_id: str, result: dict[str, Any]
    ) -> Snapshot:
        """The bucket's state as it will be stored: bytes only, so the state's objects can
        go before the write is done (a writer thread then holds its text, not objects)."""
        state.last_run, state.last_result = run_id, result
        layout = state.layout
        pointer = None if layout is None or layout.legacy else state.etag
        appendable = state.binary and state._same_mapping and not (layout and layout.legacy)
        if layout is not None and appendable and layout.sections < _MAX_SECTIONS:
            section = _encode(state, changed_only=True)
            if layout.appended_text + len(section) <= layout.base_text // 2:
                return Snapshot.of(bucket, section, pointer, state.index(), layout)
        return Snapshot.of(bucket, _encode(state), pointer, state.index())

    def pack_writer(
        self, run_id: str, before_commit: Callable[[], None] | None = None
    ) -> PackWriter:
        return PackWriter(self, run_id, before_commit)

    def write(self, snapshot: Snapshot, run_id: str = "write") -> str:
        """One snapshot in a pack of its own; its bucket's new version."""
        written: list[str] = []
        writer = self.pack_writer(run_id)
        writer.add(snapshot, written.append)
        writer.close()
        return written[0]

    def commit_pointers(self, queued: list[_Queued]) -> None:
        """Point each queued bucket at its new part, `_POINTERS_PER_TRANSACTION` at a time,
        each only if its pointer is still the one its state was loaded at. A conflict
        fails a whole transaction, so its buckets are then committed one by one: the
        others still count, and the conflict is raised once they are done."""
        table = self._pointers()
        conflicts: list[int] = []
        for start in range(0, len(queued), _POINTERS_PER_TRANSACTION):
            chunk = queued[start : start + _POINTERS_PER_TRANSACTION]
            try:
                etags: list[str | None] = list(table.transact([self._pointer_op(q) for q in chunk]))
            except (ConcurrencyConflict, EntityExists):
                etags = [self._commit_one(table, q) for q in chunk]
            for entry, etag in zip(chunk, etags, strict=True):
                if etag is None:
                    conflicts.append(entry.bucket)
                else:
                    entry.done(etag)
        if conflicts:
            raise ConcurrencyConflict(
                f"sync state {self.sync_id}/{self.destination} bucket {conflicts[0]} "
                "changed meanwhile"
            )

    def _pointer_op(self, queued: _Queued) -> tuple[str, BucketPointer, str | None]:
        pointer = BucketPointer(
            partition_key=safe_key(self.sync_id), row_key=self._row_key(queued.bucket),
            parts=[list(part) for part in queued.parts], buckets=self.buckets,
        )  # fmt: skip
        if queued.etag is None:
            return "create", pointer, None
        return "replace", pointer, queued.etag

    def _commit_one(self, table: EntityTable[BucketPointer], queued: _Queued) -> str | None:
        operation = self._pointer_op(queued)
        try:
            return table.transact([operation])[0]
        except (ConcurrencyConflict, EntityExists):
            # Ours already, if an earlier attempt landed before its answer was lost.
            found = table.get(operation[1].partition_key, operation[1].row_key)
            if found is not None and found.entity.parts == operation[1].parts:
                return found.etag
            return None

    def collect_garbage(self, keep_for: timedelta = timedelta(hours=1)) -> None:
        """Delete packs no pointer names and bucket blobs from before packs whose bucket has
        a pointer now. A pack is kept for `keep_for` after its last commit: a concurrent
        run may not have committed the pointers to it yet."""
        stored = self.stored_buckets()
        named = {part.blob for bucket in stored.values() for part in bucket.layout.parts}
        stale_before = datetime.now(UTC) - keep_for
        for ref in self.storage.blobs.list(STATE_CONTAINER, self.folder):
            name = ref.name[len(self.folder) :]
            if name.startswith(_PACKS):
                unused = name not in named and (ref.last_modified or stale_before) < stale_before
            else:
                unused = name.startswith(_LEGACY_PREFIX) and name not in named
            if unused:
                self.storage.blobs.delete(STATE_CONTAINER, ref.name)


def audience_members(storage: Storage, sync_id: str, audience: str) -> Iterator[str]:
    """Identities a sync's destination holds in `audience` because Switchboard added them
    (every destination of the sync, so an identity may repeat), a bucket at a time."""
    storage.blobs.ensure_container(STATE_CONTAINER)
    destinations = {
        row.row_key.split("|", 1)[0]
        for row in storage.tables.get(BucketPointer).query_partition(safe_key(sync_id))
    }
    for ref in storage.blobs.list(STATE_CONTAINER, prefix=f"{sync_id}/"):
        folder, _, name = ref.name[len(sync_id) + 1 :].partition("/")
        if name.startswith(_LEGACY_PREFIX):
            destinations.add(folder)
    for destination in sorted(destinations):
        store = StateStore(storage, sync_id, destination, "")
        stored = store.stored_buckets()
        reader = store.reader(stored, sorted(stored))
        for bucket in sorted(stored):
            state = store.decode(reader.take(bucket))
            yield from (i for i, profile in state.profiles.items() if audience in profile.audiences)
