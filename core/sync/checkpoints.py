"""Where acknowledged batches are recorded, so a re-run does not send them again.

One table row per batch (`checkpoints`: PartitionKey run id, RowKey `{worker}-{batch}`),
written by group commit: the sender threads that finish a batch while a write is under
way wait for it, and the next write carries all of theirs in one transaction (up to 100
rows). A batch counts as in flight until its row is written, so the crash bound stays
"at most the batches in flight" while the table sees one request per group, not per
batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import Field

from core.storage import Storage
from core.storage.tables import EntityTable, TableEntity, safe_key


class BatchCheckpoint(TableEntity):
    """Table `checkpoints`: PartitionKey run id, RowKey `{worker}-{batch}` zero-padded."""

    table_name: ClassVar[str] = "checkpoints"

    items: dict[str, list[Any]] = Field(default_factory=dict)
    """`bucket:line` of every item of the batch -> [] if applied, else [unmatched, reason]."""


class CheckpointLog:
    """Reads a run's checkpoints; records acknowledged batches by group commit."""

    def __init__(self, storage: Storage) -> None:
        self._table: EntityTable[BatchCheckpoint] = storage.tables.get(BatchCheckpoint)
        self._group = _GroupCommit(self._write)

    def load(self, run_id: str) -> dict[str, list[Any]]:
        acknowledged: dict[str, list[Any]] = {}
        for checkpoint in self._table.query_partition(safe_key(run_id)):
            acknowledged.update(checkpoint.items)
        return acknowledged

    def record(self, run_id: str, key: str, items: dict[str, list[Any]]) -> None:
        """Returns once the batch's row is written (alone or with others'); thread-safe."""
        self._group.commit(
            BatchCheckpoint(partition_key=safe_key(run_id), row_key=key, items=items)
        )

    def _write(self, rows: list[BatchCheckpoint]) -> None:
        self._table.write_batch(rows)


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

    def commit(self, row: BatchCheckpoint) -> None:
        ticket = _Ticket(row)
        with self._cond:
            self._queued.append(ticket)
        while True:
            with self._cond:
                while not ticket.done and self._writing:
                    self._cond.wait()
                if ticket.done:
                    break
                self._writing = True  # nobody is writing and ours is queued: lead
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
