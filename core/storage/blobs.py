"""Blob storage access that never holds a whole blob in memory.

Past 500 lines by a few: chunked reads, block-staged writes and leases share one client
wrapper and its ETag and retry handling.

Reads are chunked downloads pinned to one ETag (a blob overwritten mid-read fails instead
of mixing two versions). Writes are create-only unless asked otherwise; large writes are
staged block by block and committed once, so readers never see half a file.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobBlock, BlobServiceClient, ContentSettings

from core.errors import BlobAlreadyExists, ConcurrencyConflict, LeaseUnavailable, StorageError

CHUNK_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class BlobRef:
    """One version of one blob: what a trigger hands over and receipts are keyed by."""

    container: str
    name: str
    etag: str
    size: int
    last_modified: datetime | None = None

    @property
    def path(self) -> str:
        return f"{self.container}/{self.name}"


def deterministic_name(prefix: str, *parts: str, suffix: str = "") -> str:
    """A blob name that is the same every time for the same inputs (retries overwrite-safe)."""
    cleaned = [p.strip("/") for p in (prefix, *parts) if p]
    return "/".join(cleaned) + suffix


class ChunkReader(io.RawIOBase):
    """A read-only file object over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while self._offset >= len(self._buffer):
            next_chunk = next(self._chunks, None)
            if next_chunk is None:
                return 0
            self._buffer, self._offset = next_chunk, 0
        view = memoryview(target).cast("B")
        size = min(len(view), len(self._buffer) - self._offset)
        view[:size] = self._buffer[self._offset : self._offset + size]
        self._offset += size
        return size


def read_ahead(chunks: Iterator[bytes], depth: int) -> Iterator[bytes]:
    """`chunks`, taken up to `depth` ahead on a thread of their own, from now on; an error
    in taking them is raised where the reader is. Closing the iterator (or leaving the
    iteration early) stops the thread."""
    ready: queue.Queue[tuple[bytes | None, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()

    def hand(item: tuple[bytes | None, BaseException | None]) -> bool:
        """Queue `item` unless the reader is gone; whether it was queued."""
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ready.put(item, timeout=0.1)
                return True
        return False

    def fetch() -> None:
        try:
            for chunk in chunks:
                if not hand((chunk, None)):
                    return
            hand((None, None))
        except BaseException as exc:  # handed to the reader, which raises it
            hand((None, exc))

    fetcher = threading.Thread(target=fetch, name="read-ahead", daemon=True)
    fetcher.start()

    def taken() -> Iterator[bytes]:
        try:
            while True:
                chunk, error = ready.get()
                if error is not None:
                    raise error
                if chunk is None:
                    return
                yield chunk
        finally:
            stop.set()

    iterator = taken()
    # A generator never started ignores close(): starting it is what arms its `finally`.
    return _Closing(iterator, stop)


class _Closing(Iterator[bytes]):
    """An iterator whose close() also stops the thread feeding it, started or not."""

    def __init__(self, iterator: Iterator[bytes], stop: threading.Event) -> None:
        self._iterator = iterator
        self._stop = stop

    def __next__(self) -> bytes:
        return next(self._iterator)

    def close(self) -> None:
        self._stop.set()
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __del__(self) -> None:  # dropped unread: the thread stops too
        self._stop.set()


class BlockWriter:
    """Streams bytes into a block blob, committing once on close.

    Blocks of `block_bytes` are staged as they fill; `close()` commits the list, create-only
    unless `overwrite` is set. Leaving the `with` block on an exception commits nothing.
    """

    def __init__(
        self,
        service: BlobServiceClient,
        container: str,
        name: str,
        *,
        overwrite: bool = False,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
        block_bytes: int = CHUNK_BYTES,
        stager: BlockStager | None = None,
    ) -> None:
        self._client = service.get_blob_client(container, name)
        self._stager = stager
        self._staging: list[Future[Any]] = []
        self._overwrite = overwrite
        self._content_type = content_type
        self._metadata = metadata
        self._block_bytes = block_bytes
        self._pending = bytearray()
        self._block_ids: list[str] = []
        self.bytes_written = 0
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.etag: str | None = None

    def write(self, data: bytes) -> int:
        self._pending += data
        self.bytes_written += len(data)
        self.md5.update(data)
        while len(self._pending) >= self._block_bytes:
            self._stage(bytes(self._pending[: self._block_bytes]))
            del self._pending[: self._block_bytes]
        return len(data)

    def _stage(self, block: bytes) -> None:
        block_id = base64.b64encode(f"{len(self._block_ids):08d}".encode()).decode()
        if self._stager is None:
            self._client.stage_block(block_id, block)
        else:
            self._staging.append(self._stager.submit(self._client.stage_block, block_id, block))
        self._block_ids.append(block_id)

    def close(self) -> str:
        if self._pending or not self._block_ids:
            self._stage(bytes(self._pending))
            self._pending.clear()
        for staged in self._staging:
            staged.result()  # the commit may only name blocks that are there
        kwargs: dict[str, Any] = {}
        if not self._overwrite:
            kwargs = {"match_condition": MatchConditions.IfMissing}
        settings = ContentSettings(
            content_type=self._content_type, content_md5=bytearray(self.md5.digest())
        )
        try:
            result = self._client.commit_block_list(
                [BlobBlock(block_id) for block_id in self._block_ids],
                content_settings=settings,
                metadata=self._metadata,
                **kwargs,
            )
        except (ResourceExistsError, ResourceModifiedError):
            raise BlobAlreadyExists(f"blob {self._client.blob_name} already exists") from None
        self.etag = str(result["etag"])
        return self.etag

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()


class BlockStager:
    """Stages the blocks of several writers on a few threads, so a writer does not wait
    for each block's round trip; at most `in_flight` blocks are held at once, so memory
    stays bounded. Block order comes from the block list, not from upload order."""

    def __init__(self, threads: int = 4, in_flight: int = 16) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="stage-block")
        self._slots = threading.BoundedSemaphore(in_flight)

    def submit(self, stage: Callable[..., Any], *args: Any) -> Future[Any]:
        self._slots.acquire()
        try:
            staged = self._pool.submit(stage, *args)
        except BaseException:
            self._slots.release()
            raise
        staged.add_done_callback(lambda _: self._slots.release())
        return staged

    def close(self) -> None:
        self._pool.shutdown()


class BlobLease:
    """A held lease on a blob, renewed in the background until released."""

    def __init__(self, lease: Any, seconds: int) -> None:
        self._lease = lease
        self._stop = threading.Event()
        self._renewer = threading.Thread(
            target=self._renew_loop, args=(max(1, seconds // 3),), daemon=True
        )
        self._renewer.start()

    @property
    def id(self) -> str:
        return str(self._lease.id)

    def _renew_loop(self, every: int) -> None:
        while not self._stop.wait(every):
            try:
                self._lease.renew()
            except HttpResponseError:
                return  # the next write under this lease fails loudly instead

    def release(self) -> None:
        self._stop.set()
        self._renewer.join(timeout=5)
        # Expired or broken: nothing left to release.
        with contextlib.suppress(HttpResponseError):
            self._lease.release()


class BlobStore:
    """Blob operations on one storage account."""

    def __init__(self, service: BlobServiceClient) -> None:
        self.service = service
        self._ensured: set[str] = set()
        self._lease_blobs: set[tuple[str, str]] = set()

    def ensure_container(self, container: str) -> None:
        if container in self._ensured:
            return
        with suppress(ResourceExistsError):
            self.service.create_container(container)
        self._ensured.add(container)

    def ref(self, container: str, name: str) -> BlobRef:
        try:
            props = self.service.get_blob_client(container, name).get_blob_properties()
        except ResourceNotFoundError:
            raise StorageError(f"blob {container}/{name} does not exist") from None
        return BlobRef(container, name, str(props.etag), int(props.size), props.last_modified)

    def find(self, container: str, name: str) -> BlobRef | None:
        """The blob's current version, or None when there is none."""
        try:
            return self.ref(container, name)
        except StorageError:
            if self.exists(container, name):
                raise
            return None

    def exists(self, container: str, name: str) -> bool:
        return bool(self.service.get_blob_client(container, name).exists())

    def iter_chunks(
        self,
        blob: BlobRef,
        *,
        offset: int = 0,
        length: int | None = None,
    ) -> Iterator[bytes]:
        """The blob's bytes in chunks, failing if it changed since `blob.etag`."""
        client = self.service.get_blob_client(blob.container, blob.name)
        whole = not offset and length is None  # no range: the SDK then reads empty blobs too
        try:
            downloader = client.download_blob(
                offset=None if whole else offset,
                length=length,
                etag=blob.etag,
                match_condition=MatchConditions.IfNotModified,
                max_concurrency=1,
            )
            yield from downloader.chunks()
        except ResourceModifiedError:
            raise StorageError(f"blob {blob.path} changed while it was being read") from None

    def open_reader(
        self, blob: BlobRef, *, offset: int = 0, length: int | None = None, ahead: int = 0
    ) -> io.BufferedReader:
        """A buffered binary file object streaming the blob (or a byte range of it); with
        `ahead`, that many chunks are fetched on a thread ahead of the reader, so the
        reader's work and the requests overlap."""
        chunks = self.iter_chunks(blob, offset=offset, length=length)
        return io.BufferedReader(
            ChunkReader(read_ahead(chunks, ahead) if ahead else chunks), CHUNK_BYTES
        )

    def open_current(self, container: str, name: str) -> tuple[io.BufferedReader[Any], str] | None:
        """The blob as it is now, streamed with one request to start (no properties call
        first), and its ETag; later chunks are pinned to that version. None if absent."""
        client = self.service.get_blob_client(container, name)
        try:
            downloader = client.download_blob(max_concurrency=1)
        except ResourceNotFoundError:
            return None
        reader = io.BufferedReader(ChunkReader(downloader.chunks()), CHUNK_BYTES)
        return reader, str(downloader.properties.etag)

    def create(
        self,
        container: str,
        name: str,
        data: bytes | Iterable[bytes],
        *,
        overwrite: bool = False,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Write a blob, create-only by default (BlobAlreadyExists). Returns the ETag."""
        self.ensure_container(container)
        if isinstance(data, bytes) and len(data) <= CHUNK_BYTES:
            client = self.service.get_blob_client(container, name)
            try:
                result = client.upload_blob(
                    data,
                    overwrite=overwrite,
                    content_settings=ContentSettings(content_type=content_type),
                    metadata=metadata,
                )
            except ResourceExistsError:
                raise BlobAlreadyExists(f"blob {container}/{name} already exists") from None
            return str(result["etag"])
        with BlockWriter(
            self.service,
            container,
            name,
            overwrite=overwrite,
            content_type=content_type,
            metadata=metadata,
        ) as writer:
            for piece in [data] if isinstance(data, bytes) else data:
                writer.write(piece)
        assert writer.etag is not None
        return writer.etag

    def delete(self, container: str, name: str) -> None:
        """Delete a blob; one that is already gone is fine."""
        with suppress(ResourceNotFoundError):
            self.service.get_blob_client(container, name).delete_blob()

    def read_versioned(self, container: str, name: str) -> tuple[bytes, str] | None:
        """A small blob's bytes and ETag, or None if it does not exist."""
        found = self.read_with_metadata(container, name)
        return None if found is None else (found[0], found[1])

    def read_with_metadata(
        self, container: str, name: str
    ) -> tuple[bytes, str, dict[str, str]] | None:
        """A small blob's bytes, ETag and metadata, or None if it does not exist."""
        client = self.service.get_blob_client(container, name)
        try:
            downloader = client.download_blob(max_concurrency=1)
            properties = downloader.properties
            return downloader.readall(), str(properties.etag), dict(properties.metadata or {})
        except ResourceNotFoundError:
            return None

    def write_versioned(self, container: str, name: str, data: bytes, etag: str | None) -> str:
        """Write a small blob only if unchanged since `etag` (None: only if it is absent).

        Raises ConcurrencyConflict when another writer got there first. Returns the ETag.
        """
        self.ensure_container(container)
        client = self.service.get_blob_client(container, name)
        try:
            if etag is None:
                result = client.upload_blob(data, overwrite=False)
            else:
                result = client.upload_blob(
                    data, overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified
                )
        except (ResourceExistsError, ResourceModifiedError):
            raise ConcurrencyConflict(f"blob {container}/{name} changed concurrently") from None
        return str(result["etag"])

    def writer(
        self,
        container: str,
        name: str,
        *,
        overwrite: bool = False,
        content_type: str | None = None,
        metadata: dict[str, str] | None = None,
        block_bytes: int = CHUNK_BYTES,
        stager: BlockStager | None = None,
    ) -> BlockWriter:
        self.ensure_container(container)
        return BlockWriter(
            self.service,
            container,
            name,
            overwrite=overwrite,
            content_type=content_type,
            metadata=metadata,
            block_bytes=block_bytes,
            stager=stager,
        )

    def containers(self) -> list[str]:
        """The account's container names."""
        return [item.name for item in self.service.list_containers()]

    def list(self, container: str, prefix: str | None = None) -> Iterator[BlobRef]:
        client = self.service.get_container_client(container)
        try:
            for item in client.list_blobs(name_starts_with=prefix):
                yield BlobRef(
                    container, item.name, str(item.etag), int(item.size), item.last_modified
                )
        except ResourceNotFoundError:
            return

    @contextmanager
    def lease(self, container: str, name: str, *, seconds: int = 60) -> Iterator[BlobLease]:
        """Hold an exclusive lease on `name` (created empty if missing) for the block."""
        if not 15 <= seconds <= 60:
            raise ValueError("blob leases last 15 to 60 seconds")
        self.ensure_container(container)
        client = self.service.get_blob_client(container, name)
        if (container, name) not in self._lease_blobs:
            with suppress(ResourceExistsError):
                client.upload_blob(b"", overwrite=False)
            self._lease_blobs.add((container, name))
        try:
            raw = client.acquire_lease(lease_duration=seconds)
        except ResourceNotFoundError:  # deleted since: create it again next time
            self._lease_blobs.discard((container, name))
            raise
        except HttpResponseError as exc:
            if exc.status_code == 409:
                raise LeaseUnavailable(
                    f"blob {container}/{name} is leased by another writer"
                ) from None
            raise
        held = BlobLease(raw, seconds)
        try:
            yield held
        finally:
            held.release()
