"""Erasure from the sync delta state: the person's profiles taken out of every sync's state,
and the blobs their earlier state was in deleted.

A bucket's state lives in parts of pack blobs that other buckets' parts share, so taking
one profile out of a bucket is not enough: its old parts stay readable in their packs.
Every bucket with a part in one of those packs is written again, into one new pack (a
bucket without the person as it was, its text copied whole; a bucket with them decoded
and written without them), its pointer replaced under the ETag it was read at, and the
old packs are then deleted. A run that changed a bucket meanwhile makes the sync's state be
read again (a few times, then the erasure fails and is retried); one that is still reading
the old packs fails and is retried. A pointer to a part whose blob is gone (and stays so) is
counted, not fatal: there is nothing of anyone left in it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

from azure.core.exceptions import ResourceNotFoundError

from core.errors import ConcurrencyConflict
from core.privacy.person import Matcher
from core.storage import Storage
from core.storage.tables import safe_key
from core.sync import state_codec
from core.sync.state import (
    BINARY_START,
    STATE_CONTAINER,
    BucketPointer,
    Snapshot,
    StateStore,
    StoredBucket,
    encode_state,
)

log = logging.getLogger(__name__)


def state_folders(storage: Storage) -> list[tuple[str, str]]:
    """(sync id, destination) of every delta state there is, declared or not."""
    storage.blobs.ensure_container(STATE_CONTAINER)
    found: set[tuple[str, str]] = set()
    for row in storage.tables.get(BucketPointer).query(""):
        found.add((row.partition_key, row.row_key.split("|", 1)[0]))
    for ref in storage.blobs.list(STATE_CONTAINER):
        sync_id, _, rest = ref.name.partition("/")
        destination = rest.partition("/")[0]
        if destination:
            found.add((safe_key(sync_id), destination))
    return sorted(found)


def _fingerprint(text: bytes) -> str:
    """The mapping fingerprint a state was written under (its last section's)."""
    headers = [section.header for section in state_codec.sections(text)]
    return str(headers[-1].get("fingerprint", "")) if headers else ""


def erase_from_states(storage: Storage, matcher: Matcher, run_id: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for sync_id, destination in state_folders(storage):
        for attempt in range(_ATTEMPTS):
            try:
                counts.update(_erase_folder(storage, matcher, run_id, sync_id, destination))
                break
            except (ConcurrencyConflict, _Moved):
                # A run committed meanwhile (and may have collected the packs read here).
                if attempt == _ATTEMPTS - 1:
                    raise
    return counts


_ATTEMPTS = 3


class _Moved(Exception):
    """A bucket's part was gone and its pointer has moved since: read the folder again."""


def _erase_folder(
    storage: Storage, matcher: Matcher, run_id: str, sync_id: str, destination: str
) -> Counter[str]:
    counts: Counter[str] = Counter()
    identities = matcher.person.values()
    store = StateStore(storage, sync_id, destination, "")
    stored = store.stored_buckets()
    rewritten: dict[int, Snapshot] = {}
    lost: set[int] = set()
    for bucket, text in _bucket_texts(store, stored, lost):
        if not matcher.may_be_in(text):
            continue
        fingerprint = _fingerprint(text) if text.startswith(BINARY_START) else ""
        writer = StateStore(storage, sync_id, destination, fingerprint)
        state = writer.decode_text((text, stored[bucket].etag, stored[bucket].layout))
        gone = [i for i in state.profiles if i in identities]
        held = [i for i in state.withheld if i in identities]
        if not gone and not held and not matcher.in_value(state.last_result):
            continue  # the bytes were part of something else (a hash, a longer id)
        for identity in gone:
            del state.profiles[identity]
        state.withheld_now = {i: d for i, d in state.withheld.items() if i not in identities}
        # A finished run's result (its rejects kept here) is not needed any more.
        state.last_run, state.last_result = None, {}
        rewritten[bucket] = Snapshot.of(bucket, encode_state(state), _pointer(stored[bucket]))
        counts["sync_state.profiles"] += len(gone)
        counts["sync_state.held_back"] += len(held)
    if lost:
        now = store.stored_buckets()
        if any(now.get(b, stored[b]).etag != stored[b].etag for b in lost):
            raise _Moved
        # Pointers to parts that are not there: no one's data is left in them to erase.
        counts["sync_state.buckets_unreadable"] += len(lost)
        log.warning(
            "erasure found sync state pointing at missing blobs",
            extra={"sync_id": sync_id, "destination": destination, "buckets": sorted(lost)},
        )
    if not rewritten:
        return counts
    old = {part.blob for b in rewritten for part in stored[b].layout.parts}
    sharing = {
        b: s for b, s in stored.items()
        if b not in rewritten and b not in lost and any(part.blob in old for part in s.layout.parts)
    }  # fmt: skip
    lost_sharing: set[int] = set()
    for bucket, text in _bucket_texts(store, sharing, lost_sharing):
        rewritten[bucket] = Snapshot.of(bucket, text, _pointer(stored[bucket]))
    if lost_sharing:
        raise _Moved  # readable a moment ago
    pack = store.pack_writer(f"erasure-{run_id}")
    for snapshot in rewritten.values():
        pack.add(snapshot, lambda etag: None)
    pack.close()  # ConcurrencyConflict if a run changed a bucket meanwhile
    still = {part.blob for s in store.stored_buckets().values() for part in s.layout.parts}
    for blob in sorted(old - still):
        storage.blobs.delete(STATE_CONTAINER, store.folder + blob)
        counts["sync_state.blobs_deleted"] += 1
    counts["sync_state.buckets_rewritten"] += len(rewritten)
    log.info(
        "erasure rewrote sync state",
        extra={"sync_id": sync_id, "destination": destination, "buckets": len(rewritten)},
    )
    return counts


def _pointer(stored: StoredBucket) -> str | None:
    """The write's condition: the pointer's ETag (None: a bucket blob from before packs)."""
    return None if stored.layout.legacy else stored.etag


def _bucket_texts(
    store: StateStore, stored: dict[int, StoredBucket], lost: set[int]
) -> Iterator[tuple[int, bytes]]:
    """Each bucket's text, one at a time; buckets with a part whose blob is not there go
    into `lost`."""
    reader = store.reader(stored, sorted(stored))
    try:
        for bucket in sorted(stored):
            try:
                inflated = store.inflate(reader.take(bucket))
            except ResourceNotFoundError:
                lost.add(bucket)
                continue
            if inflated is not None:
                yield bucket, inflated[0]
    finally:
        reader.stop()
