"""The storage layer against a storage service that resets connections and delays
answers (devhost/faultproxy.py in front of Azurite): idempotent operations are retried,
bounded, and end as they would on a clean connection."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pytest
from azure.core.exceptions import HttpResponseError, ServiceResponseError

from core.errors import ConcurrencyConflict, EntityExists, StorageError
from core.storage import Storage
from core.storage.connection import parse_connection_string
from core.storage.retry import ATTEMPTS, retrying, transient
from core.storage.tables import TableEntity
from core.sync.state import Part, StateStore, _Queued
from devhost.faultproxy import FaultProxy

pytestmark = pytest.mark.integration


class Row(TableEntity):
    table_name: ClassVar[str] = "faultrows"

    value: int = 0


@pytest.fixture
def proxied(local_services: dict[str, str]) -> Iterator[tuple[Storage, FaultProxy, FaultProxy]]:
    """A Storage whose table and blob calls go through fault proxies."""
    account = parse_connection_string(local_services["AzureWebJobsStorage"])
    table, blob = (urlsplit(url) for url in (account.table_url, account.blob_url))
    table_proxy = FaultProxy(table.hostname or "", table.port or 0).start()
    blob_proxy = FaultProxy(blob.hostname or "", blob.port or 0).start()
    via = replace(
        account,
        table_url=f"http://127.0.0.1:{table_proxy.port}{table.path}",
        blob_url=f"http://127.0.0.1:{blob_proxy.port}{blob.path}",
    )
    try:
        yield Storage(via), table_proxy, blob_proxy
    finally:
        table_proxy.stop()
        blob_proxy.stop()


def test_transient_failures_are_retried_and_others_raised_at_once() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ServiceResponseError("connection reset by peer")
        return "done"

    assert retrying(flaky, what="t", sleep=lambda _: None) == "done" and len(calls) == 3
    busy = HttpResponseError("ServerBusy")
    busy.status_code = 503
    assert transient(busy)
    refused = HttpResponseError("Forbidden")
    refused.status_code = 403
    assert not transient(refused)
    calls.clear()

    def always() -> None:
        calls.append(1)
        raise busy

    with pytest.raises(StorageError):
        retrying(always, what="t", sleep=lambda _: None)
    assert len(calls) == ATTEMPTS  # bounded


def test_table_writes_whose_answers_are_lost_end_as_on_a_clean_connection(
    proxied: Any, storage: Storage, unique: str
) -> None:
    faulty, table_proxy, _ = proxied
    table = faulty.tables.get(Row)
    table_proxy.configure(reset_every=2)  # every other answer is lost after the write landed
    rows = [Row(partition_key=unique, row_key=f"{n:03d}", value=n) for n in range(250)]
    assert table.write_batch(rows) == 250  # transactions of upserts, sent again
    for n in range(5):
        table.mutate(unique, "counter", lambda r, n=n: Row(partition_key=unique, row_key="counter",
                                                           value=n))  # fmt: skip
    with contextlib.suppress(EntityExists):  # the first attempt landed: the retry finds it
        table.insert(Row(partition_key=unique, row_key="created", value=1))
    assert table_proxy.stats.resets > 5
    table_proxy.configure(reset_every=0)
    clean = storage.tables.get(Row)
    stored = {r.row_key: r.value for r in clean.query_partition(unique)}
    assert stored == {**{f"{n:03d}": n for n in range(250)}, "counter": 4, "created": 1}


def test_a_state_pointer_whose_commit_landed_before_its_answer_was_lost_is_no_conflict(
    proxied: Any, unique: str
) -> None:
    """A pointer transaction sent again after its answer was lost meets its own write (a
    changed ETag): the bucket counts as committed, not as changed by another run."""
    faulty, table_proxy, _ = proxied
    states = StateStore(faulty, f"s{unique}", "braze", "f", 4)
    parts = (Part("packs/run-1.gz", 0, 10, 20),)
    committed: list[str] = []
    created = [_Queued(1, None, parts, committed.append), _Queued(2, None, parts, committed.append)]
    table_proxy.configure(reset_every=1)  # the transaction lands; its answer never comes
    with pytest.raises(StorageError):
        states.commit_pointers(created)  # every attempt's answer lost: it gives up, bounded
    table_proxy.configure(reset_every=0)
    states.commit_pointers(created)  # the retry of the worker: the rows are its own
    assert len(committed) == 2
    other = (Part("packs/run-2.gz", 0, 10, 20),)
    with pytest.raises(ConcurrencyConflict):  # a row another run wrote is still a conflict
        states.commit_pointers([_Queued(1, None, other, committed.append)])
