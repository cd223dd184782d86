"""What the destination already has from us: the delta state of one sync.

Per profile: an 8-byte hash of every attribute value the destination acknowledged, and the
audiences Switchboard itself added. Only attributes whose hash differs are sent, and only
memberships we added are ever removed.

The state lives in Blob storage as a gzip'd JSON Lines snapshot,
`sync-state/{sync_id}/{destination}/state.jsonl.gz`, loaded once per run and written once
at the end under the ETag it was read with (two runs of one sync cannot both commit). Its
size is tens of bytes per profile, so a million-profile diff is one sequential read
instead of a million point look-ups.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

from core.errors import ConcurrencyConflict
from core.storage import Storage
from core.storage.blobs import BlobRef

STATE_CONTAINER = "sync-state"
_FORMAT_VERSION = 1
_NULL_HASH = b"\x00" * 8


def value_hash(value: Any) -> bytes:
    """Stable 8-byte hash of a JSON value (key order does not matter)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


@dataclass
class ProfileState:
    hashes: dict[str, bytes] = field(default_factory=dict)
    audiences: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Change:
    """What to send for one profile: changed attributes and membership moves."""

    attributes: dict[str, Any]
    added: tuple[str, ...]
    removed: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.attributes or self.added or self.removed)


class SyncState:
    """The acknowledged state of one sync, in memory for the run, committed at the end."""

    def __init__(self, profiles: dict[str, ProfileState], etag: str | None) -> None:
        self.profiles = profiles
        self.etag = etag

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
        for name, value in attributes.items():
            if value is None:
                # Null means "the source is empty": cleared only where the mapping says so
                # and only if we had sent something.
                if name in send_nulls and hashes.get(name, _NULL_HASH) != _NULL_HASH:
                    changed[name] = None
                continue
            if hashes.get(name) != value_hash(value):
                changed[name] = value
        added = tuple(sorted(n for n, m in memberships.items() if m and n not in owned))
        removed = tuple(sorted(n for n, m in memberships.items() if not m and n in owned))
        return Change(changed, added, removed)

    def acknowledge(self, identity: str, change: Change) -> None:
        profile = self.profiles.setdefault(identity, ProfileState())
        for name, value in change.attributes.items():
            profile.hashes[name] = _NULL_HASH if value is None else value_hash(value)
        profile.audiences.update(change.added)
        profile.audiences.difference_update(change.removed)


def _state_blob(sync_id: str, destination: str) -> str:
    return f"{sync_id}/{destination}/state.jsonl.gz"


def _encode(profiles: dict[str, ProfileState]) -> Iterator[bytes]:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=5) as out:
        out.write(json.dumps({"version": _FORMAT_VERSION}).encode() + b"\n")
        for identity, profile in profiles.items():
            record = [
                identity,
                {name: digest.hex() for name, digest in profile.hashes.items()},
                sorted(profile.audiences),
            ]
            out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode())
            out.write(b"\n")
            if buffer.tell() > 1 << 20:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
    yield buffer.getvalue()


def _decode(lines: Iterable[bytes]) -> dict[str, ProfileState]:
    profiles: dict[str, ProfileState] = {}
    iterator = iter(lines)
    header = json.loads(next(iterator, b'{"version": 1}'))
    if header.get("version") != _FORMAT_VERSION:
        raise ValueError(f"unsupported sync state version {header.get('version')}")
    for line in iterator:
        identity, hashes, audiences = json.loads(line)
        profiles[identity] = ProfileState(
            {name: bytes.fromhex(h) for name, h in hashes.items()}, set(audiences)
        )
    return profiles


class StateStore:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def load(self, sync_id: str, destination: str) -> SyncState:
        name = _state_blob(sync_id, destination)
        self.storage.blobs.ensure_container(STATE_CONTAINER)
        client = self.storage.blob_service.get_blob_client(STATE_CONTAINER, name)
        if not client.exists():
            return SyncState({}, None)
        props = client.get_blob_properties()
        ref = BlobRef(STATE_CONTAINER, name, str(props.etag), int(props.size))
        with gzip.GzipFile(fileobj=self.storage.blobs.open_reader(ref), mode="rb") as lines:
            return SyncState(_decode(lines), ref.etag)

    def commit(self, sync_id: str, destination: str, state: SyncState) -> None:
        """Replace the snapshot only if nobody else did since it was loaded."""
        name = _state_blob(sync_id, destination)
        client = self.storage.blob_service.get_blob_client(STATE_CONTAINER, name)
        data = b"".join(_encode(state.profiles))
        conditions: dict[str, Any]
        if state.etag is None:
            conditions = {"match_condition": MatchConditions.IfMissing}
        else:
            conditions = {"etag": state.etag, "match_condition": MatchConditions.IfNotModified}
        try:
            result = client.upload_blob(data, overwrite=True, **conditions)
        except (ResourceModifiedError, ResourceExistsError):
            raise ConcurrencyConflict(
                f"sync state of {sync_id}/{destination} changed during this run"
            ) from None
        state.etag = str(result["etag"])
