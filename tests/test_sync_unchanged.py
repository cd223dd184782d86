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
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from core.errors import ConcurrencyConflict
from core.suppression import SuppressionSnapshot
from core.sync import state_codec
from core.sync.definitions import SyncDefinition, mapping_fingerprint, parse_document
from core.sync.mapping import RowMapper
from core.sync.native import native_mapping
from core.sync.speedups import SPEEDUPS
from core.sync.split import feed_splitter, identity_key, read_header
from core.sync.state import Snapshot, StateStore
from core.sync.state_codec import TableIndex
from core.sync.unchanged import SettledRows, UnchangedIndex
from devhost.fakes.braze import FakeBraze
from fuzz.syncs import CONFIGURATIONS, FULL_COLUMNS
from fuzz.syncs import sync_document as _sync_document
from tests.test_sync_speedups import _changed, _random_rows, _run_bucket, _scenario

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


@dataclass
class _Split:
    lines: bytes
    """The bucket's work lines, with the settled line when a state was given."""
    settled: int
    by_line: int
    """Of the settled rows, those settled from their line's hash."""
    line_index: bytes
    """This file's line index entries, for the next run."""


def _split(
    sync: SyncDefinition, data: bytes, state: bytes | None, suppressions: SuppressionSnapshot,
    line_index: bytes = b"",
) -> _Split:  # fmt: skip
    """The one bucket's split: settled against `state` (its digests, and the last run's
    `line_index`) when it is given."""
    text = io.BytesIO(data)
    columns, rest, header = read_header(text, ",")
    identity = columns.index(sync.identity.column)
    splitter = SPEEDUPS.Splitter(len(columns), identity, ",", 1, 1 << 30, identity_key)
    splitter.line_seed(header)
    states = StateStore(None, sync.id, "braze", mapping_fingerprint(sync))  # type: ignore[arg-type]
    mapping = native_mapping(sync, RowMapper(sync, columns), suppressions, lambda v: None)
    if state is not None:
        loaded = states.decode_text((state, '"etag"', None), native=True)
        # As the snapshot's index was written: with the rows it held back.
        index = (loaded.index()[0], b"".join(sorted(set(loaded.withheld.values()))))
        splitter.use_index(mapping, [index], line_index)
    if sync.identity.destination_key != "phone":  # phone identities are not settled
        splitter.record_lines(mapping, True)
    lines = recorded = b""
    for _, ready in feed_splitter(splitter, text, rest, 2):
        lines += b"".join(block for _, block in ready)
        recorded += splitter.take_lines()
    lines += b"".join(block for _, block in splitter.drain())
    recorded += splitter.take_lines()
    settled = splitter.settled()[0] if state is not None else None
    if settled is not None:
        lines += SettledRows("etag", *settled).line()
    return _Split(lines, splitter.settled_rows, splitter.settled_by_line, recorded)


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
    # The fake knows CRM ids only: e-mail identities are acknowledged when upserted.
    mode = {"mode": "upsert"} if configuration == "email-identity" else {}
    given = _scenario(f"settle-{configuration}", configuration, rng, suppressed=seed == 2, **mode)
    sync, rows, known, suppressions = given.sync, given.rows, given.known, given.suppressions
    previous: bytes | None = None
    previous_lines = b""
    for _ in range(3):  # a first export, then changed ones against the state it left
        data = _csv(_with_repeats(rng, rows))
        whole = _split(sync, data, None, suppressions)
        expected = _run_bucket(storage, braze, sync, whole.lines, previous, native=True,
                               known=known, suppressions=suppressions)  # fmt: skip
        for line_index in (b"", previous_lines) if previous is not None else ():
            split = _split(sync, data, previous, suppressions, line_index)
            unchanged = expected.counts["unchanged"] + expected.counts["suppressed"]
            assert 10 < split.settled <= unchanged
            # The last run's lines settle most rows unparsed; the others are parsed.
            assert split.by_line > split.settled // 2 if line_index else split.by_line == 0
            carried = SettledRows.take(split.lines)[1]
            assert carried is not None
            if sync.consent is not None:  # rows held back for lack of consent, settled again
                assert carried.withheld and carried.reasons["suppressed.no_consent"]
            for native in (True, False):
                outcome = _run_bucket(
                    storage, braze, sync, split.lines, previous, native=native, known=known,
                    suppressions=suppressions,
                )  # fmt: skip
                assert outcome.sent == expected.sent
                assert outcome.counts == expected.counts
                assert outcome.rejects == expected.rejects
                assert outcome.checkpoints == expected.checkpoints
                assert outcome.state == expected.state
        previous, previous_lines = expected.state, whole.line_index
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
    split = _split(sync, _csv(rows), state, empty)
    assert split.settled
    work, carried = SettledRows.take(split.lines)
    assert carried is not None
    carried.state_etag = "other"
    stale = work + carried.line()
    for native in (True, False):
        with pytest.raises(ConcurrencyConflict):
            _run_bucket(storage, braze, sync, stale, state, native=native, known=known,
                        suppressions=empty)  # fmt: skip


def test_the_index_is_read_only_for_the_snapshot_it_names(storage: Any, unique: str) -> None:
    from core.sync.state import SyncState

    document = {**_sync_document(f"idx{unique}"), **CONFIGURATIONS["boolean-audiences"]}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    states = StateStore(storage, sync.id, "braze", mapping_fingerprint(sync))
    assert states.stored_buckets() == {}
    empty = SyncState({}, None, states.fingerprint)
    text = states.snapshot(0, empty, run_id="r1", result={}).text
    index = (b"\x01" * 8, b"\x02" * 8)
    etag = states.write(Snapshot.of(0, text, None, index))
    writer = states.index_writer("r1")
    writer.add(0, etag, index)
    writer.add(1, "of a bucket not stored", (b"", b"\x03" * 8))
    writer.close()
    assert {b: stored.etag for b, stored in states.stored_buckets().items()} == {0: etag}
    assert states.indexes({0: etag}, "r2") == {0: index}
    assert states.indexes({0: "another"}, "r2") == {}  # written for another snapshot
    assert states.indexes({0: etag}, "r1") == {}  # by this run: it is being resumed
    assert StateStore(storage, sync.id, "braze", "another mapping").indexes({0: etag}, "r2") == {}
    files = list(storage.blobs.list("sync-state", f"{sync.id}/braze/digests/"))
    assert len(files) == 1  # stale, but kept: less than an hour old
    found = UnchangedIndex(states, sync, SuppressionSnapshot({}), "r2")
    assert found.digests == {0: index}
    phone = {**_sync_document(f"idxp{unique}"), **CONFIGURATIONS["phone-identity"]}
    splitter = SPEEDUPS.Splitter(len(FULL_COLUMNS), 8, ",", 1, 1 << 20, identity_key)
    found.sync = parse_document({"version": 1, "syncs": [phone]}).syncs[0]
    assert not found.attach(splitter, FULL_COLUMNS, 1)  # two spellings of a number differ
    stored = states.fetch(0)
    assert stored is not None and state_codec.decompress(stored[0]) == text


def _run_stored(
    storage: Any, braze: FakeBraze, sync: SyncDefinition, rows: list[list[str]],
    destination: str, *, native: bool, known: list[str], run_id: str,
) -> tuple[dict[str, int], list[dict[str, Any]], bytes, Any]:  # fmt: skip
    """A bucket loaded from and written to Azurite; its counts, what Braze received, the
    stored snapshot's text and its layout."""
    from core.destinations.braze import BrazeDestination
    from core.sync.engine import BucketWork, SegmentChunkRunner
    from core.sync.reports import RejectsPart

    braze.reset(known)
    states = StateStore(storage, sync.id, destination, mapping_fingerprint(sync))
    state = states.load(0, native=native)
    client = BrazeDestination(braze.url, "fake-braze-key", requests_per_second=1e6)
    runner = SegmentChunkRunner(
        storage, sync, RowMapper(sync, FULL_COLUMNS), client, SuppressionSnapshot({}),
        run_id=run_id, worker="w", native=native,
        on_bucket_done=lambda work: states.write(
            states.snapshot(0, work.state, run_id=run_id, result={})
        ),
    )  # fmt: skip
    work = BucketWork(0, state, RejectsPart(storage.blobs, sync.id, run_id, FULL_COLUMNS, part=1))
    runner.run_bucket(work, _split(sync, _csv(rows), None, SuppressionSnapshot({})).lines)
    runner.finish()
    stored = states.inflate(states.fetch(0))
    assert stored is not None
    return work.counts.as_dict(), braze.state.received, stored[0], stored[2]


def test_runs_that_change_few_profiles_append_sections_that_read_back_alike(
    storage: Any, braze: FakeBraze, unique: str
) -> None:
    document = {**_sync_document(f"sections{unique}"), **CONFIGURATIONS["mirror-array"]}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    rng = random.Random(11)
    rows = _random_rows(rng, 400)
    known = [f"CRM-{i}" for i in range(0, 500)]
    layouts = []
    for run in range(8):
        c, py = (
            _run_stored(storage, braze, sync, rows, f"braze-{native}", native=native,
                        known=known, run_id=f"r{run}-{native}")
            for native in (True, False)
        )  # fmt: skip
        assert c[:2] == py[:2]  # counts, objects received
        # The stored text, every section (its headers name the run, which differs):
        assert c[2].replace(b'-True"', b'"') == py[2].replace(b'-False"', b'"')
        assert c[3].sections == py[3].sections
        assert sum(part.text for part in c[3].parts) == len(c[2])  # the parts' text sizes
        layouts.append(c[3].sections)
        states = StateStore(storage, sync.id, "braze-True", mapping_fingerprint(sync))
        whole = [
            states.decode_text((c[2], "e", None), native=flag) for flag in (True, False)
        ]  # fmt: skip
        out = TableIndex(whole[1].tables)
        assert whole[0].native.encode(b"{}") == state_codec.section(
            b"{}",  # one record per profile, the last one
            out.tables,
            (profile.record(identity, out) for identity, profile in whole[1].profiles.items()),
        )
        if run < 6:  # a few profiles change, a few go (mirror mode takes their audiences)
            rows = [list(row) for row in rows if rng.random() > 0.01]
            for row in rng.sample(rows, 4):
                row[3] = f"Changed{run}"
        else:  # all change: the next write rewrites the snapshot
            for row in rows:
                row[3] = "Everyone"
    assert layouts[:4] == [0, 1, 2, 3] and layouts[-1] == 0, layouts


def test_the_index_and_seen_marks_agree_in_c_and_the_reference() -> None:
    rng = random.Random(4)
    digests = [rng.randbytes(8) for _ in range(3000)] + [b"\x00" * 8, b"\xff" * 8]
    digests += digests[:3]  # shared by two profiles: left out of the index
    records = (
        state_codec.record(b'"P-%d"' % number, digest, b"\x00\x00")  # no attributes
        for number, digest in enumerate(digests)
    )
    header = b'{"version":6,"fingerprint":"f","withheld":{"W-1":"0102030405060708"}}'
    text = state_codec.section(header, state_codec.Tables(), records)
    states = StateStore(None, "s", "braze", "f")  # type: ignore[arg-type]
    c, py = (states.decode_text((text, '"e"', None), native=flag) for flag in (True, False))
    assert c.native is not None and py.native is None
    assert c.index() == py.index()
    assert len(c.index()[0]) == 8 * (len(set(digests)) - 3)
    assert c.index()[0] == b"".join(
        sorted(c.index()[0][at : at + 8] for at in range(0, len(c.index()[0]), 8))
    )
    chosen = rng.sample(sorted(set(digests) - set(digests[:3]) - {b"\x00" * 8}), 500)
    settled = (b"".join(chosen) + b"\x00" * 8, bytes.fromhex("0102030405060708"))
    assert c.mark_seen(settled, "e") == set()  # marked in C
    assert len(py.mark_seen(settled, "e")) == 502
    with pytest.raises(ConcurrencyConflict):  # a digest the state does not hold
        c.mark_seen((rng.randbytes(8), b""), "e")


def test_a_large_snapshot_is_compressed_before_its_write_is_queued() -> None:
    small = b'{"version":6}\n' + b"\x01" * 100
    large = small + bytes(range(256)) * 20_000  # over 4 MB
    for text, compressed in ((small, False), (large, True)):
        snapshot = Snapshot.of(3, text, "etag")
        assert snapshot.compressed is compressed and snapshot.text_size == len(text)
        assert snapshot.text == text == state_codec.decompress(snapshot.data)


def test_sections_stored_as_zstandard_frames_or_gzip_members_read_back_in_order() -> None:
    """Sections are Zstandard frames now; a base written as gzip before still reads, with
    the sections appended to it since; a part cut short is an error, never less text."""
    parts = [b"base " * 1000, b"section one", b"section two " * 50]
    stored = gzip.compress(parts[0]) + b"".join(state_codec.compress(p) for p in parts[1:])
    assert state_codec.compress(parts[1]).startswith(b"\x28\xb5\x2f\xfd")  # a zstd frame
    assert state_codec.decompress(stored) == b"".join(parts)
    with pytest.raises(ValueError, match="cut short"):
        state_codec.decompress(stored[:-3])
    lengths = [len(gzip.compress(parts[0]))] + [len(state_codec.compress(p)) for p in parts[1:]]
    assert state_codec.decompress(stored, lengths) == b"".join(parts)  # each part in one call
    damaged = stored[:-3] + b"\x00\x00\x00"
    with pytest.raises(ValueError, match="cut short or damaged"):
        state_codec.decompress(damaged, lengths)
    with pytest.raises(ValueError, match="neither"):
        state_codec.decompress(b"plain text")


def test_a_digest_finds_its_bucket_among_many_before_the_identity_is_hashed() -> None:
    """The splitter looks a row's raw digest up in one directory of every bucket's index;
    the digest covers the identity, so it names the bucket the identity hashes to. A
    digest in two entries is resolved by hashing the identity after all."""
    from core.sync.split import bucket_of
    from core.sync.state import raw_digest

    buckets = 8
    document = {**_sync_document("directory"), **CONFIGURATIONS["boolean-audiences"]}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    rows = [[f"CRM-{i}", *row[1:]] for i, row in enumerate(_random_rows(random.Random(12), 400))]
    mapper = RowMapper(sync, FULL_COLUMNS)
    bucket = {row[0]: bucket_of(identity_key(row[0]), buckets) for row in rows}
    digest = {row[0]: raw_digest(mapper.digest_values(row)) for row in rows}
    profiles: list[set[bytes]] = [set() for _ in range(buckets)]
    withheld: list[set[bytes]] = [set() for _ in range(buckets)]
    for row in rows[:300]:  # the rest are not in any index: they go to their buckets
        profiles[bucket[row[0]]].add(digest[row[0]])
    twice, collided = rows[0][0], rows[1][0]
    withheld[bucket[twice]].add(digest[twice])  # profiles win over rows held back
    other = (bucket[collided] + 1) % buckets
    profiles[other].add(digest[collided])  # as if another bucket's profile collided
    mapping = native_mapping(sync, mapper, SuppressionSnapshot({}), lambda v: None)
    splitter = SPEEDUPS.Splitter(len(FULL_COLUMNS), 0, ",", buckets, 1 << 30, identity_key)
    index = [
        (b"".join(sorted(p)), b"".join(sorted(w))) for p, w in zip(profiles, withheld, strict=True)
    ]
    splitter.use_index(mapping, index, b"")
    text = io.BytesIO(_csv(rows))
    _, rest, _ = read_header(text, ",")
    work: dict[int, bytes] = {}
    for _, ready in feed_splitter(splitter, text, rest, 2):
        for b, block in ready:
            work[b] = work.get(b, b"") + block
    for b, block in splitter.drain():
        work[b] = work.get(b, b"") + block
    assert splitter.settled_rows == 300
    settled = splitter.settled()
    for b in range(buckets):
        expected = sorted(digest[row[0]] for row in rows[:300] if bucket[row[0]] == b)
        found = settled[b][0] if settled[b] is not None else b""
        assert sorted(found[at : at + 8] for at in range(0, len(found), 8)) == expected
        assert settled[b] is None or (settled[b][1] == b"" and settled[b][2] == len(expected))
        sent_on = [orjson.loads(line)[1] for line in work.get(b, b"").splitlines()]
        assert sent_on == [row[0] for row in rows[300:] if bucket[row[0]] == b]
    # settled() ends the split: the splitter has let go of its tables and digests.
    with pytest.raises(ValueError, match="taken already"):
        splitter.settled()
    with pytest.raises(ValueError, match="split is over"):
        splitter.feed(b"CRM-9,x\n", 500, True)


def test_state_read_ahead_during_the_split_leaves_room_for_the_splitters_tables() -> None:
    from core.sync.unchanged import prefetch_bytes

    mb = 1 << 20
    assert prefetch_bytes(0, 0) == 64 * mb  # nothing settled: as much as ever
    assert prefetch_bytes(1_000_000, 1_000_000) == 64 * mb  # a small sync's state, all
    assert 16 * mb < prefetch_bytes(4_000_000, 4_000_000) < 48 * mb
    assert prefetch_bytes(5_000_000, 5_000_000) == 16 * mb
    assert prefetch_bytes(10_000_000, 10_000_000) == 16 * mb  # never less
