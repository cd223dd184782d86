"""Where acknowledged batches are recorded, so a re-run does not send them again.

Written by group commit: the sender threads that finish a batch while a write is under
way wait for it, and the next write carries all of theirs, packed (zlib'd JSON) into one
row of the `checkpoints` table (PartitionKey run id, RowKey the group's first batch key),
or a few rows in one transaction if they do not fit a property's 64 KiB. One row, not one
per batch: each entity of a transaction costs the SDK a multipart part, which cost more
CPU than the send it recorded. A batch counts as in flight until its group is written, so
the crash bound stays "at most the batches in flight" while the table sees one request
per group, not per batch.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable
from typing import Any, ClassVar

import orjson
from pydantic import Field

from core.storage import Storage
from core.storage.tables import EntityTable, TableEntity, safe_key


class BatchCheckpoint(TableEntity):
    """Table `checkpoints`: PartitionKey run id, RowKey `{worker}-{batch}` zero-padded."""

    table_name: ClassVar[str] = "checkpoints"

    items: dict[str, list[Any]] = Field(default_factory=dict)
    """`bucket:line` of every item of the batch -> [] if applied, else [unmatched, reason]."""
    packed: bytes = b""
    """The same for a group of batches, as zlib'd JSON (what `CheckpointLog` writes)."""

    def acknowledged(self) -> dict[str, list[Any]]:
        if not self.packed:
            return self.items  # one batch, as rows were written before group commit
        return dict(orjson.loads(zlib.decompress(self.packed)))


class CheckpointLog:
    """Reads a run's checkpoints; records acknowledged batches by group commit."""

    def __init__(self, storage: Storage) -> None:
        self._table: EntityTable[BatchCheckpoint] = storage.tables.get(BatchCheckpoint)
        self._group = _GroupCommit(self._write)

    def gather_for(self, seconds: float) -> None:
        """With several sends in flight: a write waits up to `seconds` for more batches
        to join it (fewer, fuller writes: each costs the SDK ~4 ms of CPU). 0 with one
        send at a time, which would only wait."""
        self._group.linger = seconds

    def load(self, run_id: str) -> dict[str, list[Any]]:
        acknowledged: dict[str, list[Any]] = {}
        for checkpoint in self._table.query_partition(safe_key(run_id)):
            acknowledged.update(checkpoint.acknowledged())
        return acknowledged

    def record(self, run_id: str, key: str, items: dict[str, list[Any]]) -> None:
        """Returns once the batch's row is written (alone or with others'); thread-safe."""
        self._group.commit(
            BatchCheckpoint(partition_key=safe_key(run_id), row_key=key, items=items)
        )

    def _write(self, rows: list[BatchCheckpoint]) -> None:
        merged: dict[str, list[Any]] = {}
        for row in rows:
            merged.update(row.items)
        packs = _packed(list(merged.items()))
        first = rows[0]
        entities = [
            BatchCheckpoint(
                partition_key=first.partition_key, row_key=f"{first.row_key}-{n:03d}", packed=pack
            )
            for n, pack in enumerate(packs)
        ]
        if len(entities) == 1:
            self._table.upsert(entities[0])
        else:  # one partition: one transaction, so the group lands whole or not at all
            self._table.write_batch(entities)


_PACK_MAX_BYTES = 60_000
"""Under a binary property's 64 KiB."""


def _packed(items: list[tuple[str, list[Any]]]) -> list[bytes]:
    pack = zlib.compress(orjson.dumps(dict(items)), 1)
    if len(pack) <= _PACK_MAX_BYTES or len(items) == 1:
        return [pack]
    middle = len(items) // 2
    return _packed(items[:middle]) + _packed(items[middle:])


class _Ticket:
    __slots__ = ("done", "error", "row")

    def __init__(self, row: BatchCheckpoint) -> None:
        self.row = row
        self.done = False
        self.error: BaseException | None = None


class _GroupCommit:
    """Whoever finds no write under way writes everything queued, for everyone waiting."""

    _MAX_GROUP = 100  # one table transaction

    def __init__(self, write: Callable[[list[BatchCheckpoint]], None]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._queued: list[_Ticket] = []
        self._writing = False
        self.linger = 0.0

    def commit(self, row: BatchCheckpoint) -> None:
        ticket = _Ticket(row)
        with self._cond:
            self._queued.append(ticket)
            self._cond.notify_all()  # a leader gathering a group counts us in
        while True:
            with self._cond:
                while not ticket.done and self._writing:
                    self._cond.wait()
                if ticket.done:
                    break
                self._writing = True  # nobody is writing and ours is queued: lead
                deadline = time.monotonic() + self.linger
                while len(self._queued) < self._MAX_GROUP:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                group = self._queued[: self._MAX_GROUP]
                del self._queued[: self._MAX_GROUP]
            error: BaseException | None = None
            try:
                self._write([t.row for t in group])
            except BaseException as exc:  # every waiter of the group gets it
                error = exc
            with self._cond:
                for t in group:
                    t.done, t.error = True, error
                self._writing = False
                self._cond.notify_all()
        if ticket.error is not None:
            raise ticket.error
