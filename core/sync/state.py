"""What the destination already has from us: the delta state of one sync, per bucket.

Per profile: an 8-byte digest of the raw source values last acknowledged (a row whose raw
values are unchanged needs no typing or diffing at all), an 8-byte hash of every
attribute value acknowledged (so only changed attributes are sent), and the audiences
Switchboard itself added (only those are ever removed).

State is split into the same identity-hash buckets as the input, one gzip'd JSON Lines
snapshot per bucket: `sync-state/{sync_id}/{destination}/bucket-{n:04d}.jsonl.gz`. A
bucket is loaded when its rows are processed and replaced once they are acknowledged,
under the ETag it was loaded with, so memory holds one bucket and two writers of the
same bucket cannot both win. A file's header records the mapping's fingerprint; raw
digests from another mapping are ignored (attribute hashes still hold).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
from binascii import unhexlify
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
from isal import igzip, isal_zlib
from xxhash import xxh64_digest

from core.errors import ConcurrencyConflict
from core.storage import Storage

STATE_CONTAINER = "sync-state"
_FORMAT_VERSION = 4
_READABLE_VERSIONS = (3, 4)
"""Version 3 hashed attribute values with BLAKE2b: its hashes never match version 4's, so
a profile's attributes are each sent once more, the first time its row changes."""
_INDEX_VERSION = 1
_NULL_HASH = b"\x00" * 8
_blake2b = hashlib.blake2b


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
    """Digest of a row's raw source values (those the mapping reads): one JSON encoding of
    the list, so no Python work per value (this runs for every row of every file)."""
    return _blake2b(orjson.dumps(values), digest_size=8).digest()


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

    def digests(self) -> bytes:
        """The raw digests acknowledged, sorted, 8 bytes each (UnchangedIndex's input); a
        digest two profiles share (never, short of a collision) is left out."""
        if self.native is not None:
            return bytes(self.native.digests())
        counted = Counter(p.digest for p in self.profiles.values() if p.digest is not None)
        return b"".join(sorted(digest for digest, times in counted.items() if times == 1))

    def mark_seen(self, digests: bytes, state_etag: str) -> set[str]:
        """The profiles whose rows the split settled (their raw digests) against this state
        at `state_etag`: marked seen in C, or returned for the reference's seen set.
        Raises ConcurrencyConflict if the state changed since the split."""
        if _plain_etag(self.etag or "") != state_etag:
            raise ConcurrencyConflict("sync state changed since the file was split")
        wanted = {digests[at : at + 8] for at in range(0, len(digests), 8)}
        if self.native is not None:
            marked = int(self.native.mark_seen(digests))
            seen: set[str] = set()
        else:
            seen = {i for i, p in self.profiles.items() if p.digest in wanted}
            marked = len(seen)
        if marked != len(wanted):
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


StoredState = tuple[bytes, str]
"""A snapshot's bytes (gzip as stored, or inflated) and the ETag they were read at."""


@dataclass(frozen=True)
class Snapshot:
    bucket: int
    text: bytes
    """The encoded state, not yet compressed (the writer's thread compresses it)."""
    etag: str | None
    """The ETag the state was loaded at (None: there was none): the write's condition."""
    digests: bytes = b""
    """The raw digests acknowledged (SyncState.digests), for the bucket's index."""
    run_id: str | None = None


_SNAPSHOT_SUFFIX = ".jsonl.gz"


def _state_blob(sync_id: str, destination: str, bucket: int) -> str:
    return f"{sync_id}/{destination}/bucket-{bucket:04d}{_SNAPSHOT_SUFFIX}"


def _index_blob(sync_id: str, destination: str, bucket: int) -> str:
    return f"{sync_id}/{destination}/digests-{bucket:04d}.bin"


def _plain_etag(etag: str) -> str:
    """Listings and writes quote ETags differently."""
    return etag.strip('"')


def _encode(state: SyncState) -> bytes:
    header = {
        "version": _FORMAT_VERSION,
        "fingerprint": state.fingerprint,
        "run": state.last_run,
        "result": state.last_result,
        "withheld": {identity: digest.hex() for identity, digest in state.withheld_now.items()},
    }
    if state.native is not None:
        text: bytes = state.native.encode(orjson.dumps(header))
        return text
    lines = bytearray(orjson.dumps(header))
    for identity, profile in state.profiles.items():
        lines += b"\n"
        lines += profile.line(identity)
    lines += b"\n"
    return bytes(lines)


def _profiles(lines: Iterable[bytes], same_mapping: bool) -> dict[str, ProfileState]:
    profiles: dict[str, ProfileState] = {}
    for line in lines:
        line = line.rstrip(b"\n")
        if not line:
            continue
        first = line.find(b"\t")
        second = line.find(b"\t", first + 1)
        digest = unhexlify(line[:first]) if first and same_mapping else None
        profiles[orjson.loads(line[first + 1 : second])] = ProfileState(
            digest, line, second + 1, same_mapping
        )
    return profiles


def _decode(text: bytes, fingerprint: str, native: bool) -> SyncState:
    end = text.find(b"\n")
    header = orjson.loads(text[: end if end >= 0 else len(text)] or b"{}")
    if header.get("version") not in _READABLE_VERSIONS:
        raise ValueError(f"unsupported sync state version {header.get('version')}")
    # Another mapping: the raw digests no longer say anything, so lines are rebuilt.
    same_mapping = header.get("fingerprint") == fingerprint
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

    def fetch_index(self, bucket: int, state_etag: str, run_id: str) -> bytes | None:
        """The raw digests the bucket's snapshot at `state_etag` acknowledged, or None if
        its index is missing or was written for another snapshot or mapping, or by run
        `run_id` itself (resumed: the bucket must find its result in its snapshot)."""
        name = _index_blob(self.sync_id, self.destination, bucket)
        stored = self.storage.blobs.read_versioned(STATE_CONTAINER, name)
        if stored is None:
            return None
        header, _, digests = stored[0].partition(b"\n")
        about = orjson.loads(header)
        current = (
            about.get("version") == _INDEX_VERSION and about.get("state_etag") == state_etag
            and about.get("fingerprint") == self.fingerprint and len(digests) % 8 == 0
            and about.get("run") != run_id
        )  # fmt: skip
        return digests if current else None

    def fetch(self, bucket: int) -> StoredState | None:
        """A bucket's snapshot as stored (gzip) and its ETag, or None if it has none yet.
        Compressed bytes only: a worker fetches the next bucket's on a thread while it
        runs this one, and holding it inflated would grow memory with bucket size."""
        self.storage.blobs.ensure_container(STATE_CONTAINER)
        name = _state_blob(self.sync_id, self.destination, bucket)
        return self.storage.blobs.read_versioned(STATE_CONTAINER, name)

    @staticmethod
    def inflate(stored: StoredState | None) -> StoredState | None:
        """A fetched snapshot's text, inflated in one call (gzip's line reader costs more
        per profile than the rest); a worker does this on its fetching thread."""
        return None if stored is None else (isal_zlib.decompress(stored[0], wbits=31), stored[1])

    def decode(self, stored: StoredState | None, *, native: bool = False) -> SyncState:
        """The bucket's state from its stored (gzip) form; `native`: see `decode_text`."""
        return self.decode_text(self.inflate(stored), native=native)

    def decode_text(self, inflated: StoredState | None, *, native: bool = False) -> SyncState:
        """The bucket's state from its inflated text; `native`: with its profiles in C
        (switchboard_sync.State) rather than in Python."""
        if inflated is None:
            text = orjson.dumps({"version": _FORMAT_VERSION, "fingerprint": self.fingerprint})
            return _decode(text, self.fingerprint, native)
        state = _decode(inflated[0], self.fingerprint, native)
        state.etag = inflated[1]
        return state

    def snapshot(
        self, bucket: int, state: SyncState, *, run_id: str, result: dict[str, Any]
    ) -> Snapshot:
        """The bucket's state as it will be stored: bytes only, so the state's objects can
        go before the write is done (a writer thread then holds its text, not objects)."""
        state.last_run, state.last_result = run_id, result
        return Snapshot(bucket, _encode(state), state.etag, state.digests(), run_id)

    def write(self, snapshot: Snapshot) -> str:
        """Replace the bucket's snapshot only if nobody else did since it was loaded."""
        name = _state_blob(self.sync_id, self.destination, snapshot.bucket)
        client = self.storage.blob_service.get_blob_client(STATE_CONTAINER, name)
        conditions: dict[str, Any]
        if snapshot.etag is None:
            conditions = {"match_condition": MatchConditions.IfMissing}
        else:
            conditions = {"etag": snapshot.etag, "match_condition": MatchConditions.IfNotModified}
        try:
            data = isal_zlib.compress(snapshot.text, 1, wbits=31)
            written = client.upload_blob(data, overwrite=True, **conditions)
        except (ResourceModifiedError, ResourceExistsError):
            raise ConcurrencyConflict(
                f"sync state {self.sync_id}/{self.destination} bucket {snapshot.bucket} "
                "changed meanwhile"
            ) from None
        etag = _plain_etag(str(written["etag"]))
        # After the snapshot, naming it: an index left behind by a crash names the
        # snapshot before, and is not used.
        header = {
            "version": _INDEX_VERSION, "state_etag": etag, "fingerprint": self.fingerprint,
            "run": snapshot.run_id,
        }  # fmt: skip
        index = _index_blob(self.sync_id, self.destination, snapshot.bucket)
        self.storage.blob_service.get_blob_client(STATE_CONTAINER, index).upload_blob(
            orjson.dumps(header) + b"\n" + snapshot.digests, overwrite=True
        )
        return etag


def audience_members(storage: Storage, sync_id: str, audience: str) -> Iterator[str]:
    """Identities a sync's destination holds in `audience` because Switchboard added them
    (every destination of the sync, so an identity may repeat), read as a stream."""
    needle = orjson.dumps(audience)
    storage.blobs.ensure_container(STATE_CONTAINER)
    for ref in storage.blobs.list(STATE_CONTAINER, prefix=f"{sync_id}/"):
        if not ref.name.endswith(_SNAPSHOT_SUFFIX):
            continue  # a bucket's digest index
        with igzip.IGzipFile(fileobj=storage.blobs.open_reader(ref), mode="rb") as lines:  # type: ignore[no-untyped-call]
            next(lines, None)  # the header
            for line in lines:
                _, identity, stored = line.rstrip(b"\n").split(b"\t", 2)
                if needle not in stored:
                    continue  # cheap pre-check before parsing
                _, audiences = orjson.loads(stored)
                if audience in audiences:
                    yield str(orjson.loads(identity))
