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

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
from isal import igzip, isal_zlib

from core.errors import ConcurrencyConflict
from core.storage import Storage

STATE_CONTAINER = "sync-state"
_FORMAT_VERSION = 3
_NULL_HASH = b"\x00" * 8
_blake2b = hashlib.blake2b


def value_hash(value: Any) -> bytes:
    """Stable 8-byte hash of a JSON value (key order does not matter)."""
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
        return _blake2b(
            b"j" + orjson.dumps(value, option=orjson.OPT_SORT_KEYS), digest_size=8
        ).digest()
    return _blake2b(text.encode(), digest_size=8).digest()


def raw_digest(values: Sequence[Any]) -> bytes:
    """Digest of a row's raw source values (those the mapping reads): one JSON encoding of
    the list, so no Python work per value (this runs for every row of every file)."""
    return _blake2b(orjson.dumps(values), digest_size=8).digest()


class ProfileState:
    """One profile's acknowledged state.

    Loaded lazily: attribute hashes and audiences stay as the snapshot's bytes until a row
    needs them, and are written back untouched when no row did (most profiles, most runs).
    """

    __slots__ = ("_audiences", "_hashes", "_stored", "digest")

    def __init__(self, digest: bytes | None = None, stored: bytes | None = None) -> None:
        self.digest = digest
        self._stored = stored
        self._hashes: dict[str, bytes] | None = None if stored else {}
        self._audiences: set[str] | None = None if stored else set()

    def _parse(self) -> None:
        assert self._stored is not None
        hashes, audiences = orjson.loads(self._stored)
        self._hashes = {name: bytes.fromhex(h) for name, h in hashes.items()}
        self._audiences = set(audiences)
        self._stored = None

    @property
    def hashes(self) -> dict[str, bytes]:
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

    def stored(self) -> bytes:
        if self._stored is not None:
            return self._stored
        hashes = {name: digest.hex() for name, digest in self.hashes.items()}
        return orjson.dumps([hashes, sorted(self.audiences)])


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
    """The acknowledged state of one bucket of one sync, in memory while it is processed."""

    def __init__(
        self, profiles: dict[str, ProfileState], etag: str | None, fingerprint: str = ""
    ) -> None:
        self.profiles = profiles
        self.etag = etag
        self.fingerprint = fingerprint
        self.last_run: str | None = None
        """The run that committed this snapshot, with its bucket result: a run resumed after
        committing a bucket but before recording it finds its own result here."""
        self.last_result: dict[str, Any] = {}
        self.dirty = False
        """Whether anything was acknowledged since loading (else there is nothing to commit)."""

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
        self.dirty = True
        profile = self.profiles.setdefault(identity, ProfileState())
        profile.hashes.update(change.hashes)
        profile.audiences.update(change.added)
        profile.audiences.difference_update(change.removed)
        if digest is not None:
            profile.digest = digest

    def remember_digest(self, identity: str, digest: bytes) -> None:
        """An unchanged row: its raw form may differ (e.g. 'existing' for 'realized')."""
        known = self.profiles.get(identity)
        if known is not None and known.digest != digest:
            known.digest = digest
            self.dirty = True


StoredState = tuple[bytes, str]
"""A snapshot's gzip bytes and the ETag they were read at."""


def _state_blob(sync_id: str, destination: str, bucket: int) -> str:
    return f"{sync_id}/{destination}/bucket-{bucket:04d}.jsonl.gz"


def _encode(state: SyncState) -> bytes:
    header = {
        "version": _FORMAT_VERSION,
        "fingerprint": state.fingerprint,
        "run": state.last_run,
        "result": state.last_result,
    }
    text = bytearray(orjson.dumps(header))
    for identity, profile in state.profiles.items():
        # digest TAB identity (JSON, so no tabs or newlines) TAB [hashes, audiences]
        text += b"\n"
        text += profile.digest.hex().encode() if profile.digest else b""
        text += b"\t"
        text += orjson.dumps(identity)
        text += b"\t"
        text += profile.stored()
    text += b"\n"
    return igzip.compress(text, compresslevel=1)


def _decode(lines: Iterable[bytes], fingerprint: str) -> SyncState:
    iterator = iter(lines)
    header = orjson.loads(next(iterator, b"{}") or b"{}")
    if header.get("version") != _FORMAT_VERSION:
        raise ValueError(f"unsupported sync state version {header.get('version')}")
    same_mapping = header.get("fingerprint") == fingerprint
    profiles: dict[str, ProfileState] = {}
    for line in iterator:
        if not line:
            continue  # the end of the last line
        digest, identity, stored = line.split(b"\t", 2)
        profiles[orjson.loads(identity)] = ProfileState(
            bytes.fromhex(digest.decode()) if digest and same_mapping else None, stored
        )
    state = SyncState(profiles, None, fingerprint)
    state.last_run = header.get("run")
    state.last_result = header.get("result") or {}
    return state


class StateStore:
    def __init__(self, storage: Storage, sync_id: str, destination: str, fingerprint: str) -> None:
        self.storage = storage
        self.sync_id = sync_id
        self.destination = destination
        self.fingerprint = fingerprint

    def load(self, bucket: int) -> SyncState:
        return self.decode(self.fetch(bucket))

    def fetch(self, bucket: int) -> StoredState | None:
        """A bucket's snapshot as stored (gzip) and its ETag, or None if it has none yet.
        Bytes only: a worker fetches the next bucket's while it runs this one."""
        self.storage.blobs.ensure_container(STATE_CONTAINER)
        name = _state_blob(self.sync_id, self.destination, bucket)
        return self.storage.blobs.read_versioned(STATE_CONTAINER, name)

    def decode(self, stored: StoredState | None) -> SyncState:
        if stored is None:
            return SyncState({}, None, self.fingerprint)
        data, etag = stored
        # Inflated in one call: gzip's line reader costs more per profile than the rest.
        state = _decode(isal_zlib.decompress(data, wbits=31).split(b"\n"), self.fingerprint)
        state.etag = etag
        return state

    def commit(self, bucket: int, state: SyncState, *, run_id: str, result: dict[str, Any]) -> None:
        """Replace the bucket's snapshot only if nobody else did since it was loaded."""
        state.last_run, state.last_result = run_id, result
        name = _state_blob(self.sync_id, self.destination, bucket)
        client = self.storage.blob_service.get_blob_client(STATE_CONTAINER, name)
        conditions: dict[str, Any]
        if state.etag is None:
            conditions = {"match_condition": MatchConditions.IfMissing}
        else:
            conditions = {"etag": state.etag, "match_condition": MatchConditions.IfNotModified}
        try:
            result = client.upload_blob(_encode(state), overwrite=True, **conditions)
        except (ResourceModifiedError, ResourceExistsError):
            raise ConcurrencyConflict(
                f"sync state {self.sync_id}/{self.destination} bucket {bucket} changed meanwhile"
            ) from None
        state.etag = str(result["etag"])


def audience_members(storage: Storage, sync_id: str, audience: str) -> Iterator[str]:
    """Identities a sync's destination holds in `audience` because Switchboard added them
    (every destination of the sync, so an identity may repeat), read as a stream."""
    needle = orjson.dumps(audience)
    storage.blobs.ensure_container(STATE_CONTAINER)
    for ref in storage.blobs.list(STATE_CONTAINER, prefix=f"{sync_id}/"):
        with igzip.IGzipFile(fileobj=storage.blobs.open_reader(ref), mode="rb") as lines:  # type: ignore[no-untyped-call]
            next(lines, None)  # the header
            for line in lines:
                _, identity, stored = line.rstrip(b"\n").split(b"\t", 2)
                if needle not in stored:
                    continue  # cheap pre-check before parsing
                _, audiences = orjson.loads(stored)
                if audience in audiences:
                    yield str(orjson.loads(identity))
