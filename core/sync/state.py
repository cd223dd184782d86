"""What the destination already has from us: the delta state of one sync, per bucket.

Per profile: an 8-byte digest of the raw source values last acknowledged (a row whose raw
values are unchanged needs no typing or diffing at all), an 8-byte hash of every
attribute value acknowledged (so only changed attributes are sent), and the audiences
Switchboard itself added (only those are ever removed).

State is split into the same identity-hash buckets as the input, one gzip'd JSON Lines
snapshot per bucket: `sync-state/{sync_id}/{destination}/bucket-{n:04d}.jsonl.gz`. A
bucket is loaded when its rows are processed and written once they are acknowledged,
under the ETag it was loaded with, so memory holds one bucket and two writers of the
same bucket cannot both win. A file's header records the mapping's fingerprint; raw
digests from another mapping are ignored (attribute hashes still hold).

A run that changed few of a bucket's profiles does not rewrite its snapshot: it appends
a section (a header line and the lines of the profiles it changed) as one more block of
the block blob, committed with the blocks already there under the same ETag condition.
A later line of an identity replaces its earlier one, and the last header is the one
that counts. Once the appended sections outgrow half the base (or there are
`_MAX_SECTIONS`), the next write rewrites the whole snapshot. The blob's metadata records
its blocks and sizes (`Layout`).
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import io
import logging
import threading
import uuid
from binascii import unhexlify
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
from azure.storage.blob import BlobBlock
from isal import igzip, isal_zlib
from xxhash import xxh64_digest

from core.errors import ConcurrencyConflict
from core.storage import Storage
from core.storage.blobs import BlobRef, BlockWriter

log = logging.getLogger(__name__)
STATE_CONTAINER = "sync-state"
_FORMAT_VERSION = 5
_READABLE_VERSIONS = (3, 4, 5)
"""Version 3 hashed attribute values with BLAKE2b: its hashes never match version 4's, so
a profile's attributes are each sent once more, the first time its row changes. Versions
before 5 digested raw rows with BLAKE2b: their digests are not compared (every row is
typed and diffed once; attribute hashes still hold, so nothing is sent for that)."""
_DIGESTS_SINCE = 5
_INDEX_VERSION = 3
_INDEX_READERS = 4
_INDEX_BLOCK_BYTES = 1 << 20
"""Staged as it fills: a worker holds about this much of its index file at a time."""
_MAX_SECTIONS = 32
_QUEUED_TEXT_BYTES = 4 << 20
_BLOCK_BYTES = 64 << 20
_NULL_HASH = b"\x00" * 8


def _load_speedups() -> Any:
    try:
        return importlib.import_module("switchboard_sync")
    except ImportError:  # not built (no compiler where it was installed): the reference
        return None


SPEEDUPS = _load_speedups()
"""native/switchboard_sync.c, or None; core/sync/native.py says when it is used."""


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

    Loaded lazily: a profile read from a snapshot keeps its stored line, and its attribute
    hashes and audiences stay JSON inside it until a row needs them. A profile no row
    touched is written back as that same line, with no work per profile; in a typical run
    that is nearly all of them.
    """

    __slots__ = ("_at", "_audiences", "_hashes", "_line", "_verbatim", "changed", "digest")

    def __init__(
        self, digest: bytes | None = None, line: bytes = b"", at: int = 0, verbatim: bool = False
    ) -> None:
        self.digest = digest
        self._line = line
        """The stored line; `[hashes, audiences]` JSON from `at` on (empty: a new profile)."""
        self._at = at
        self._verbatim = verbatim
        """Whether the line can be written back as it is (nothing changed since loading)."""
        self.changed = not line
        """Whether this run changed it (it goes in the section a run appends)."""
        self._hashes: dict[str, bytes] | None = None if line else {}
        self._audiences: set[str] | None = None if line else set()

    def _parse(self) -> None:
        hashes, audiences = orjson.loads(memoryview(self._line)[self._at :])
        self._hashes = {name: bytes.fromhex(h) for name, h in hashes.items()}
        self._audiences = set(audiences)
        self._line, self._verbatim = b"", False

    @property
    def hashes(self) -> dict[str, bytes]:
        """The attribute hashes, for reading or changing (either way the line is rebuilt)."""
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

    def set_digest(self, digest: bytes) -> None:
        self.digest = digest
        self._verbatim = False
        self.changed = True

    def line(self, identity: str) -> bytes:
        """digest TAB identity (JSON, so no tabs or newlines) TAB [hashes, audiences]"""
        if self._verbatim:
            return self._line
        stored = (
            self._line[self._at :] if self._line
            else orjson.dumps([
                {name: digest.hex() for name, digest in self.hashes.items()},
                sorted(self.audiences),
            ])
        )  # fmt: skip
        digest = self.digest.hex().encode() if self.digest else b""
        return b"%s\t%s\t%s" % (digest, orjson.dumps(identity), stored)


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
        self._lines = b""
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
        if self._lines:
            self.profiles = _profiles(io.BytesIO(self._lines), self._same_mapping)
        self.native, self._lines = None, b""

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
        if _plain_etag(self.etag or "") != state_etag:
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
    ) -> Change:
        known = self.profiles.get(identity)
        hashes = known.hashes if known else {}
        owned = known.audiences if known else set()
        changed: dict[str, Any] = {}
        changed_hashes: dict[str, bytes] = {}
        for name, value in attributes.items():
            if value is None:
                # Null means "the source is empty": cleared only where the mapping says so
                # and only if we had sent something.
                if name in send_nulls and hashes.get(name, _NULL_HASH) != _NULL_HASH:
                    changed[name] = None
                    changed_hashes[name] = _NULL_HASH
                continue
            digest = value_hash(value)
            if hashes.get(name) != digest:
                changed[name] = value
                changed_hashes[name] = digest
        added = tuple(sorted(n for n, m in memberships.items() if m and n not in owned))
        removed = tuple(sorted(n for n, m in memberships.items() if not m and n in owned))
        return Change(changed, added, removed, changed_hashes)

    def acknowledge(self, identity: str, change: Change, digest: bytes | None) -> None:
        """Record what the destination applied; `digest` None keeps the raw digest."""
        self._changed = True
        profile = self.profiles.setdefault(identity, ProfileState())
        profile.changed = True
        profile.hashes.update(change.hashes)
        profile.audiences.update(change.added)
        profile.audiences.difference_update(change.removed)
        if digest is not None:
            profile.set_digest(digest)

    def remember_digest(self, identity: str, digest: bytes) -> None:
        """An unchanged row: its raw form may differ (e.g. 'existing' for 'realized')."""
        known = self.profiles.get(identity)
        if known is not None and known.digest != digest:
            known.set_digest(digest)
            self._changed = True


@dataclass(frozen=True)
class Layout:
    """A snapshot blob's blocks, and the text sizes of its base and of the sections
    appended since (kept in the blob's metadata)."""

    blocks: tuple[str, ...]
    base_text: int
    appended_text: int = 0
    sections: int = 0

    @classmethod
    def of(cls, metadata: dict[str, str]) -> Layout | None:
        try:
            return cls(
                tuple(metadata["blocks"].split(",")), int(metadata["base_text"]),
                int(metadata["appended_text"]), int(metadata["sections"]),
            )  # fmt: skip
        except (KeyError, ValueError):
            return None  # written before sections, or by hand: rewritten next time

    def metadata(self) -> dict[str, str]:
        return {
            "blocks": ",".join(self.blocks), "base_text": str(self.base_text),
            "appended_text": str(self.appended_text), "sections": str(self.sections),
        }  # fmt: skip


DigestIndex = tuple[bytes, bytes]
"""Sorted 8-byte raw digests: of the profiles acknowledged, and of rows held back for lack
of consent (core/sync/unchanged.py)."""
StoredState = tuple[bytes, str, Layout | None]
"""A snapshot's bytes (gzip as stored, or inflated), the ETag they were read at, and the
blob's layout."""


@dataclass(frozen=True)
class Snapshot:
    bucket: int
    body: bytes
    """The whole state, or the section to append: its text, or (`compressed`) a gzip member."""
    compressed: bool
    text_size: int
    etag: str | None
    """The ETag the state was loaded at (None: there was none): the write's condition."""
    index: DigestIndex = (b"", b"")
    """SyncState.index, for the run's digest index file."""
    appended_to: Layout | None = None
    """The stored snapshot the text is appended to (None: it replaces it)."""

    @classmethod
    def of(
        cls, bucket: int, text: bytes, etag: str | None, index: DigestIndex = (b"", b""),
        appended_to: Layout | None = None,
    ) -> Snapshot:  # fmt: skip
        """A writer thread compresses a small text, while the next bucket runs; a larger one
        is compressed before it is queued, so a queued write holds at most
        `_QUEUED_TEXT_BYTES` of text (at 5M rows, four queued snapshots' text was 40 MB)."""
        compressed = len(text) > _QUEUED_TEXT_BYTES
        body = isal_zlib.compress(text, 1, wbits=31) if compressed else text
        return cls(bucket, body, compressed, len(text), etag, index, appended_to)

    @property
    def text(self) -> bytes:
        return isal_zlib.decompress(self.body, wbits=31) if self.compressed else self.body

    @property
    def data(self) -> bytes:
        """As stored: one gzip member."""
        return self.body if self.compressed else isal_zlib.compress(self.body, 1, wbits=31)


_SNAPSHOT_SUFFIX = ".jsonl.gz"


def _state_blob(sync_id: str, destination: str, bucket: int) -> str:
    return f"{sync_id}/{destination}/bucket-{bucket:04d}{_SNAPSHOT_SUFFIX}"


def _plain_etag(etag: str) -> str:
    """Listings and writes quote ETags differently."""
    return etag.strip('"')


def _encode(state: SyncState, *, changed_only: bool = False) -> bytes:
    """The whole snapshot, or (`changed_only`) the section of the profiles this run
    changed: the header, then a line per profile (stored ones in their order, then new
    ones in the order they were acknowledged)."""
    header = orjson.dumps({
        "version": _FORMAT_VERSION,
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
    lines = bytearray(header)
    for identity, profile in state.profiles.items():
        if changed_only and not profile.changed:
            continue
        lines += b"\n"
        lines += profile.line(identity)
    lines += b"\n"
    return bytes(lines)


def _profiles(lines: Iterable[bytes], same_mapping: bool) -> dict[str, ProfileState]:
    """A snapshot's profiles: a later line of an identity (an appended section's) takes
    the earlier one's place."""
    profiles: dict[str, ProfileState] = {}
    for line in lines:
        line = line.rstrip(b"\n")
        if not line or line.startswith(b"{"):
            continue  # blank, or a section's header
        first = line.find(b"\t")
        second = line.find(b"\t", first + 1)
        digest = unhexlify(line[:first]) if first and same_mapping else None
        profiles[orjson.loads(line[first + 1 : second])] = ProfileState(
            digest, line, second + 1, same_mapping
        )
    return profiles


def _decode(text: bytes, fingerprint: str, native: bool, *, sections: bool = True) -> SyncState:
    """`sections`: whether sections may have been appended (else the first line is the
    only header, and the text is not searched for the last one)."""
    end = text.find(b"\n")
    last = text.rfind(b"\n{") + 1 if sections else 0  # the last header (0: the first line)
    last_end = text.find(b"\n", last)
    header = orjson.loads(text[last : last_end if last_end >= 0 else len(text)] or b"{}")
    if header.get("version") not in _READABLE_VERSIONS:
        raise ValueError(f"unsupported sync state version {header.get('version')}")
    # Another mapping (or digest): the raw digests no longer say anything, so lines are
    # rebuilt.
    same_mapping = header.get("fingerprint") == fingerprint and header["version"] >= _DIGESTS_SINCE
    lines = text[end + 1 :] if end >= 0 else b""
    state = SyncState({}, None, fingerprint)
    state._lines, state._same_mapping = lines, same_mapping
    if native:
        with contextlib.suppress(ValueError):  # lines C does not read: none we write
            state.native = SPEEDUPS.State(lines, same_mapping)
    if state.native is None:
        state.use_reference()
    state.last_run = header.get("run")
    state.last_result = header.get("result") or {}
    if same_mapping:  # else consent may be read differently now
        withheld = header.get("withheld") or {}
        state.withheld = {identity: unhexlify(digest) for identity, digest in withheld.items()}
    return state


class StatePrefetch:
    """Snapshots fetched as stored (compressed) on a thread while the file is split, in
    bucket order, up to `budget` bytes: the split keeps one core busy, and the buckets
    that follow need every snapshot a change touches. The bucket phase takes what is
    there and fetches the rest itself."""

    def __init__(self, states: StateStore, buckets: list[int], budget: int) -> None:
        self._stored: dict[int, StoredState | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(states, buckets, budget), name="prefetch-state", daemon=True
        )
        self._thread.start()

    def _run(self, states: StateStore, buckets: list[int], budget: int) -> None:
        held = 0
        for bucket in buckets:
            if self._stop.is_set() or held >= budget:
                return
            try:
                stored = states.fetch(bucket)
            except Exception:  # the bucket phase fetches it again, and reports what fails
                log.warning("prefetching sync state stopped", exc_info=True)
                return
            with self._lock:
                self._stored[bucket] = stored
            held += len(stored[0]) if stored else 0

    def take(self, bucket: int) -> tuple[bool, StoredState | None]:
        """(True, the snapshot or None) if it was fetched, else (False, None)."""
        with self._lock:
            if bucket in self._stored:
                return True, self._stored.pop(bucket)
        return False, None

    def stop(self) -> None:
        """Fetch no more, and let go of what was not taken."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._stored.clear()


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
    text: bytes, fingerprint: str, run_id: str
) -> Iterator[tuple[int, str, DigestIndex]] | None:
    """An index file's (bucket, state ETag, index) records, or None if it is of another
    version, mapping or of run `run_id`."""
    end = text.find(b"\n")
    about = orjson.loads(text[:end])
    if (about.get("version"), about.get("fingerprint")) != (_INDEX_VERSION, fingerprint):
        return None
    if about.get("run") == run_id:
        return None

    def records() -> Iterator[tuple[int, str, DigestIndex]]:
        at = end + 1
        while at < len(text):
            line_end = text.index(b"\n", at)
            record = orjson.loads(text[at:line_end])
            middle = line_end + 1 + 8 * record["profiles"]
            after = middle + 8 * record["withheld"]
            index = (text[line_end + 1 : middle], text[middle:after])
            yield record["bucket"], record["state_etag"], index
            at = after

    return records()


class StateStore:
    def __init__(self, storage: Storage, sync_id: str, destination: str, fingerprint: str) -> None:
        self.storage = storage
        self.sync_id = sync_id
        self.destination = destination
        self.fingerprint = fingerprint

    def load(self, bucket: int, *, native: bool = False) -> SyncState:
        return self.decode(self.fetch(bucket), native=native)

    def stored_buckets(self) -> dict[int, str]:
        """The buckets that have a snapshot, with its ETag, in one listing (a first run
        then fetches none; a bucket written after the listing still conflicts at the
        write)."""
        self.storage.blobs.ensure_container(STATE_CONTAINER)
        prefix = f"{self.sync_id}/{self.destination}/bucket-"
        return {
            int(ref.name[len(prefix) : len(prefix) + 4]): _plain_etag(ref.etag)
            for ref in self.storage.blobs.list(STATE_CONTAINER, prefix)
        }

    def indexes(self, etags: dict[int, str], run_id: str) -> dict[int, DigestIndex]:
        """The digest index of each bucket's snapshot as listed (`etags`), where an index
        file has one (IndexWriter); files written by run `run_id` itself are not read (a
        resumed run must find its bucket results in its snapshots). Files none of whose
        buckets is current any more are deleted once an hour old."""
        prefix = f"{self.sync_id}/{self.destination}/digests/"
        files = list(self.storage.blobs.list(STATE_CONTAINER, prefix))
        with ThreadPoolExecutor(_INDEX_READERS, thread_name_prefix="read-index") as pool:
            texts = list(pool.map(self._read_index, files))
        found: dict[int, DigestIndex] = {}
        stale_before = datetime.now(UTC) - timedelta(hours=1)
        for ref, text in zip(files, texts, strict=True):
            records = _index_records(text, self.fingerprint, run_id) if text else None
            current = {b: index for b, etag, index in records or () if etags.get(b) == etag}
            found.update(current)
            if (
                records is not None
                and not current
                and (ref.last_modified or stale_before) < stale_before
            ):
                self.storage.blobs.delete(STATE_CONTAINER, ref.name)
        return found

    def _read_index(self, ref: BlobRef) -> bytes | None:
        found = self.storage.blobs.read_versioned(STATE_CONTAINER, ref.name)
        return found[0] if found else None

    def index_writer(self, run_id: str) -> IndexWriter:
        name = f"{self.sync_id}/{self.destination}/digests/{run_id}-{uuid.uuid4().hex[:12]}.bin"
        header = {"version": _INDEX_VERSION, "fingerprint": self.fingerprint, "run": run_id}
        writer = self.storage.blobs.writer(STATE_CONTAINER, name, block_bytes=_INDEX_BLOCK_BYTES)
        return IndexWriter(writer, header)

    def fetch(self, bucket: int) -> StoredState | None:
        """A bucket's snapshot as stored (gzip), its ETag and layout, or None if it has
        none yet. Compressed bytes only: a worker fetches the next bucket's on a thread
        while it runs this one, and holding it inflated would grow memory with bucket
        size."""
        self.storage.blobs.ensure_container(STATE_CONTAINER)
        name = _state_blob(self.sync_id, self.destination, bucket)
        found = self.storage.blobs.read_with_metadata(STATE_CONTAINER, name)
        return None if found is None else (found[0], found[1], Layout.of(found[2]))

    @staticmethod
    def inflate(stored: StoredState | None) -> StoredState | None:
        """A fetched snapshot's text, inflated in one call (gzip's line reader costs more
        per profile than the rest); a worker does this on its fetching thread. Each
        section is a gzip member of its own."""
        return None if stored is None else (igzip.decompress(stored[0]), *stored[1:])  # type: ignore[no-untyped-call]

    def decode(self, stored: StoredState | None, *, native: bool = False) -> SyncState:
        """The bucket's state from its stored (gzip) form; `native`: see `decode_text`."""
        return self.decode_text(self.inflate(stored), native=native)

    def decode_text(self, inflated: StoredState | None, *, native: bool = False) -> SyncState:
        """The bucket's state from its inflated text; `native`: with its profiles in C
        (switchboard_sync.State) rather than in Python."""
        if inflated is None:
            text = orjson.dumps({"version": _FORMAT_VERSION, "fingerprint": self.fingerprint})
            return _decode(text, self.fingerprint, native)
        layout = inflated[2]
        sections = layout is None or layout.sections > 0
        state = _decode(inflated[0], self.fingerprint, native, sections=sections)
        state.etag, state.layout = inflated[1], inflated[2]
        return state

    def snapshot(
        self, bucket: int, state: SyncState, *, run_id: str, result: dict[str, Any]
    ) -> Snapshot:
        """The bucket's state as it will be stored: bytes only, so the state's objects can
        go before the write is done (a writer thread then holds its text, not objects)."""
        state.last_run, state.last_result = run_id, result
        layout = state.layout
        if layout is not None and state._same_mapping and layout.sections < _MAX_SECTIONS:
            section = _encode(state, changed_only=True)
            if layout.appended_text + len(section) <= layout.base_text // 2:
                return Snapshot.of(bucket, section, state.etag, state.index(), layout)
        return Snapshot.of(bucket, _encode(state), state.etag, state.index())

    def write(self, snapshot: Snapshot) -> str:
        """Replace the bucket's snapshot only if nobody else did since it was loaded."""
        name = _state_blob(self.sync_id, self.destination, snapshot.bucket)
        client = self.storage.blob_service.get_blob_client(STATE_CONTAINER, name)
        conditions: dict[str, Any]
        if snapshot.etag is None:
            conditions = {"match_condition": MatchConditions.IfMissing}
        else:
            conditions = {"etag": snapshot.etag, "match_condition": MatchConditions.IfNotModified}
        data = snapshot.data
        staged = []
        for start in range(0, len(data), _BLOCK_BYTES):
            staged.append(base64.b64encode(uuid.uuid4().hex.encode()).decode())
            block = data if len(data) <= _BLOCK_BYTES else data[start : start + _BLOCK_BYTES]
            client.stage_block(staged[-1], block)
        before = snapshot.appended_to
        if before is None:
            layout = Layout(tuple(staged), snapshot.text_size)
        else:
            layout = Layout(
                before.blocks + tuple(staged), before.base_text,
                before.appended_text + snapshot.text_size, before.sections + 1,
            )  # fmt: skip
        try:
            written = client.commit_block_list(
                [BlobBlock(block) for block in layout.blocks], metadata=layout.metadata(),
                **conditions,
            )  # fmt: skip
        except (ResourceModifiedError, ResourceExistsError):
            raise ConcurrencyConflict(
                f"sync state {self.sync_id}/{self.destination} bucket {snapshot.bucket} "
                "changed meanwhile"
            ) from None
        return _plain_etag(str(written["etag"]))


def audience_members(storage: Storage, sync_id: str, audience: str) -> Iterator[str]:
    """Identities a sync's destination holds in `audience` because Switchboard added them
    (every destination of the sync, so an identity may repeat), read as a stream."""
    needle = orjson.dumps(audience)
    storage.blobs.ensure_container(STATE_CONTAINER)
    for ref in storage.blobs.list(STATE_CONTAINER, prefix=f"{sync_id}/"):
        if not ref.name.endswith(_SNAPSHOT_SUFFIX):
            continue  # a bucket's digest index
        members: dict[bytes, bool] = {}  # a later section's line takes an identity's place
        with igzip.IGzipFile(fileobj=storage.blobs.open_reader(ref), mode="rb") as lines:  # type: ignore[no-untyped-call]
            for line in lines:
                if line.startswith(b"{"):
                    continue  # a section's header
                _, identity, stored = line.rstrip(b"\n").split(b"\t", 2)
                # The needle is a cheap pre-check before parsing.
                if needle in stored and audience in orjson.loads(stored)[1]:
                    members[identity] = True
                elif identity in members:
                    members[identity] = False
        yield from (str(orjson.loads(identity)) for identity, held in members.items() if held)
