"""Typed Azure Table storage access.

An entity type is a pydantic model with `partition_key` and `row_key` fields. Scalars are
stored as native table properties; lists, dicts and nested models as JSON text. Writes are
either create-only, unconditional, or guarded by the ETag read with them, so a lost race is
always detected; a write the service may or may not have applied (a connection lost on
the way back) is retried (`core/storage/retry.py`). Batches respect the service's
transaction limits: one partition, at most 100 operations and 4 MB per transaction.
"""

from __future__ import annotations

import contextlib
import json
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, ClassVar, Generic, TypeVar, cast

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import EdmType, EntityProperty, TableClient, TableServiceClient, UpdateMode
from pydantic import BaseModel

from core.errors import ConcurrencyConflict, EntityExists, StorageError
from core.storage.retry import retrying

MAX_BATCH_OPERATIONS = 100
# The service caps a transaction's payload at 4 MiB; keep headroom for the multipart framing.
MAX_BATCH_BYTES = 3_500_000
# Per-entity framing overhead estimate inside a batch (headers, boundary, URL).
_ENTITY_OVERHEAD_BYTES = 512
_INT32 = range(-(2**31), 2**31)
_FORBIDDEN_KEY_CHARS = str.maketrans({c: f"%{ord(c):02X}" for c in "/\\#?%"})


def safe_key(text: str) -> str:
    """Escape characters that PartitionKey and RowKey may not contain (and '%' itself)."""
    escaped = text.translate(_FORBIDDEN_KEY_CHARS)
    return "".join(ch if ch.isprintable() else f"%{ord(ch):02X}" for ch in escaped)


class TableEntity(BaseModel):
    """Base of typed table entities. Subclasses name their table in `table_name`."""

    table_name: ClassVar[str]
    partition_key: str
    row_key: str


E = TypeVar("E", bound=TableEntity)


@dataclass(frozen=True)
class Versioned(Generic[E]):
    """An entity together with the ETag it was read or written with."""

    entity: E
    etag: str


@dataclass(frozen=True)
class Page(Generic[E]):
    items: list[E]
    continuation: dict[str, str] | None


def _is_json_annotation(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_json_annotation(arg) for arg in typing.get_args(annotation))
    if origin in (list, dict, tuple, set, frozenset):
        return True
    return isinstance(annotation, type) and issubclass(annotation, (BaseModel, list, dict))


def _to_property(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool | float | str | bytes | datetime) or value is None:
        return value
    if isinstance(value, int):
        return value if value in _INT32 else EntityProperty(value, EdmType.INT64)
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return json.dumps(value, default=str, separators=(",", ":"))


def to_table_entity(entity: TableEntity) -> dict[str, Any]:
    row: dict[str, Any] = {"PartitionKey": entity.partition_key, "RowKey": entity.row_key}
    for name in type(entity).model_fields:
        if name in ("partition_key", "row_key"):
            continue
        value = getattr(entity, name)
        if value is not None:
            row[name] = _to_property(value)
    return row


def from_table_entity(model: type[E], row: dict[str, Any]) -> E:
    data: dict[str, Any] = {"partition_key": row["PartitionKey"], "row_key": row["RowKey"]}
    for name, field in model.model_fields.items():
        if name in data or name not in row:
            continue
        value = row[name]
        if isinstance(value, EntityProperty):
            value = value.value
        if isinstance(value, str) and _is_json_annotation(field.annotation):
            value = json.loads(value)
        data[name] = value
    return model.model_validate(data)


def _estimated_size(row: dict[str, Any]) -> int:
    return len(json.dumps(row, default=str)) + _ENTITY_OVERHEAD_BYTES


def _wrap(exc: HttpResponseError, action: str, table: str) -> StorageError:
    return StorageError(f"table {table}: {action} failed ({exc.status_code}): {exc.reason}")


class EntityTable(Generic[E]):
    """All operations on one table, typed by its entity model."""

    def __init__(
        self, service: TableServiceClient, model: type[E], name: str | None = None
    ) -> None:
        self.model = model
        self.name = name or model.table_name
        self._client: TableClient = service.get_table_client(self.name)

    def ensure(self) -> None:
        with contextlib.suppress(ResourceExistsError):
            retrying(self._client.create_table, what=f"{self.name} create")

    # -- single entities -------------------------------------------------------------

    def get(self, partition_key: str, row_key: str) -> Versioned[E] | None:
        try:
            row = self._client.get_entity(partition_key, row_key)
        except ResourceNotFoundError:
            return None
        return Versioned(from_table_entity(self.model, row), str(row.metadata["etag"]))

    def get_many(
        self, partition_key: str, row_keys: list[str], *, parallel: int = 8
    ) -> dict[str, Versioned[E]]:
        """Point reads of many rows of one partition, `parallel` at a time (missing ones
        absent). Point reads, not one query: a filter OR-ing row keys scans the partition."""
        found = self.get_points([(partition_key, key) for key in row_keys], parallel=parallel)
        return {row_key: value for (_, row_key), value in found.items()}

    def get_points(
        self, keys: list[tuple[str, str]], *, parallel: int = 8
    ) -> dict[tuple[str, str], Versioned[E]]:
        """Point reads of rows anywhere in the table, `parallel` at a time (missing ones absent)."""
        if len(keys) <= 1 or parallel <= 1:
            found = [(key, self.get(*key)) for key in keys]
        else:
            with ThreadPoolExecutor(min(parallel, len(keys))) as pool:
                found = list(pool.map(lambda key: (key, self.get(*key)), keys))
        return {key: value for key, value in found if value is not None}

    def insert(self, entity: E) -> str:
        """Create-only insert; raises EntityExists if the keys are taken. Returns the ETag."""
        row = to_table_entity(entity)
        try:
            meta = retrying(lambda: self._client.create_entity(row), what=f"{self.name} insert")
        except ResourceExistsError:
            raise EntityExists(
                f"table {self.name}: {entity.partition_key}/{entity.row_key} exists"
            ) from None
        return str(meta["etag"])

    def upsert(self, entity: E) -> str:
        """Unconditional replace-or-insert, for state only one writer owns."""
        meta = self._client.upsert_entity(to_table_entity(entity), mode=UpdateMode.REPLACE)
        return str(meta["etag"])

    def replace(self, entity: E, etag: str) -> str:
        """Replace only if unchanged since `etag` was read; raises ConcurrencyConflict."""
        try:
            meta = self._client.update_entity(
                to_table_entity(entity),
                mode=UpdateMode.REPLACE,
                etag=etag,
                match_condition=MatchConditions.IfNotModified,
            )
        except (ResourceModifiedError, ResourceNotFoundError):
            raise ConcurrencyConflict(
                f"table {self.name}: {entity.partition_key}/{entity.row_key} changed concurrently"
            ) from None
        return str(meta["etag"])

    def delete(self, partition_key: str, row_key: str, etag: str | None = None) -> None:
        kwargs: dict[str, Any] = {}
        if etag is not None:
            kwargs = {"etag": etag, "match_condition": MatchConditions.IfNotModified}
        try:
            self._client.delete_entity(partition_key, row_key, **kwargs)
        except ResourceModifiedError:
            raise ConcurrencyConflict(
                f"table {self.name}: {partition_key}/{row_key} changed before delete"
            ) from None

    def mutate(
        self,
        partition_key: str,
        row_key: str,
        change: Callable[[E | None], E | None],
        *,
        attempts: int = 8,
    ) -> Versioned[E] | None:
        """Read-modify-write guarded by ETag, retried on conflict.

        `change` gets the current entity (or None) and returns the new one, or None to leave
        the row as it is. It may run several times, so it must not have side effects.
        """
        for _ in range(attempts):
            current = self.get(partition_key, row_key)
            updated = change(current.entity if current else None)
            if updated is None or (current is not None and updated == current.entity):
                return current  # nothing to change (or a write whose answer was lost landed)
            try:
                if current is None:
                    return Versioned(updated, self.insert(updated))
                return Versioned(updated, self.replace(updated, current.etag))
            except (ConcurrencyConflict, EntityExists):
                continue
        raise ConcurrencyConflict(
            f"table {self.name}: {partition_key}/{row_key} still contended after {attempts} tries"
        )

    # -- batches ---------------------------------------------------------------------

    def write_batch(
        self, entities: Iterable[E], *, create_only: bool = False, parallel: int = 1
    ) -> int:
        """Write many entities in transactions: grouped by partition, <=100 ops, <4 MB.

        Each transaction is atomic; a create-only batch that hits an existing entity raises
        EntityExists and writes nothing of that transaction. With `parallel` > 1, up to that
        many transactions are in flight at once (for entities no one else writes
        concurrently). Returns the number written.
        """
        operation = "create" if create_only else "upsert"
        by_partition: dict[str, list[dict[str, Any]]] = {}
        for entity in entities:
            by_partition.setdefault(entity.partition_key, []).append(to_table_entity(entity))
        chunks = [chunk for rows in by_partition.values() for chunk in _transaction_chunks(rows)]

        def submit(chunk: list[dict[str, Any]]) -> int:
            if len(chunk) == 1:  # a transaction of one is a plain write, without multipart
                entity = from_table_entity(self.model, chunk[0])
                if create_only:
                    self.insert(entity)
                else:
                    retrying(lambda: self.upsert(entity), what=f"{self.name} upsert")
                return 1
            ops: list[Any] = [
                (operation, row) if create_only else (operation, row, {"mode": "replace"})
                for row in chunk
            ]
            try:
                retrying(lambda: self._client.submit_transaction(ops), what=f"{self.name} batch")
            except ResourceExistsError:
                raise EntityExists(f"table {self.name}: a batch entity exists") from None
            except HttpResponseError as exc:
                if "EntityAlreadyExists" in str(exc):
                    raise EntityExists(f"table {self.name}: a batch entity exists") from None
                raise _wrap(exc, "batch", self.name) from exc
            return len(chunk)

        if parallel <= 1 or len(chunks) <= 1:
            return sum(submit(chunk) for chunk in chunks)
        with ThreadPoolExecutor(parallel) as pool:
            return sum(pool.map(submit, chunks))

    def transact(self, operations: list[tuple[str, E, str | None]]) -> list[str]:
        """One atomic transaction on one partition; the entities' new ETags, in order.

        Operations are `("create", entity, None)`, `("upsert", entity, None)`,
        `("replace", entity, etag)` or `("delete", entity, None)`. Nothing is written unless
        every operation succeeds: a taken key raises EntityExists, a changed ETag (or a
        deleted entity already gone) ConcurrencyConflict.
        """
        ops: list[Any] = []
        for action, entity, etag in operations:
            row = to_table_entity(entity)
            if action == "create":
                ops.append(("create", row))
            elif action == "upsert":
                ops.append(("upsert", row, {"mode": UpdateMode.REPLACE}))
            elif action == "delete":
                ops.append(("delete", row))
            elif action == "replace" and etag is not None:
                ops.append(
                    (
                        "update",
                        row,
                        {
                            "mode": UpdateMode.REPLACE,
                            "etag": etag,
                            "match_condition": MatchConditions.IfNotModified,
                        },
                    )
                )
            else:
                raise ValueError(f"unknown transaction operation {action!r}")
        try:
            written = retrying(
                lambda: self._client.submit_transaction(ops), what=f"{self.name} transaction"
            )
        except ResourceExistsError:
            raise EntityExists(f"table {self.name}: a transaction entity exists") from None
        except (ResourceModifiedError, ResourceNotFoundError):
            raise ConcurrencyConflict(
                f"table {self.name}: a transaction entity changed concurrently"
            ) from None
        except HttpResponseError as exc:
            text = str(exc)
            if "EntityAlreadyExists" in text:
                raise EntityExists(f"table {self.name}: a transaction entity exists") from None
            if exc.status_code == 412 or "UpdateConditionNotSatisfied" in text:
                raise ConcurrencyConflict(
                    f"table {self.name}: a transaction entity changed concurrently"
                ) from None
            raise _wrap(exc, "transaction", self.name) from exc
        return [str(meta.get("etag", "")) for meta in written]  # a delete has none

    # -- queries ---------------------------------------------------------------------

    def query_page(
        self,
        filter_text: str,
        parameters: dict[str, Any] | None = None,
        *,
        page_size: int = 1000,
        continuation: dict[str, str] | None = None,
    ) -> Page[E]:
        """One page of a query, with the token to resume from (None at the end)."""
        pager = self._client.query_entities(
            filter_text, parameters=parameters or {}, results_per_page=page_size
        ).by_page(continuation_token=cast(Any, continuation))  # tables use a dict token
        items = [from_table_entity(self.model, row) for row in next(pager, [])]
        return Page(items, pager.continuation_token)  # type: ignore[attr-defined]

    def query(
        self, filter_text: str, parameters: dict[str, Any] | None = None, *, page_size: int = 1000
    ) -> Iterator[E]:
        continuation: dict[str, str] | None = None
        while True:
            page = self.query_page(
                filter_text, parameters, page_size=page_size, continuation=continuation
            )
            yield from page.items
            if page.continuation is None:
                return
            continuation = page.continuation

    def query_partition(
        self,
        partition_key: str,
        *,
        row_from: str | None = None,
        row_before: str | None = None,
        row_to: str | None = None,
        page_size: int = 1000,
    ) -> Iterator[E]:
        """Rows of one partition in RowKey order, optionally from `row_from` and before
        `row_before` or up to and including `row_to`."""
        filter_text, parameters = _partition_filter(partition_key, row_from, row_before, row_to)
        return self.query(filter_text, parameters, page_size=page_size)

    def query_partition_versioned(
        self,
        partition_key: str,
        *,
        row_from: str | None = None,
        row_before: str | None = None,
        row_to: str | None = None,
    ) -> Iterator[Versioned[E]]:
        """Like `query_partition`, each row with its ETag (for a later conditional write)."""
        filter_text, parameters = _partition_filter(partition_key, row_from, row_before, row_to)
        for row in self._client.query_entities(filter_text, parameters=parameters):
            yield Versioned(from_table_entity(self.model, row), str(row.metadata["etag"]))


def _partition_filter(
    partition_key: str, row_from: str | None, row_before: str | None, row_to: str | None
) -> tuple[str, dict[str, Any]]:
    clauses = ["PartitionKey eq @pk"]
    parameters: dict[str, Any] = {"pk": partition_key}
    for clause, name, value in (
        ("RowKey ge @lo", "lo", row_from),
        ("RowKey lt @hi", "hi", row_before),
        ("RowKey le @last", "last", row_to),
    ):
        if value is not None:
            clauses.append(clause)
            parameters[name] = value
    return " and ".join(clauses), parameters


def _transaction_chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        row_size = _estimated_size(row)
        if chunk and (len(chunk) == MAX_BATCH_OPERATIONS or size + row_size > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += row_size
    if chunk:
        yield chunk


class Tables:
    """Factory of typed tables on one account, creating each table once per process."""

    def __init__(self, service: TableServiceClient) -> None:
        self.service = service
        self._ensured: set[str] = set()

    def get(self, model: type[E], name: str | None = None) -> EntityTable[E]:
        """The model's table, or one of its kind named `name` (tables per period)."""
        table = EntityTable(self.service, model, name)
        if table.name not in self._ensured:
            table.ensure()
            self._ensured.add(table.name)
        return table

    def existing(self, model: type[E], name: str) -> EntityTable[E]:
        """A table of the model's kind that is not created if it is missing (reads)."""
        return EntityTable(self.service, model, name)

    def names(self, prefix: str) -> list[str]:
        """The names of the account's tables that start with `prefix`, sorted."""
        found = self.service.query_tables(
            "TableName ge @lo and TableName lt @hi",
            parameters={"lo": prefix, "hi": prefix + "~"},
        )
        return sorted(table.name for table in found)

    def drop(self, name: str) -> None:
        """Delete a whole table (a missing one is no error)."""
        retrying(lambda: self.service.delete_table(name), what=f"{name} delete")
        self._ensured.discard(name)
