"""Sync state in packs (core/sync/state.py): many buckets read and written in few requests,
with the per-bucket version guard of a blob per bucket, against Azurite."""

from __future__ import annotations

import gzip
import random
from datetime import timedelta
from typing import Any

import orjson
import pytest

from core.errors import ConcurrencyConflict
from core.sync import state_codec
from core.sync.state import STATE_CONTAINER, Snapshot, StateStore, StoredBucket

pytestmark = pytest.mark.integration


def _text(
    bucket: int, profiles: int, rng: random.Random, run: str = "r1", prefix: str = "B"
) -> bytes:
    """A snapshot text: a header and `profiles` lines of random hashes (incompressible,
    like real ones)."""
    header = orjson.dumps({"version": 5, "fingerprint": "f", "run": run, "result": {}})
    lines = [
        b"%s\t%s\t%s" % (
            rng.randbytes(8).hex().encode(), orjson.dumps(f"{prefix}{bucket}-{i}"),
            orjson.dumps([{"email": rng.randbytes(8).hex()}, []]),
        )
        for i in range(profiles)
    ]  # fmt: skip
    return header + b"\n" + b"\n".join(lines) + b"\n"


def _write_all(states: StateStore, texts: dict[int, bytes], run_id: str) -> dict[int, str]:
    """Every bucket's text through one pack writer; the new versions."""
    versions: dict[int, str] = {}
    writer = states.pack_writer(run_id)
    for bucket, text in texts.items():
        writer.add(
            Snapshot.of(bucket, text, None), lambda etag, b=bucket: versions.update({b: etag})
        )
    writer.close()
    return versions


def _stored(
    storage: Any, unique: str, seed: int, buckets: int, profiles: int
) -> tuple[StateStore, random.Random, dict[int, bytes], dict[int, StoredBucket]]:
    """A store with `buckets` buckets of random state in one pack: the store, the random
    source (for more), the texts written and the buckets as stored."""
    rng = random.Random(seed)
    states = StateStore(storage, unique, "braze", "f")
    texts = {bucket: _text(bucket, profiles, rng) for bucket in range(buckets)}
    _write_all(states, texts, "r1")
    return states, rng, texts, states.stored_buckets()


def _counting_reads(states: StateStore) -> list[tuple[str, int, int]]:
    reads: list[tuple[str, int, int]] = []
    read_range = states.read_range

    def counted(blob: str, start: int, end: int) -> bytes:
        reads.append((blob, start, end))
        return read_range(blob, start, end)

    states.read_range = counted  # type: ignore[method-assign]
    return reads


def test_a_run_reads_its_buckets_in_a_few_ranges_and_lets_them_go(
    storage: Any, unique: str
) -> None:
    rng = random.Random(5)
    states = StateStore(storage, unique, "braze", "f")
    texts = {bucket: _text(bucket, 2000, rng) for bucket in range(64)}
    versions = _write_all(states, texts, "r1")
    stored = states.stored_buckets()
    assert {b: s.etag for b, s in stored.items()} == versions
    packs = {part.blob for s in stored.values() for part in s.layout.parts}
    assert len(packs) == 1  # one pack for the run
    total = sum(s.layout.parts[0].length for s in stored.values())
    reads = _counting_reads(states)
    reader = states.reader(stored, sorted(stored))
    for bucket in sorted(stored):
        taken = reader.take(bucket)
        assert taken is not None and state_codec.decompress(taken[0]) == texts[bucket]
        assert taken[1] == versions[bucket]
        assert reader.held <= 8 << 20  # at most the span being read
    assert reader.held == 0
    assert sum(end - start for _, start, end in reads) == total  # each byte read once
    assert len(reads) <= total // (8 << 20) + 1 < 64


def test_sections_and_skipped_buckets_read_what_is_needed(storage: Any, unique: str) -> None:
    states, rng, texts, stored = _stored(storage, unique, 6, 16, 300)
    writer = states.pack_writer("r2")  # a section for every other bucket
    sections = {b: _text(b, 3, rng, "r2") for b in range(0, 16, 2)}
    for bucket, text in sections.items():
        snapshot = Snapshot.of(bucket, text, stored[bucket].etag, appended_to=stored[bucket].layout)
        writer.add(snapshot, lambda etag: None)
    writer.close()
    stored = states.stored_buckets()
    assert [stored[b].layout.sections for b in range(4)] == [1, 0, 1, 0]
    reads = _counting_reads(states)
    reader = states.reader(stored, sorted(stored))
    reader.narrow(range(8))
    for bucket in range(8):
        if bucket == 5:
            reader.skip(bucket)
            continue
        taken = reader.take(bucket)
        assert taken is not None
        assert state_codec.decompress(taken[0]) == texts[bucket] + sections.get(bucket, b"")
    assert reader.held == 0
    assert len(reads) == 2  # the bases, the sections: one range each
    base_end = max(
        s.layout.parts[0].offset + s.layout.parts[0].length for b, s in stored.items() if b < 8
    )
    assert max(end for blob, _, end in reads if blob == stored[0].layout.parts[0].blob) == base_end


def test_a_failed_read_is_read_again_by_the_next_take(storage: Any, unique: str) -> None:
    states, _, texts, stored = _stored(storage, unique, 7, 4, 50)
    read_range = states.read_range
    failures = [OSError("connection reset")]

    def flaky(blob: str, start: int, end: int) -> bytes:
        if failures:
            raise failures.pop()
        return read_range(blob, start, end)

    states.read_range = flaky  # type: ignore[method-assign]
    reader = states.reader(stored, sorted(stored))
    with pytest.raises(OSError, match="connection reset"):
        reader.take(0)
    taken = reader.take(0)
    assert taken is not None and state_codec.decompress(taken[0]) == texts[0]


def test_a_bucket_changed_meanwhile_conflicts_alone(storage: Any, unique: str) -> None:
    rng = random.Random(8)
    states = StateStore(storage, unique, "braze", "f")
    _write_all(states, {bucket: _text(bucket, 10, rng) for bucket in range(3)}, "r1")
    loaded = states.stored_buckets()
    # Another run commits bucket 1 after this one loaded it, and creates bucket 3.
    other = {1: _text(1, 10, rng, "other"), 3: _text(3, 10, rng, "other")}
    writer = states.pack_writer("other")
    writer.add(Snapshot.of(1, other[1], loaded[1].etag), lambda etag: None)
    writer.add(Snapshot.of(3, other[3], None), lambda etag: None)
    writer.close()
    committed: list[int] = []
    writer = states.pack_writer("late")
    for bucket in range(4):
        etag = loaded[bucket].etag if bucket in loaded else None
        snapshot = Snapshot.of(bucket, _text(bucket, 10, rng, "late"), etag)
        writer.add(snapshot, lambda _, b=bucket: committed.append(b))
    with pytest.raises(ConcurrencyConflict, match="bucket 1"):
        writer.close()
    assert committed == [0, 2]  # the others in the same transaction still count
    stored = states.stored_buckets()
    for bucket, expected_run in ((0, "late"), (1, "other"), (2, "late"), (3, "other")):
        text = state_codec.decompress(states.reader(stored, [bucket]).take(bucket)[0])  # type: ignore[index]
        assert orjson.loads(text.split(b"\n", 1)[0])["run"] == expected_run


def test_bucket_blobs_from_before_packs_are_read_then_moved_and_collected(
    storage: Any, unique: str
) -> None:
    rng = random.Random(9)
    states = StateStore(storage, unique, "braze", "f")
    storage.blobs.ensure_container(STATE_CONTAINER)
    old = _text(2, 20, rng, "old")
    legacy = f"{unique}/braze/bucket-0002.jsonl.gz"
    storage.blob_service.get_blob_client(STATE_CONTAINER, legacy).upload_blob(gzip.compress(old))
    stored = states.stored_buckets()
    assert list(stored) == [2] and stored[2].layout.legacy
    assert state_codec.decompress(states.fetch(2)[0]) == old  # type: ignore[index]
    assert states.fetch(3) is None
    state = states.decode(states.reader(stored, [2]).take(2), native=False)
    assert state.last_run == "old" and len(state.profiles) == 20
    snapshot = states.snapshot(2, state, run_id="new", result={})
    assert snapshot.etag is None and snapshot.appended_to is None  # rewritten, into a pack
    states.write(snapshot)
    assert not states.stored_buckets()[2].layout.legacy
    _write_all(states, {5: _text(5, 5, rng)}, "r1")
    abandoned = states.pack_writer("crashed")  # staged and committed, never pointed at
    abandoned.add(Snapshot.of(7, _text(7, 5, rng), None), lambda etag: None)
    abandoned._commit_blob(abandoned._pending)  # then the process died

    def names() -> list[str]:
        return [ref.name for ref in storage.blobs.list(STATE_CONTAINER, unique + "/")]

    assert len(names()) == 4  # the legacy blob, three packs
    states.collect_garbage()
    assert len(names()) == 3  # the legacy blob: its bucket is in a pack now
    states.collect_garbage(keep_for=timedelta(0))
    assert len(names()) == 2  # the abandoned pack
    stored = states.stored_buckets()
    assert sorted(stored) == [2, 5]
    reader = states.reader(stored, [2, 5])
    assert all(reader.take(b) is not None for b in (2, 5))


def test_blocks_cut_across_members_read_back_whole(
    storage: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.sync import state

    monkeypatch.setattr(state, "_BLOCK_BYTES", 1000)  # a member spans several blocks
    states, _, texts, stored = _stored(storage, unique, 10, 5, 100)
    assert min(s.layout.parts[0].length for s in stored.values()) > 1000
    pack = stored[0].layout.parts[0].blob
    blob = storage.blob_service.get_blob_client(STATE_CONTAINER, f"{unique}/braze/{pack}")
    total = sum(s.layout.parts[0].length for s in stored.values())
    assert [block["size"] for block in blob.get_block_list()[0]][:-1] == [1000] * (total // 1000)
    reader = states.reader(stored, sorted(stored))
    for bucket, text in texts.items():
        assert state_codec.decompress(reader.take(bucket)[0]) == text  # type: ignore[index]


def test_writers_add_while_batches_are_written_in_order(
    storage: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from core.sync import state

    monkeypatch.setattr(state, "_POINTERS_PER_TRANSACTION", 3)  # many batches
    rng = random.Random(13)
    states = StateStore(storage, unique, "braze", "f")
    texts = {bucket: _text(bucket, rng.randrange(1, 60), rng) for bucket in range(40)}
    writer = states.pack_writer("r1")
    done: list[int] = []

    def add(bucket: int) -> None:
        writer.add(Snapshot.of(bucket, texts[bucket], None), lambda _: done.append(bucket))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(add, texts))
    writer.close()
    assert sorted(done) == sorted(texts)
    stored = states.stored_buckets()
    reader = states.reader(stored, sorted(stored))
    for bucket, text in texts.items():
        assert state_codec.decompress(reader.take(bucket)[0]) == text  # type: ignore[index]


def test_a_batch_whose_blocks_failed_stops_the_pack(storage: Any, unique: str) -> None:
    from core.errors import StorageError

    rng = random.Random(14)
    states = StateStore(storage, unique, "braze", "f")
    writer = states.pack_writer("r1")
    stage = writer._client.stage_block
    failures = [OSError("connection reset")]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return stage(*args, **kwargs)

    writer._client.stage_block = flaky  # type: ignore[method-assign]
    writer.add(Snapshot.of(0, _text(0, 5, rng), None), lambda _: None)
    with pytest.raises(OSError, match="connection reset"):
        writer.close()
    writer.add(Snapshot.of(1, _text(1, 5, rng), None), lambda _: None)
    with pytest.raises(StorageError, match="an earlier batch was not written"):
        writer.close()  # its offsets count the bytes that never made it
    assert states.stored_buckets() == {}


def test_state_split_into_another_bucket_count_is_refused_by_name(
    storage: Any, unique: str
) -> None:
    from core.errors import ConfigError

    rng = random.Random(15)
    _write_all(StateStore(storage, unique, "braze", "f", 8), {3: _text(3, 5, rng)}, "r1")
    assert list(StateStore(storage, unique, "braze", "f", 8).stored_buckets()) == [3]
    with pytest.raises(ConfigError, match=r"split into 8 buckets.*state_buckets is 16"):
        StateStore(storage, unique, "braze", "f", 16).stored_buckets()
    assert list(StateStore(storage, unique, "braze", "").stored_buckets()) == [3]  # a reader


def test_an_erasure_takes_the_person_out_and_counts_state_whose_pack_is_gone(
    storage: Any, unique: str
) -> None:
    """One sync's state points at a pack that is not there (lost, or deleted by hand): an
    erasure still takes the person out of every other sync's state, and says how many
    buckets it could not read."""
    from core.privacy.person import Person
    from core.sync.state_erasure import erase_from_states

    rng = random.Random(21)
    lost = StateStore(storage, f"{unique}-lost", "braze", "f")
    _write_all(lost, {b: _text(b, 5, rng) for b in range(3)}, "r1")
    for part in {p.blob for s in lost.stored_buckets().values() for p in s.layout.parts}:
        storage.blobs.delete(STATE_CONTAINER, lost.folder + part)
    states = StateStore(storage, f"{unique}-kept", "braze", "f")
    _write_all(states, {b: _text(b, 6, rng, prefix=unique) for b in range(4)}, "r1")
    person = Person.of(profile_ids=[f"{unique}2-3"])

    counts = erase_from_states(storage, person.matcher(), f"erasure-{unique}")

    assert counts["sync_state.buckets_unreadable"] >= 3
    assert counts["sync_state.profiles"] == 1
    stored = states.stored_buckets()
    reader = states.reader(stored, sorted(stored))
    for bucket in sorted(stored):
        state = states.decode(reader.take(bucket), native=False)
        expected = {f"{unique}{bucket}-{i}" for i in range(6)} - {f"{unique}2-3"}
        assert set(state.profiles) == expected
    names = [ref.name for ref in storage.blobs.list(STATE_CONTAINER, f"{unique}-kept/")]
    assert len(names) == 1 and "erasure-" in names[0]  # the old pack, with them in it, gone
