"""Profiles an engagement platform holds, for destinations that cannot say so themselves.

A file destination (Adobe Campaign's import files) is never told "no such profile": a row
for a profile Campaign does not have would create one, or fail inside Campaign's workflow
where nobody sees it. So the platform's own profile export lands under
`known-profiles/{registry}/` and is applied here; a destination in update-only mode writes
only rows whose key is known, the others end `unmatched`.

Export files: UTF-8 text with a header line, separated by tab, `;` or `,` (whichever the
header has); the first column is the profile's key, as the sync's identity column gives
it. A file whose name contains `full` replaces the registry; any other file is a delta:
it adds its keys, and removes those whose `_deleted` column is 1, true or yes. Lines with
an empty key are rejected to `rejects/known-profiles/{registry}/{file}.jsonl` (line,
reason, original bytes).

Stored as sorted 8-byte keyed hashes (blake2b) in `_SHARDS` blobs per registry, each
written under its ETag: memory while loading or looking up is 8 bytes per profile, not the
export's size; no key is stored in the clear.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

import orjson

from core.errors import ConcurrencyConflict
from core.storage import Storage

CONTAINER = "known-profiles"
"""Where platform profile exports land: `{registry}/{file}`."""
STORE_CONTAINER = "sync-state"
_STORE_PREFIX = "known-profiles"
REJECTS_CONTAINER = "rejects"
_SHARDS = 16
_ATTEMPTS = 5
_DELETED = {b"1", b"true", b"yes", b"y"}


def profile_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def _shard(hashed: int) -> int:
    return hashed % _SHARDS


@dataclass
class ExportApplied:
    """What one export file did to the registry."""

    rows: int = 0
    added: int = 0
    removed: int = 0
    rejected: int = 0
    profiles: int = 0
    """Profiles known after it."""
    full: bool = False
    rejects: list[dict[str, object]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "rows": self.rows, "added": self.added, "removed": self.removed,
            "rejected": self.rejected, "profiles": self.profiles,
        }  # fmt: skip


def _separator(header: bytes) -> bytes:
    for candidate in (b"\t", b";", b","):
        if candidate in header:
            return candidate
    return b"\t"


def _read_export(lines: Iterable[bytes], applied: ExportApplied) -> Iterator[tuple[int, bool]]:
    """(hash, deleted) per good line of an export; bad lines are recorded as rejects."""
    iterator = iter(lines)
    header = next(iterator, b"").removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n")
    separator = _separator(header)
    columns = [name.strip().lower() for name in header.split(separator)]
    deleted_at = columns.index(b"_deleted") if b"_deleted" in columns else -1
    for number, raw in enumerate(iterator, start=2):
        line = raw.rstrip(b"\r\n")
        if not line.strip():
            continue
        applied.rows += 1
        cells = line.split(separator)
        key = cells[0].strip()
        reason = None
        if not key:
            reason = "empty_key"
        else:
            try:
                text = key.decode("utf-8")
            except UnicodeDecodeError:
                reason = "not_utf8"
        if reason is not None:
            applied.rejected += 1
            applied.rejects.append({
                "line": number, "reason": reason,
                "raw_base64": base64.b64encode(raw).decode(),
            })  # fmt: skip
            continue
        deleted = 0 <= deleted_at < len(cells) and cells[deleted_at].strip().lower() in _DELETED
        yield profile_hash(text), deleted


class KnownProfiles:
    """One registry: load it for lookups, or apply an export file to it."""

    def __init__(self, storage: Storage, registry: str) -> None:
        self.blobs = storage.blobs
        self.registry = registry
        self._loaded: list[array[int]] | None = None

    def _name(self, shard: int) -> str:
        return f"{_STORE_PREFIX}/{self.registry}/{shard:02d}.bin"

    def _read(self, shard: int) -> tuple[array[int], str | None]:
        found = self.blobs.read_versioned(STORE_CONTAINER, self._name(shard))
        values = array("Q")
        if found is None:
            return values, None
        values.frombytes(found[0])
        return values, found[1]

    # -- lookups ---------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        if self._loaded is None:
            self._loaded = [self._read(shard)[0] for shard in range(_SHARDS)]
        hashed = profile_hash(key)
        values = self._loaded[_shard(hashed)]
        at = bisect.bisect_left(values, hashed)
        return at < len(values) and values[at] == hashed

    def count(self) -> int:
        return sum(len(self._read(shard)[0]) for shard in range(_SHARDS))

    # -- loading ---------------------------------------------------------------------------

    def apply_export(self, name: str, reader: IO[bytes]) -> ExportApplied:
        """Apply one export file (streamed line by line); see the module's docstring."""
        applied = ExportApplied(full="full" in name.rsplit("/", 1)[-1].lower())
        adds = [array("Q") for _ in range(_SHARDS)]
        removes = [array("Q") for _ in range(_SHARDS)]
        for hashed, deleted in _read_export(reader, applied):
            (removes if deleted else adds)[_shard(hashed)].append(hashed)
        for shard in range(_SHARDS):
            added, removed, total = self._apply_shard(
                shard, adds[shard], removes[shard], applied.full
            )
            applied.added += added
            applied.removed += removed
            applied.profiles += total
            adds[shard] = removes[shard] = array("Q")  # let them go as we go
        return applied

    def _apply_shard(
        self, shard: int, adds: array[int], removes: array[int], full: bool
    ) -> tuple[int, int, int]:
        gone = set(removes)
        for _ in range(_ATTEMPTS):
            current, etag = self._read(shard)
            before = set(current)
            after = set() if full else set(before)
            after.update(adds)
            after.difference_update(gone)
            if after == before:
                return 0, 0, len(before)
            data = array("Q", sorted(after)).tobytes()
            try:
                self.blobs.write_versioned(STORE_CONTAINER, self._name(shard), data, etag)
            except ConcurrencyConflict:
                continue  # another file of this registry landed at the same time
            return len(after - before), len(before - after), len(after)
        raise ConcurrencyConflict(f"known-profiles shard {self._name(shard)} still contended")

    def write_rejects(self, name: str, applied: ExportApplied) -> str | None:
        """The export's rejected lines as JSON lines, or None when it had none."""
        if not applied.rejects:
            return None
        path = f"known-profiles/{self.registry}/{name.rsplit('/', 1)[-1]}.jsonl"
        body = b"".join(orjson.dumps(entry) + b"\n" for entry in applied.rejects)
        self.blobs.create(REJECTS_CONTAINER, path, body, overwrite=True)
        return f"{REJECTS_CONTAINER}/{path}"
