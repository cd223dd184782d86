"""The exclusion audit trail: every person a run kept out of a send, when, and by what rule.

A record says: at `at`, run `run_id` of `source` (a sync) did not send this person, with
`outcome` (`suppressed`, `blocked_by_policy`, `unmatched`) and `rule` (the suppression
reason, `no_consent`, the policy's id, `not_in_destination`). It is written once per
subject it can be looked up by: the profile id (the sync's identity), the e-mail address
and the phone number, each as a SHA-256 hash of `kind:value` (normalised), never in clear.

Table per month, `audit{YYYYMM}` (the month of `at`), PartitionKey the first two hex
digits of the subject's hash (256 partitions). Records are written in packs: one row per
partition per write (`ExclusionPack`, RowKey `~pack:{run_id}:{random}`) holding that
partition's records as zlib'd lines. One row per record (`ExclusionRecord`, RowKey
`{hash}:{run_id}`, how months before packs were written and are still read) cost the
SDK about 0.4 ms of CPU each inside a transaction: 60 s for a 1M-row export with 5%
unconsented. A lookup reads one key range and the partition's packs per month kept, and
drops the repeats a retried run may have written; an erasure rewrites the packs that
name the subject. Retention drops a month's whole table once all of it is older than
`SWITCHBOARD_AUDIT_RETENTION_DAYS`, so nothing is deleted row by row.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.storage import Storage
from core.storage.tables import EntityTable, TableEntity
from core.sync.mapping import RowRejected, normalise_email, normalise_phone

log = logging.getLogger(__name__)
TABLE_PREFIX = "audit"
SubjectKind = Literal["profile", "email", "phone"]
_WRITERS = 4


def subject_hash(kind: SubjectKind, value: str) -> str:
    return hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()


def table_for(at: datetime, prefix: str = TABLE_PREFIX) -> str:
    return f"{prefix}{at.year:04d}{at.month:02d}"


def _month_of(name: str, prefix: str) -> datetime | None:
    digits = name.removeprefix(prefix)
    if len(digits) != 6 or not digits.isdigit():
        return None
    year, month = int(digits[:4]), int(digits[4:])
    return datetime(year, month, 1, tzinfo=UTC) if 1 <= month <= 12 else None


def _month_end(start: datetime) -> datetime:
    return (start + timedelta(days=32)).replace(day=1)


class ExclusionRecord(TableEntity):
    table_name: ClassVar[str] = TABLE_PREFIX  # the month's table: table_for(at)

    kind: str
    source: str
    """What kept them out: `sync:{sync_id}`."""
    run_id: str
    at: datetime
    outcome: str
    rule: str


class ExclusionPack(TableEntity):
    """One write's records of one partition: lines `hash kind outcome rule`, zlib'd."""

    table_name: ClassVar[str] = TABLE_PREFIX  # the month's table: table_for(at)

    source: str
    run_id: str
    at: datetime
    packed: bytes

    def lines(self) -> list[tuple[str, str, str, str]]:
        text = zlib.decompress(self.packed).decode()
        return [_split(line) for line in text.split("\n") if line]

    def records(self, digest: str) -> list[ExclusionRecord]:
        return [
            ExclusionRecord(
                partition_key=self.partition_key, row_key=f"{digest}:{self.run_id}", kind=kind,
                source=self.source, run_id=self.run_id, at=self.at, outcome=outcome, rule=rule,
            )
            for found, kind, outcome, rule in self.lines() if found == digest
        ]  # fmt: skip


def _split(line: str) -> tuple[str, str, str, str]:
    digest, kind, outcome, rule = line.split(" ", 3)
    return digest, kind, outcome, rule


_PACK_LINES = 1000
"""Records per pack: about 45 KB compressed (the hashes do not compress), under a binary
property's 64 KiB."""
_PACKS_FROM, _PACKS_BEFORE = "~pack:", "~pack;"
"""Pack rows sort after every hash's rows ('~' follows the hex digits)."""
Subject = tuple[str, str, str, str]
"""(hash, kind, outcome, rule) of one record."""


@dataclass(frozen=True)
class Exclusion:
    """One person kept out of a send by a run (the engine's view, in clear until stored)."""

    identity: str
    email: str | None
    phone: str | None
    outcome: str
    rule: str

    def subjects(self, identity_kind: SubjectKind) -> list[tuple[SubjectKind, str]]:
        found: dict[tuple[SubjectKind, str], None] = {(identity_kind, self.identity): None}
        if self.email:
            found[("email", self.email)] = None
        if self.phone:
            found[("phone", self.phone)] = None
        return list(found)


def exclusion(
    identity: str, email: str | None, phone: str | None, outcome: str, rule: str
) -> Exclusion:
    """An exclusion with its e-mail address normalised as lookups normalise it."""
    if email is not None:
        try:
            email = normalise_email(email)
        except RowRejected:
            email = None
    return Exclusion(identity, email, phone, outcome, rule)


class AuditLog:
    def __init__(self, storage: Storage, prefix: str = TABLE_PREFIX) -> None:
        self.storage = storage
        self.prefix = prefix
        """Its tables' names: `{prefix}{YYYYMM}` (tests keep their own)."""

    def record(
        self,
        source: str,
        run_id: str,
        exclusions: Iterable[Exclusion],
        *,
        identity_kind: SubjectKind = "profile",
        at: datetime | None = None,
    ) -> int:
        """Write a run's exclusions; how many records."""
        at = at or datetime.now(UTC)
        return self.write(source, run_id, subjects(exclusions, identity_kind), at)

    def write(self, source: str, run_id: str, records: list[Subject], at: datetime) -> int:
        """The records as packs: a row per partition (per 1,000 records), in parallel."""
        if not records:
            return 0
        by_partition: dict[str, list[str]] = {}
        for record in records:
            by_partition.setdefault(record[0][:2], []).append(" ".join(record))
        packs = [
            ExclusionPack(
                partition_key=partition, row_key=f"{_PACKS_FROM}{run_id}:{uuid.uuid4().hex[:12]}",
                source=source, run_id=run_id, at=at,
                packed=zlib.compress("\n".join(lines[at_line : at_line + _PACK_LINES]).encode()),
            )
            for partition, lines in by_partition.items()
            for at_line in range(0, len(lines), _PACK_LINES)
        ]  # fmt: skip
        table = self.storage.tables.get(ExclusionPack, table_for(at, self.prefix))
        table.write_batch(packs, parallel=_WRITERS)
        return len(records)

    def lookup(self, kind: SubjectKind, value: str, *, now: datetime | None = None,
               retention_days: int) -> list[ExclusionRecord]:  # fmt: skip
        """Every record of one subject still kept, newest first."""
        digest = subject_hash(kind, value)
        oldest = (now or datetime.now(UTC)) - timedelta(days=retention_days)
        found: list[ExclusionRecord] = []
        tables = self.storage.tables
        for name in tables.names(self.prefix):
            month = _month_of(name, self.prefix)
            if month is None or _month_end(month) <= oldest:
                continue
            table = tables.existing(ExclusionRecord, name)
            found += table.query_partition(
                digest[:2], row_from=f"{digest}:", row_before=f"{digest};"
            )
            for pack in tables.existing(ExclusionPack, name).query_partition(
                digest[:2], row_from=_PACKS_FROM, row_before=_PACKS_BEFORE
            ):
                found += pack.records(digest)
        # A retried run may have written a record twice: once is what happened.
        unique = {(r.run_id, r.kind, r.outcome, r.rule): r for r in found if r.at >= oldest}
        return sorted(unique.values(), key=lambda r: (r.at, r.run_id), reverse=True)

    def forget(self, kind: SubjectKind, value: str) -> int:
        """Delete every record of one subject (erasure); how many."""
        digest = subject_hash(kind, value)
        deleted = 0
        tables = self.storage.tables
        for name in tables.names(self.prefix):
            if _month_of(name, self.prefix) is None:
                continue
            table = tables.existing(ExclusionRecord, name)
            for row in list(
                table.query_partition(digest[:2], row_from=f"{digest}:", row_before=f"{digest};")
            ):
                table.delete(row.partition_key, row.row_key)
                deleted += 1
            deleted += _forget_in_packs(tables.existing(ExclusionPack, name), digest)
        return deleted

    def purge(self, *, retention_days: int, now: datetime | None = None) -> list[str]:
        """Drop the months wholly older than the retention; the tables dropped."""
        oldest = (now or datetime.now(UTC)) - timedelta(days=retention_days)
        dropped = []
        for name in self.storage.tables.names(self.prefix):
            month = _month_of(name, self.prefix)
            if month is not None and _month_end(month) <= oldest:
                self.storage.tables.drop(name)
                dropped.append(name)
        if dropped:
            log.info("audit months past retention dropped", extra={"tables": dropped})
        return dropped


class AuditWriter:
    """A run's exclusions, written a batch at a time on a thread of their own, at most one
    batch in flight (memory stays bounded however many rows a run keeps back)."""

    def __init__(
        self, storage: Storage, source: str, run_id: str, identity_kind: SubjectKind,
        batch: int = 2000,
    ) -> None:  # fmt: skip
        self._log = AuditLog(storage)
        self._source, self._run_id, self._kind, self._size = source, run_id, identity_kind, batch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="audit")
        self._pending: Future[int] | None = None
        self._batch: list[Exclusion] = []
        self.written = 0

    def add(self, exclusions: Iterable[Exclusion]) -> None:
        self._batch.extend(exclusions)
        if len(self._batch) >= self._size:
            self._flush()

    def _flush(self) -> None:
        self._wait()
        batch, self._batch = self._batch, []
        if batch:
            self._pending = self._pool.submit(
                self._log.record, self._source, self._run_id, batch, identity_kind=self._kind
            )

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.written += pending.result()

    def close(self) -> int:
        """Write what is left; how many rows were written in all. Raises a write's error."""
        try:
            self._flush()
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
        return self.written


def _forget_in_packs(table: EntityTable[ExclusionPack], digest: str) -> int:
    """Rewrite (or delete, if nothing else is left) every pack naming `digest`."""
    forgotten = 0
    for versioned in table.query_partition_versioned(
        digest[:2], row_from=_PACKS_FROM, row_before=_PACKS_BEFORE
    ):
        pack = versioned.entity
        lines = pack.lines()
        kept = [" ".join(line) for line in lines if line[0] != digest]
        if len(kept) == len(lines):
            continue
        forgotten += len(lines) - len(kept)
        # Under the ETag read: a conflict (a concurrent erasure of the same pack) raises,
        # and the erasure is retried as a whole.
        if kept:
            packed = zlib.compress("\n".join(kept).encode())
            table.replace(pack.model_copy(update={"packed": packed}), versioned.etag)
        else:
            table.delete(pack.partition_key, pack.row_key, versioned.etag)
    return forgotten


def subjects(exclusions: Iterable[Exclusion], identity_kind: SubjectKind) -> list[Subject]:
    """One record per subject an exclusion can be looked up by, hashed."""
    return [
        (subject_hash(kind, value), kind, exclusion.outcome, " ".join(exclusion.rule.split()))
        for exclusion in exclusions
        for kind, value in exclusion.subjects(identity_kind)
    ]


class AuditBuffer:
    """A run's exclusions gathered across buckets and written together, so that a table
    transaction carries many of a partition's rows: rows are spread over 256 partitions
    by subject hash, and one bucket's few hundred exclusions written alone cost about one
    transaction each (the SDK's multipart overhead, not the bytes, was the cost).

    Ordering is the caller's: `flush` before anything that marks a bucket finished (its
    state's commit, its result), so no finished bucket's exclusions are still in memory
    when a crash comes. `add` flushes by itself past `max_rows`. Thread-safe; one flush
    at a time, so a flush returns only once every row added before it is written."""

    def __init__(
        self, storage: Storage, source: str, run_id: str, identity_kind: SubjectKind,
        *, max_rows: int = 20_000,
    ) -> None:  # fmt: skip
        self._log = AuditLog(storage)
        self._source, self._run_id, self._kind = source, run_id, identity_kind
        self._max_rows = max_rows
        self._at = datetime.now(UTC)
        self._rows: list[Subject] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self.written = 0

    def add(self, exclusions: Iterable[Exclusion]) -> None:
        rows = subjects(exclusions, self._kind)
        with self._lock:
            self._rows.extend(rows)
            full = len(self._rows) >= self._max_rows
        if full:
            self.flush()

    def flush(self) -> None:
        with self._flushing:
            with self._lock:
                rows, self._rows = self._rows, []
            self.written += self._log.write(self._source, self._run_id, rows, self._at)


def identity_kind(destination_key: str) -> SubjectKind:
    """How a sync's identity is looked up: an address is one, anything else a profile id."""
    return "email" if destination_key == "email" else (
        "phone" if destination_key == "phone" else "profile"
    )  # fmt: skip


class AuditQuery(BaseModel):
    """`POST /api/audit/lookup`: exactly one of the three."""

    model_config = ConfigDict(extra="forbid")

    email: str | None = Field(default=None, max_length=320)
    phone: str | None = Field(default=None, max_length=40)
    profile_id: str | None = Field(default=None, min_length=1, max_length=512)

    @model_validator(mode="after")
    def _one(self) -> AuditQuery:
        given = [v for v in (self.email, self.phone, self.profile_id) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of email, phone or profile_id")
        return self

    def subject(self) -> tuple[SubjectKind, str]:
        """The subject as records are keyed; ValueError for an address that is not one."""
        try:
            if self.email is not None:
                return "email", normalise_email(self.email)
            if self.phone is not None:
                return "phone", normalise_phone(self.phone)
        except RowRejected as exc:
            raise ValueError(str(exc)) from None
        return "profile", str(self.profile_id).strip()


def lookup_answer(storage: Storage, query: AuditQuery, retention_days: int) -> dict[str, object]:
    """The route's answer: the subject by its hash only (never the address), its records."""
    kind, value = query.subject()
    records = AuditLog(storage).lookup(kind, value, retention_days=retention_days)
    return {
        "subject": {"kind": kind, "hash": subject_hash(kind, value)[:16]},
        "retention_days": retention_days,
        "exclusions": [
            {
                "at": r.at.isoformat().replace("+00:00", "Z"),
                "source": r.source,
                "run_id": r.run_id,
                "outcome": r.outcome,
                "rule": r.rule,
            }
            for r in records
        ],
    }
