"""The known-profiles registry against Azurite: full exports replace, deltas add and
remove, bad lines are rejected with their bytes, keys are never stored in the clear."""

from __future__ import annotations

import base64
import io
import sys
import uuid

import orjson
import pytest

from core.destinations.known_profiles import REJECTS_CONTAINER, KnownProfiles, profile_hash

pytestmark = pytest.mark.integration


def registry(storage) -> KnownProfiles:  # type: ignore[no-untyped-def]
    return KnownProfiles(storage, f"reg-{uuid.uuid4().hex[:8]}")


def apply(profiles: KnownProfiles, name: str, text: bytes):  # type: ignore[no-untyped-def]
    return profiles.apply_export(name, io.BytesIO(text))


def test_full_export_replaces_and_delta_adds_and_removes(storage) -> None:  # type: ignore[no-untyped-def]
    profiles = registry(storage)
    first = apply(
        profiles, "recipients-full-1.csv", b"\xef\xbb\xbfcrmId,email\r\nA,a@x\r\nB,b@x\r\n"
    )
    assert (first.full, first.added, first.profiles) == (True, 2, 2)
    delta = apply(profiles, "recipients-2.txt", b"crmId\t_deleted\nC\t\nA\ttrue\n")
    assert (delta.full, delta.added, delta.removed, delta.profiles) == (False, 1, 1, 2)
    fresh = KnownProfiles(storage, profiles.registry)
    assert "B" in fresh and "C" in fresh and "A" not in fresh and "D" not in fresh
    again = apply(profiles, "recipients-full-3.csv", b"crmId;x\nD;1\n")
    assert (again.removed, again.profiles) == (2, 1)
    assert "D" in KnownProfiles(storage, profiles.registry)
    stored = b"".join(
        storage.blobs.read_versioned("sync-state", ref.name)[0]
        for ref in storage.blobs.list("sync-state", f"known-profiles/{profiles.registry}/")
    )
    assert int.from_bytes(stored, sys.byteorder) == profile_hash("D")  # its hash, nothing else


def test_lines_without_a_key_are_rejected_with_their_bytes(storage) -> None:  # type: ignore[no-untyped-def]
    profiles = registry(storage)
    applied = apply(profiles, "part.csv", b"crmId,email\n,nobody@x\nE,e@x\n\xff\xfe,bad\n")
    assert (applied.rows, applied.added, applied.rejected) == (3, 1, 2)
    where = profiles.write_rejects("folder/part.csv", applied)
    assert where is not None
    body = storage.blobs.read_versioned(REJECTS_CONTAINER, where.split("/", 1)[1])[0]
    entries = [orjson.loads(line) for line in body.splitlines()]
    assert [(e["line"], e["reason"]) for e in entries] == [(2, "empty_key"), (4, "not_utf8")]
    assert base64.b64decode(entries[1]["raw_base64"]) == b"\xff\xfe,bad\n"
