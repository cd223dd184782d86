"""Table layer against Azurite: ETags, create-only, batches, paging."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import ClassVar

import pytest
from pydantic import BaseModel, Field

from core.errors import ConcurrencyConflict, EntityExists
from core.storage.tables import (
    MAX_BATCH_BYTES,
    MAX_BATCH_OPERATIONS,
    EntityTable,
    TableEntity,
    _transaction_chunks,
    safe_key,
    to_table_entity,
)

pytestmark = pytest.mark.integration


class Nested(BaseModel):
    label: str
    weight: float


class Sample(TableEntity):
    table_name: ClassVar[str] = "placeholder"
    counter: int = 0
    big_number: int = 0
    when: datetime | None = None
    tags: list[str] = Field(default_factory=list)
    extra: dict[str, int] = Field(default_factory=dict)
    nested: Nested | None = None
    note: str | None = None
    blob: str = ""
    blob2: str = ""


@pytest.fixture
def table(storage, unique: str) -> EntityTable[Sample]:  # type: ignore[no-untyped-def]
    model = type(f"Sample_{unique}", (Sample,), {"table_name": unique, "__module__": __name__})
    return storage.tables.get(model)


def entity(table: EntityTable[Sample], pk: str, rk: str, **fields: object) -> Sample:
    return table.model(partition_key=pk, row_key=rk, **fields)


def test_round_trip_of_typed_fields(table: EntityTable[Sample]) -> None:
    when = datetime(2026, 11, 24, 4, 18, 0, 123000, tzinfo=UTC)
    original = entity(
        table,
        "p",
        "r",
        counter=7,
        big_number=2**40,
        when=when,
        tags=["a", "b"],
        extra={"x": 1},
        nested=Nested(label="n", weight=0.5),
        note=None,
    )
    table.insert(original)
    stored = table.get("p", "r")
    assert stored is not None
    assert stored.entity == original
    assert stored.etag


def test_insert_is_create_only(table: EntityTable[Sample]) -> None:
    table.insert(entity(table, "p", "r", counter=1))
    with pytest.raises(EntityExists):
        table.insert(entity(table, "p", "r", counter=2))
    found = table.get("p", "r")
    assert found is not None and found.entity.counter == 1


def test_stale_etag_is_a_conflict_never_an_overwrite(table: EntityTable[Sample]) -> None:
    etag = table.insert(entity(table, "p", "r", counter=1))
    table.replace(entity(table, "p", "r", counter=2), etag)
    with pytest.raises(ConcurrencyConflict):
        table.replace(entity(table, "p", "r", counter=99), etag)
    found = table.get("p", "r")
    assert found is not None and found.entity.counter == 2


def test_guarded_delete(table: EntityTable[Sample]) -> None:
    etag = table.insert(entity(table, "p", "r"))
    table.replace(entity(table, "p", "r", counter=5), etag)
    with pytest.raises(ConcurrencyConflict):
        table.delete("p", "r", etag=etag)
    table.delete("p", "r")
    assert table.get("p", "r") is None


def test_concurrent_mutations_all_land(table: EntityTable[Sample]) -> None:
    workers, increments = 6, 5

    def bump(current: Sample | None) -> Sample:
        base = current or entity(table, "p", "counter")
        return base.model_copy(update={"counter": base.counter + 1})

    def work() -> None:
        for _ in range(increments):
            table.mutate("p", "counter", bump, attempts=50)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    found = table.get("p", "counter")
    assert found is not None and found.entity.counter == workers * increments


def test_mutate_reports_when_contention_never_ends(table: EntityTable[Sample]) -> None:
    table.insert(entity(table, "p", "r"))

    def meddle(current: Sample | None) -> Sample:
        assert current is not None
        # Someone else writes between our read and our write, every time.
        table.upsert(current.model_copy(update={"counter": current.counter + 100}))
        return current.model_copy(update={"counter": -1})

    with pytest.raises(ConcurrencyConflict, match="after 3 tries"):
        table.mutate("p", "r", meddle, attempts=3)
    found = table.get("p", "r")
    assert found is not None and found.entity.counter == 300


def test_batch_write_across_partitions_and_limits(table: EntityTable[Sample]) -> None:
    rows = [entity(table, f"p{i % 3}", f"{i:05d}", counter=i) for i in range(530)]
    assert table.write_batch(rows) == 530
    for partition in ("p0", "p1", "p2"):
        stored = list(table.query_partition(partition))
        assert [r.counter for r in stored] == [i for i in range(530) if f"p{i % 3}" == partition]


def test_batch_of_large_entities_is_split_by_size(table: EntityTable[Sample]) -> None:
    payload = "x" * 30_000  # a string property holds 64 KiB of UTF-16: 32K characters
    rows = [entity(table, "big", f"{i:03d}", blob=payload, blob2=payload) for i in range(90)]
    chunks = list(_transaction_chunks([to_table_entity(r) for r in rows]))
    assert len(chunks) > 1
    assert all(len(chunk) <= MAX_BATCH_OPERATIONS for chunk in chunks)
    assert all(sum(len(str(row)) for row in chunk) < MAX_BATCH_BYTES for chunk in chunks)
    assert table.write_batch(rows) == 90
    assert sum(1 for _ in table.query_partition("big")) == 90


def test_create_only_batch_is_atomic(table: EntityTable[Sample]) -> None:
    table.insert(entity(table, "p", "00005"))
    rows = [entity(table, "p", f"{i:05d}") for i in range(10)]
    with pytest.raises(EntityExists):
        table.write_batch(rows, create_only=True)
    assert [r.row_key for r in table.query_partition("p")] == ["00005"]


def test_paging_and_row_ranges(table: EntityTable[Sample]) -> None:
    table.write_batch([entity(table, "p", f"{i:03d}", counter=i) for i in range(35)])
    page = table.query_page("PartitionKey eq @pk", {"pk": "p"}, page_size=10)
    seen = list(page.items)
    while page.continuation is not None:
        page = table.query_page(
            "PartitionKey eq @pk", {"pk": "p"}, page_size=10, continuation=page.continuation
        )
        seen += page.items
    assert [r.counter for r in seen] == list(range(35))
    ranged = list(table.query_partition("p", row_from="010", row_before="013", page_size=2))
    assert [r.row_key for r in ranged] == ["010", "011", "012"]


def test_safe_key_escapes_forbidden_characters() -> None:
    assert safe_key("a/b\\c#d?e%f") == "a%2Fb%5Cc%23d%3Fe%25f"
    assert safe_key("tab\there") == "tab%09here"
    assert safe_key("plain-key_1.csv") == "plain-key_1.csv"
