"""Blob and queue layers against Azurite."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import threading
from collections.abc import Iterator

import pytest
from azure.core.exceptions import ResourceNotFoundError
from pydantic import BaseModel

from core.errors import BlobAlreadyExists, LeaseUnavailable, MessageTooLarge, StorageError
from core.storage.blobs import CHUNK_BYTES, BlockStager, deterministic_name, read_ahead
from tests.helpers import eventually

pytestmark = pytest.mark.integration


def test_create_only_write_refuses_to_overwrite(storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    storage.blobs.create(unique, "a/b.txt", b"first")
    with pytest.raises(BlobAlreadyExists):
        storage.blobs.create(unique, "a/b.txt", b"second")
    ref = storage.blobs.ref(unique, "a/b.txt")
    assert b"".join(storage.blobs.iter_chunks(ref)) == b"first"
    storage.blobs.create(unique, "a/b.txt", b"third", overwrite=True)
    assert b"".join(storage.blobs.iter_chunks(storage.blobs.ref(unique, "a/b.txt"))) == b"third"


def test_streamed_write_and_chunked_read_of_a_large_blob(storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    piece = os.urandom(1024 * 1024)
    expected = hashlib.sha256()
    with storage.blobs.writer(unique, "big.bin", content_type="application/octet-stream") as out:
        for _ in range(11):
            out.write(piece)
            expected.update(piece)
    ref = storage.blobs.ref(unique, "big.bin")
    assert ref.size == 11 * len(piece)
    digest = hashlib.sha256()
    sizes = []
    for chunk in storage.blobs.iter_chunks(ref):
        sizes.append(len(chunk))
        digest.update(chunk)
    assert digest.hexdigest() == expected.hexdigest()
    assert max(sizes) <= CHUNK_BYTES and len(sizes) >= 3


def test_writers_sharing_a_stager_keep_block_order_and_bound_blocks_held(
    storage, unique: str
) -> None:  # type: ignore[no-untyped-def]
    stager = BlockStager(threads=4, in_flight=3)
    held, most_held = 0, 0
    lock = threading.Lock()
    original = stager.submit

    def counting_submit(stage, *args):  # type: ignore[no-untyped-def]
        def stage_and_count(*inner):  # type: ignore[no-untyped-def]
            nonlocal held, most_held
            with lock:
                held += 1
                most_held = max(most_held, held)
            try:
                return stage(*inner)
            finally:
                with lock:
                    held -= 1

        return original(stage_and_count, *args)

    stager.submit = counting_submit  # type: ignore[method-assign]
    writers = [
        storage.blobs.writer(unique, f"part-{n}.bin", block_bytes=64 * 1024, stager=stager)
        for n in range(3)
    ]
    expected = [bytearray() for _ in writers]
    for round_number in range(40):  # interleaved, as the split writes its buckets
        for number, writer in enumerate(writers):
            piece = os.urandom(20_000 + 997 * round_number + number)
            writer.write(piece)
            expected[number] += piece
    for writer in writers:
        writer.close()
    stager.close()
    for number in range(3):
        data = b"".join(storage.blobs.iter_chunks(storage.blobs.ref(unique, f"part-{number}.bin")))
        assert data == expected[number]
    assert 1 <= most_held <= 3


def test_a_block_that_failed_on_a_stager_thread_fails_the_close(storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    stager = BlockStager(threads=2, in_flight=2)
    writer = storage.blobs.writer(unique, "broken.bin", block_bytes=1024, stager=stager)
    storage.blob_service.get_container_client(unique).delete_container()  # blocks now fail
    writer.write(b"b" * 4096)  # returns: the failures happen on the stager's threads
    with pytest.raises(ResourceNotFoundError):
        writer.close()  # raised here, before any commit is attempted
    stager.close()


def test_streamed_writer_is_create_only_and_commits_nothing_on_error(storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError), storage.blobs.writer(unique, "half.bin") as out:
        out.write(b"x" * 100)
        raise RuntimeError("crash mid-write")
    assert not storage.blobs.exists(unique, "half.bin")
    storage.blobs.create(unique, "taken.bin", b"1")
    with pytest.raises(BlobAlreadyExists), storage.blobs.writer(unique, "taken.bin") as out:
        out.write(b"2")


def test_reader_is_a_file_object_for_gzip_and_ranges(storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    lines = [f"row-{i},value-{i}\n".encode() for i in range(50_000)]
    storage.blobs.create(unique, "rows.csv.gz", gzip.compress(b"".join(lines)))
    ref = storage.blobs.ref(unique, "rows.csv.gz")
    with gzip.open(storage.blobs.open_reader(ref)) as decompressed:
        assert sum(1 for _ in decompressed) == 50_000
    storage.blobs.create(unique, "plain.txt", b"0123456789")
    plain = storage.blobs.ref(unique, "plain.txt")
    assert storage.blobs.open_reader(plain, offset=3, length=4).read() == b"3456"


def test_read_is_pinned_to_the_etag(storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    storage.blobs.create(unique, "v.txt", b"version one")
    ref = storage.blobs.ref(unique, "v.txt")
    storage.blobs.create(unique, "v.txt", b"version two", overwrite=True)
    with pytest.raises(StorageError, match="changed while it was being read"):
        b"".join(storage.blobs.iter_chunks(ref))


def test_listing_and_deterministic_names(storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    name = deterministic_name("exports/", "2026", "11/", "file", suffix=".jsonl")
    assert name == "exports/2026/11/file.jsonl"
    for suffix in ("a", "b"):
        storage.blobs.create(unique, f"p/{suffix}", b"x")
    storage.blobs.create(unique, "q/c", b"x")
    assert sorted(b.name for b in storage.blobs.list(unique, "p/")) == ["p/a", "p/b"]
    assert list(storage.blobs.list("no-such-container-" + unique)) == []


def test_lease_gives_one_writer(storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    with storage.blobs.lease(unique, "locks/export", seconds=15) as held:
        assert held.id
        with (
            pytest.raises(LeaseUnavailable),
            storage.blobs.lease(unique, "locks/export", seconds=15),
        ):
            pass
    with storage.blobs.lease(unique, "locks/export", seconds=15):
        pass  # released, so it can be taken again


class Reference(BaseModel):
    blob: str
    start: int
    end: int


def test_queue_messages_are_base64_json(storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    storage.queues.send(unique, Reference(blob="segments/s/x.csv", start=0, end=100))
    assert storage.queues.depth(unique) == 1
    raw = storage.queue_service.get_queue_client(unique).receive_message()
    assert json.loads(base64.b64decode(raw.content)) == {
        "blob": "segments/s/x.csv",
        "start": 0,
        "end": 100,
    }


class Oversized(BaseModel):
    data: str


def test_messages_over_64kb_are_refused_before_sending(storage, unique: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MessageTooLarge, match="put the data in a blob"):
        storage.queues.send(unique, Oversized(data="x" * 50_000))
    assert storage.queues.depth(unique) == 0
    storage.queues.send(unique, Oversized(data="x" * 40_000))
    assert storage.queues.depth(unique) == 1


def test_chunks_read_ahead_pass_errors_on_and_stop_when_closed() -> None:
    taken: list[int] = []

    def chunks(fail_at: int | None) -> Iterator[bytes]:
        for n in range(100):
            if n == fail_at:
                raise OSError("connection reset")
            taken.append(n)
            yield bytes([n])

    assert b"".join(read_ahead(chunks(None), 3)) == bytes(range(100))
    with pytest.raises(OSError, match="connection reset"):
        list(read_ahead(chunks(5), 3))
    taken.clear()
    ahead = read_ahead(chunks(None), 2)
    # Read ahead before anything is taken: `depth` queued and one in hand, then it waits.
    eventually(lambda: len(taken) >= 3)
    assert len(taken) <= 4
    ahead.close()  # type: ignore[attr-defined]
    eventually(lambda: not any(t.name == "read-ahead" for t in threading.enumerate()))
    assert len(taken) <= 4  # and its thread is gone: no more is taken
