"""First pass over a segment file: validate the whole file, partition rows by identity.

Every row goes to bucket `hash(identity) mod buckets`, so all rows of one person, and that
person's delta state, meet in one bucket. A bucket is the unit of work and of state:
processed on its own with only its state in memory, so memory stays flat however large
the file, and buckets can be processed by parallel workers.

Small files keep their buckets in memory. Larger ones write each bucket to a gzip'd JSON
Lines work blob, `sync-work/{run_id}/bucket-{n:03d}.jsonl.gz`, which queue-triggered
workers read back. Nothing is sent during this pass, so a file that turns out not to be
UTF-8 halfway is still rejected as a whole.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from core.storage import Storage
from core.storage.blobs import BlobRef, BlockWriter
from core.sync.definitions import SyncDefinition
from core.sync.mapping import RowMapper
from core.sync.readers import FileRejected, RowReader, SourceRow

WORK_CONTAINER = "sync-work"
_WORK_BLOCK_BYTES = 1 << 20  # one pending block per bucket: keeps the split's memory bounded


def bucket_of(identity: str, buckets: int) -> int:
    digest = hashlib.blake2b(identity.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def identity_key(raw: Any) -> str:
    """The bucketing key of a raw identity value (mapping validates it later)."""
    return raw.strip().lower() if isinstance(raw, str) else str(raw)


@dataclass
class SplitResult:
    columns: list[str]
    buckets: int
    rows: int = 0
    counts: list[int] = field(default_factory=list)
    malformed: list[tuple[int, str]] = field(default_factory=list)
    in_memory: list[list[SourceRow]] | None = None
    work_blobs: dict[int, str] = field(default_factory=dict)


class _BucketFile:
    """Gzip'd JSON Lines into a block blob, flushed in bounded blocks."""

    def __init__(self, writer: BlockWriter) -> None:
        self.writer = writer
        self.buffer = io.BytesIO()
        self.gzip = gzip.GzipFile(fileobj=self.buffer, mode="wb", compresslevel=1)

    def add(self, row: SourceRow) -> None:
        self.gzip.write(json.dumps([row.line, *row.values], ensure_ascii=False).encode())
        self.gzip.write(b"\n")
        if self.buffer.tell() >= _WORK_BLOCK_BYTES:
            self._drain()

    def _drain(self) -> None:
        self.writer.write(self.buffer.getvalue())
        self.buffer.seek(0)
        self.buffer.truncate()

    def close(self) -> None:
        self.gzip.close()
        self._drain()
        self.writer.close()


def split_file(
    storage: Storage,
    sync: SyncDefinition,
    blob: BlobRef,
    *,
    run_id: str,
    buckets: int,
    in_memory_max_bytes: int,
) -> SplitResult:
    """Read the whole file once; raises FileRejected when it is unusable as a whole."""
    in_memory = blob.size <= in_memory_max_bytes
    memory: list[list[SourceRow]] = [[] for _ in range(buckets)] if in_memory else []
    files: dict[int, _BucketFile] = {}
    try:
        # The text decoder reads ahead, so even the header line can raise a decode error.
        reader = RowReader(
            storage.blobs.open_reader(blob), sync.input, RowMapper.wanted_columns(sync)
        )
        if sync.identity.column not in reader.columns:
            raise FileRejected(
                "missing_column", f"identity column {sync.identity.column!r} is not in the file"
            )
        identity_index = reader.columns.index(sync.identity.column)
        result = SplitResult(columns=reader.columns, buckets=buckets, counts=[0] * buckets)
        for entry in reader:
            if isinstance(entry, tuple):
                result.malformed.append(entry)
                continue
            bucket = bucket_of(identity_key(entry.values[identity_index]), buckets)
            result.counts[bucket] += 1
            result.rows += 1
            if in_memory:
                memory[bucket].append(entry)
                continue
            if bucket not in files:
                name = f"{run_id}/bucket-{bucket:03d}.jsonl.gz"
                files[bucket] = _BucketFile(
                    storage.blobs.writer(
                        WORK_CONTAINER, name, overwrite=True, block_bytes=_WORK_BLOCK_BYTES
                    )
                )
                result.work_blobs[bucket] = name
            files[bucket].add(entry)
    except UnicodeDecodeError as exc:
        raise FileRejected(
            "not_utf8",
            f"file is not valid UTF-8 ({exc.reason}); export it as UTF-8, nothing was sent",
        ) from None
    except (OSError, EOFError) as exc:
        raise FileRejected("corrupt_compression", f"cannot decompress the file: {exc}") from None
    for bucket_file in files.values():
        bucket_file.close()
    result.in_memory = memory if in_memory else None
    return result


def read_work_blob(storage: Storage, name: str) -> Iterator[SourceRow]:
    ref = storage.blobs.ref(WORK_CONTAINER, name)
    with gzip.GzipFile(fileobj=storage.blobs.open_reader(ref), mode="rb") as stream:
        for line in stream:
            line_number, *values = json.loads(line)
            yield SourceRow(line_number, values)


def delete_work(storage: Storage, run_id: str) -> None:
    container = storage.blob_service.get_container_client(WORK_CONTAINER)
    for blob in storage.blobs.list(WORK_CONTAINER, f"{run_id}/"):
        with contextlib.suppress(ResourceNotFoundError):  # a concurrent finisher got it
            container.delete_blob(blob.name)
