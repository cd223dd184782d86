"""Rows settled during the split (core/sync/unchanged.py) end as their bucket would end them.

Each export is split twice by the C splitter, once with the digest index of the state the
export before it left and once without, and the bucket runs on both: the objects Braze
receives, the counts, rejects, checkpoints and the state written must be the same, on the
C path and on the reference. The exports repeat identities (exact copies and changed ones,
before and after their first row), so duplicates after a settled row are tested too.
"""

from __future__ import annotations

import csv
import gzip
import io
import random
from typing import Any

import pytest

from core.errors import ConcurrencyConflict
from core.suppression import SuppressionSnapshot
from core.sync.definitions import SyncDefinition, mapping_fingerprint, parse_document
from core.sync.mapping import RowMapper
from core.sync.native import native_mapping
from core.sync.split import feed_splitter, identity_key, read_header
from core.sync.state import SPEEDUPS, StateStore
from core.sync.unchanged import SettledRows, UnchangedIndex
from devhost.fakes.braze import FakeBraze
from tests.test_sync_speedups import (
    CONFIGURATIONS,
    FULL_COLUMNS,
    _changed,
    _random_rows,
    _run_bucket,
    _suppressions,
    _sync_document,
)

pytestmark = pytest.mark.integration


def _csv(rows: list[list[str]]) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FULL_COLUMNS)
    writer.writerows(rows)
    return out.getvalue().encode()


def _with_repeats(rng: random.Random, rows: list[list[str]]) -> list[list[str]]:
    """Some rows again, exactly or changed, placed before or after the first of them."""
    repeated = list(rows)
    for row in rng.sample(rows, 12):
        copy = list(row) if rng.random() < 0.5 else [row[0], "changed@example.com", *row[2:]]
        repeated.insert(rng.randrange(len(repeated) + 1), copy)
    return repeated


def _split(
    sync: SyncDefinition, data: bytes, state: bytes | None, suppressions: SuppressionSnapshot
) -> tuple[bytes, int]:
    """The one bucket's work lines, with the settled line when `state` is given; and how
    many rows were settled."""
    text = io.BytesIO(data)
    columns, rest = read_header(text, ",")
    identity = columns.index(sync.identity.column)
    splitter = SPEEDUPS.Splitter(len(columns), identity, ",", 1, 1 << 30, identity_key)
    states = StateStore(None, sync.id, "braze", mapping_fingerprint(sync))  # type: ignore[arg-type]
    if state is not None:
        digests = states.decode_text((state, '"etag"'), native=True).digests()
        mapping = native_mapping(sync, RowMapper(sync, columns), suppressions, lambda v: None)
        splitter.use_index(mapping, [digests])
    lines = b""
    for _, ready in feed_splitter(splitter, text, rest, 2):
        lines += b"".join(block for _, block in ready)
    lines += b"".join(block for _, block in splitter.drain())
    settled = splitter.settled()[0] if state is not None else None
    if settled is not None:
        lines += SettledRows("etag", *settled).line()
    return lines, splitter.settled_rows


@pytest.mark.parametrize(
    "configuration", ["boolean-audiences", "array-upsert-nulls", "email-identity", "mirror-array"]
)
@pytest.mark.parametrize("seed", [1, 2])
def test_rows_settled_in_the_split_end_as_the_bucket_would_end_them(
    storage: Any,
    braze: FakeBraze,
    configuration: str,
    seed: int,
) -> None:
    rng = random.Random(seed * 31 + len(configuration))
    document = {**_sync_document(f"settle-{configuration}"), **CONFIGURATIONS[configuration]}
    if configuration == "email-identity":
        document["mode"] = "upsert"  # the fake knows CRM ids only
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    rows = _random_rows(rng, 300)
    known = [f"CRM-{i}" for i in range(0, 330) if rng.random() < 0.8]
    suppressions = _suppressions(rows, rng) if seed == 2 else SuppressionSnapshot({})
    previous: bytes | None = None
    for _ in range(3):  # a first export, then changed ones against the state it left
        data = _csv(_with_repeats(rng, rows))
        whole, _ = _split(sync, data, None, suppressions)
        expected = _run_bucket(storage, braze, sync, whole, previous, native=True, known=known,
                               suppressions=suppressions)  # fmt: skip
        if previous is not None:
            lines, settled = _split(sync, data, previous, suppressions)
            assert 10 < settled <= expected.counts["unchanged"] + expected.counts["suppressed"]
            for native in (True, False):
                outcome = _run_bucket(storage, braze, sync, lines, previous, native=native,
                                      known=known, suppressions=suppressions)  # fmt: skip
                assert outcome.received == expected.received
                assert outcome.counts == expected.counts
                assert outcome.rejects == expected.rejects
                assert outcome.checkpoints == expected.checkpoints
                assert outcome.state == expected.state
        previous = expected.state
        rows = _changed(rng, rows)


def test_a_state_changed_since_the_split_fails_the_bucket(
    storage: Any,
    braze: FakeBraze,
) -> None:
    document = {**_sync_document("settle-conflict"), **CONFIGURATIONS["boolean-audiences"]}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    rows = _random_rows(random.Random(3), 50)
    known = [row[0] for row in rows]
    empty = SuppressionSnapshot({})
    state = _run_bucket(storage, braze, sync, rows, None, native=True, known=known,
                        suppressions=empty).state  # fmt: skip
    lines, settled = _split(sync, _csv(rows), state, empty)
    assert settled
    stale = lines.replace(b'"state_etag":"etag"', b'"state_etag":"other"')
    for native in (True, False):
        with pytest.raises(ConcurrencyConflict):
            _run_bucket(storage, braze, sync, stale, state, native=native, known=known,
                        suppressions=empty)  # fmt: skip


def test_the_index_is_read_only_for_the_snapshot_it_names(storage: Any, unique: str) -> None:
    from core.sync.state import Snapshot, SyncState

    document = {**_sync_document(f"idx{unique}"), **CONFIGURATIONS["boolean-audiences"]}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    states = StateStore(storage, sync.id, "braze", mapping_fingerprint(sync))
    assert states.stored_buckets() == {}
    text = states.snapshot(0, SyncState({}, None, states.fingerprint), run_id="r1", result={}).text
    etag = states.write(Snapshot(0, text, None, b"\x01" * 8, "r1"))
    assert states.stored_buckets() == {0: etag}
    assert states.fetch_index(0, etag, "r2") == b"\x01" * 8
    assert states.fetch_index(0, "another", "r2") is None  # written for another snapshot
    assert states.fetch_index(0, etag, "r1") is None  # by this run: it is being resumed
    other = StateStore(storage, sync.id, "braze", "another mapping")
    assert other.fetch_index(0, etag, "r2") is None
    index = UnchangedIndex(states, sync, SuppressionSnapshot({}), "r2")
    assert index.digests == {0: b"\x01" * 8}
    phone = {**_sync_document(f"idxp{unique}"), **CONFIGURATIONS["phone-identity"]}
    phone_sync = parse_document({"version": 1, "syncs": [phone]}).syncs[0]
    splitter = SPEEDUPS.Splitter(len(FULL_COLUMNS), 8, ",", 1, 1 << 20, identity_key)
    index.sync = phone_sync  # two spellings of one number split apart: never settled
    assert not index.attach(splitter, FULL_COLUMNS, 1)
    stored = states.fetch(0)
    assert stored is not None and gzip.decompress(stored[0]) == text
