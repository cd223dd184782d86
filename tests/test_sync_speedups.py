"""The C path of a segment sync (native/switchboard_sync.c) against its Python reference.

The split must give the same work lines per bucket, and a bucket must give the same
objects to Braze (the fake server, over HTTP), the same counts, rejects and state, for
the same rows and state. The rows mix plain values with every unusual form the mapping
knows: whitespace, non-ASCII text, numbers Python reads and C leaves to it, bad values.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import platform
import random
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import xxhash

from core.destinations.braze import BrazeDestination
from core.suppression import Channel, Reason, SuppressionSnapshot, address_hash
from core.sync import state_codec
from core.sync.definitions import InputSpec, SyncDefinition, mapping_fingerprint, parse_document
from core.sync.mapping import RowMapper
from core.sync.readers import DEFAULT_LIMITS
from core.sync.service import fetched_ahead
from core.sync.speedups import ALLOCATOR_TUNED, SPEEDUPS
from core.sync.split import (
    SplitResult,
    fetch_work_blob,
    inflate_work,
    split_file,
    upload_held_work,
)
from core.sync.state import StateStore
from devhost.fakes.braze import FakeBraze
from fuzz.differential import (
    BucketOutcome,
    compare_buckets,
    compare_split,
    native_split,
    run_bucket,
)
from fuzz.syncs import (
    CONFIGURATIONS,
    FULL_COLUMNS,
    POOLS,
    SEGMENTS,
    TYPICAL,
    configured_sync,
    sync_document,
)

pytestmark = pytest.mark.integration


def test_the_speedups_are_built() -> None:
    assert SPEEDUPS is not None, "native/switchboard_sync.c was not built: pip install ./native"


def test_hashes_match_hashlib_and_xxhash() -> None:
    rng = random.Random(3)
    for length in [*range(0, 300), 1000, 4096]:
        data = rng.randbytes(length)
        assert SPEEDUPS.blake2b(data, 8) == hashlib.blake2b(data, digest_size=8).digest()
        assert SPEEDUPS.xxh64(data) == xxhash.xxh64_digest(data)


# -- the split ----------------------------------------------------------------------------

COLUMNS = ["id", "name", "note", "status"]


def _native_split(data: bytes, buckets: int, chunk: int) -> Any:
    return native_split(data, InputSpec(), buckets, DEFAULT_LIMITS, chunk)


_TEXT = ["Ana", "Müller", "漢字", "😀", "a,b", 'say "hi"', "line\nbreak", "crlf\r\nin", " ", "",
         "\t", "x" * 40]  # fmt: skip


def _random_csv(rng: random.Random, rows: int) -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=rng.choice(["\n", "\r\n"]))
    writer.writerow(COLUMNS)
    for i in range(rows):
        identity = rng.choice([f"ID-{i}", f" Id-{i} ", "İstanbul", "ǅ", "dup", "ß", ""])
        status = rng.choice(["realized", "exited", ""])
        row = [identity, rng.choice(_TEXT), rng.choice(_TEXT), status]
        if rng.random() < 0.03:
            row = row[: rng.randrange(1, 4)]  # too few fields
        if rng.random() < 0.03:
            out.write("\r\n" if rng.random() < 0.5 else "\n")  # a blank line
        if rng.random() < 0.1:
            out.write(",".join('"' + value.replace('"', '""') + '"' for value in row) + "\n")
        else:
            writer.writerow(row)
    return (b"\xef\xbb\xbf" if rng.random() < 0.5 else b"") + out.getvalue().encode()


@pytest.mark.parametrize("seed", range(12))
def test_split_gives_the_reference_lines_in_every_chunking(seed: int) -> None:
    rng = random.Random(seed)
    data = _random_csv(rng, 400)
    chunks = [1, 7, 64, 4096, len(data) + 1]
    expected = compare_split(data, InputSpec(), 16, DEFAULT_LIMITS, chunks)
    assert expected[0] == "split"
    assert _native_split(data, 16, 64) is not None  # C takes these files, it does not punt


@pytest.mark.parametrize(
    "body",
    [
        b'a,"b"c,d,e\n',  # a character after a closing quote
        b"a,b\rc,d\n",  # a lone carriage return
        b"a,b\x00,c,d\n",  # NUL
        b'a,"unterminated,c,d\n',  # the file ends inside quotes
    ],
)
def test_the_splitter_leaves_what_csv_reads_its_own_way_to_the_reference(body: bytes) -> None:
    data = b"id,name,note,status\n" + body
    assert _native_split(data, 4, 1 << 20) is None


def test_split_file_falls_back_to_the_reference_for_such_input(storage: Any, unique: str) -> None:
    sync = parse_document({"version": 1, "syncs": [sync_document(f"s{unique}")]}).syncs[0]
    data = b'id,name,note,status\nA,"x"y,z,realized\nB,b,c,exited\n'
    storage.blobs.create("segments", f"{sync.id}/f.csv", data, overwrite=True)
    blob = storage.blobs.ref("segments", f"{sync.id}/f.csv")
    results = [
        split_file(storage, sync, [blob], run_id=f"r{unique}{native}", buckets=4,
                   in_memory_max_rows=10, held_max_bytes=0, native=native)
        for native in (True, False)
    ]  # fmt: skip
    assert results[0].malformed == results[1].malformed != []
    assert _held_lines(results[0]) == _held_lines(results[1])
    assert results[0].counts == results[1].counts


def _held_lines(split: SplitResult, storage: Any = None) -> list[bytes]:
    """Each bucket's work lines, wherever the split left them (taken from memory)."""
    if split.in_memory is not None:
        return [split.in_memory.take(bucket) for bucket in range(len(split.in_memory))]
    return [
        inflate_work(fetch_work_blob(storage, split.work_blobs[b])) if b in split.work_blobs
        else b""
        for b in range(split.buckets)
    ]  # fmt: skip


@pytest.mark.parametrize("native", [True, False])
def test_work_is_the_same_kept_as_it_is_compressed_in_memory_or_spilled(
    storage: Any, unique: str, native: bool
) -> None:
    """Small files keep their lines as they are; larger ones compressed in memory up to a
    budget; past it (here at once, or halfway through) every bucket spills to a work blob.
    The workers get the same lines every way, and held work uploaded for a fan-out too."""
    sync = parse_document({"version": 1, "syncs": [sync_document(f"h{unique}")]}).syncs[0]
    data = _random_csv(random.Random(3), 40_000)
    storage.blobs.create("segments", f"{sync.id}/f.csv", data, overwrite=True)
    blob = storage.blobs.ref("segments", f"{sync.id}/f.csv")
    ways = {"as is": (10**6, 0), "held": (10, 1 << 30), "spilled": (10, 0), "half": (10, 200_000),
            "uploaded": (10, 1 << 30)}  # fmt: skip
    splits = {
        way: split_file(storage, sync, [blob], run_id=f"r{unique}{native}{i}", buckets=2,
                        in_memory_max_rows=rows, held_max_bytes=held, native=native)
        for i, (way, (rows, held)) in enumerate(ways.items())
    }  # fmt: skip
    assert splits["as is"].in_memory is not None and not splits["as is"].in_memory.compressed
    assert splits["held"].in_memory is not None and splits["held"].in_memory.compressed
    assert splits["spilled"].in_memory is None and splits["half"].in_memory is None
    expected = _held_lines(splits["as is"])
    assert sum(map(len, expected)) > 20_000 and len([b for b in expected if b]) == 2
    for way, split in splits.items():  # what bounds the buckets a worker reads ahead
        assert split.work_bytes == [len(lines) for lines in expected], way
    held = splits["uploaded"].in_memory
    assert held is not None
    # Held in groups, a gzip member each: any gzip reader reads a bucket's work whole.
    assert held.stored(0).count(b"\x1f\x8b\x08") > 1
    assert gzip.decompress(held.stored(0)) == expected[0]
    uploaded = SplitResult(splits["held"].columns, 2)
    uploaded.work_blobs = upload_held_work(storage, f"r{unique}{native}up", held)
    assert _held_lines(uploaded, storage) == expected
    assert held.stored(0) == held.stored(1) == b""  # released once in work blobs
    for way in ("held", "spilled", "half"):
        assert _held_lines(splits[way], storage) == expected, way
    assert splits["held"].counts == splits["half"].counts == splits["as is"].counts


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's thresholds only")
def test_the_allocator_is_tuned_unless_the_environment_tunes_it(monkeypatch: Any) -> None:
    """Importing the sync engine pins glibc's mmap and trim thresholds (buffers of a few MB
    per bucket are given back when freed); an operator's MALLOC_*_THRESHOLD_ wins."""
    assert ALLOCATOR_TUNED
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert SPEEDUPS.tune_allocator(1 << 20, 16 << 20) is False


class _AtOnce(Executor):
    """Runs what is submitted at once, so what was read ahead is known at every step."""

    def __init__(self) -> None:
        self.submitted: list[int] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted.append(args[0])
        done: Future[Any] = Future()
        done.set_result(fn(*args, **kwargs))
        return done


@pytest.mark.parametrize(
    ("size", "ahead"),
    [(1, 3), (6, 1), (20, 0)],  # small: `most` at once; large: one ahead, or none
)
def test_buckets_are_fetched_ahead_up_to_a_count_and_a_size(size: int, ahead: int) -> None:
    """A worker reads the next buckets (state and work) while one runs, but at most four
    of them and only while they are under a size together, whatever their number."""
    pool = _AtOnce()
    taken = []
    for key in fetched_ahead(pool, lambda key: key * 10, list(range(8)), [size] * 8, 4, 10):
        taken.append(key)
        assert pool.submitted == list(range(min(8, len(taken) + ahead)))
    assert taken == [key * 10 for key in range(8)]


# -- a bucket ----------------------------------------------------------------------------


def _value(rng: random.Random, column: str, i: int) -> str:
    pool = "status" if column.startswith("segmentMembership") else column
    template = rng.choice(POOLS[pool]) if rng.random() < 0.25 else TYPICAL[pool]
    for placeholder, text in (("{i:07d}", f"{i:07d}"), ("{i:04d}", f"{i:04d}"), ("{i}", str(i))):
        template = template.replace(placeholder, text)
    return template.replace("{d}", str(i % 9))


def _random_rows(rng: random.Random, count: int, start: int = 0) -> list[list[str]]:
    rows = []
    for i in range(start, start + count):
        row = [_value(rng, column, i) if column != "id" else f"CRM-{i}" for column in FULL_COLUMNS]
        if rng.random() < 0.05:
            row[0] = rng.choice(["", " CRM-7 ", "CRM-3", "x" * 1000, "Ünï-{i}", "\u3000"])
        rows.append(row)
    return rows


def _changed(rng: random.Random, rows: list[list[str]]) -> list[list[str]]:
    """The next export: most rows as they were, some changed, some gone, some new."""
    changed = []
    for number, row in enumerate(rows):
        roll = rng.random()
        if roll < 0.05:
            continue
        if roll < 0.35:
            row = list(row)
            for _ in range(rng.randrange(1, 3)):
                column = rng.randrange(1, len(FULL_COLUMNS))
                row[column] = _value(rng, FULL_COLUMNS[column], number)
        changed.append(row)
    return changed + _random_rows(rng, 20, start=len(rows))


def _run_bucket(
    storage: Any, braze: FakeBraze, sync: SyncDefinition, rows: list[list[str]] | bytes,
    previous: bytes | None, *, native: bool, known: list[str], suppressions: SuppressionSnapshot,
) -> BucketOutcome:  # fmt: skip
    """`rows`: the rows, or the bucket's work lines as the split wrote them; sent to the
    fake Braze over HTTP, which knows the `known` profiles."""
    braze.reset(known)
    lines = rows if isinstance(rows, bytes) else b"".join(
        orjson.dumps([n + 2, *row]) + b"\n" for n, row in enumerate(rows)
    )  # fmt: skip
    destination = BrazeDestination(
        braze.url, "fake-braze-key", batch_size=7, max_body_bytes=2500, requests_per_second=1e6
    )
    return run_bucket(
        storage, sync, FULL_COLUMNS, lines, previous, destination, lambda: braze.state.received,
        native=native, suppressions=suppressions,
    )  # fmt: skip


def _both(
    storage: Any, braze: FakeBraze, sync: SyncDefinition, rows: list[list[str]],
    previous: bytes | None, *, known: list[str], suppressions: SuppressionSnapshot,
) -> BucketOutcome:  # fmt: skip
    """The bucket run in C and on the reference; they must agree in every respect
    (fuzz/differential.py)."""
    native, reference = (
        _run_bucket(storage, braze, sync, rows, previous, native=flag, known=known,
                    suppressions=suppressions)
        for flag in (True, False)
    )  # fmt: skip
    return compare_buckets(native, reference)


def _suppressions(rows: list[list[str]], rng: random.Random) -> SuppressionSnapshot:
    emails = {
        address_hash(row[1].strip().lower()): Reason.HARD_BOUNCE
        for row in rows
        if rng.random() < 0.05
    }
    phones = {address_hash(p): Reason.UNSUBSCRIBE for p in ("+31610000003", "+31610000011")}
    return SuppressionSnapshot({Channel.EMAIL: emails, Channel.PHONE: phones})


@dataclass
class Scenario:
    """A sync of one configuration, its first export, the profiles Braze knows and the
    suppression list (with suppressions when `suppressed`)."""

    sync: SyncDefinition
    rows: list[list[str]]
    known: list[str]
    suppressions: SuppressionSnapshot


def _scenario(
    sync_id: str, configuration: str, rng: random.Random, *, suppressed: bool, **overrides: Any
) -> Scenario:
    document = {**sync_document(sync_id), **CONFIGURATIONS[configuration], **overrides}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    rows = _random_rows(rng, 300)
    known = [f"CRM-{i}" for i in range(0, 330) if rng.random() < 0.8]
    suppressions = _suppressions(rows, rng) if suppressed else SuppressionSnapshot({})
    return Scenario(sync, rows, known, suppressions)


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
@pytest.mark.parametrize("seed", [1, 2])
def test_a_bucket_in_c_gives_what_the_reference_gives(
    storage: Any, braze: FakeBraze, configuration: str, seed: int
) -> None:
    rng = random.Random(seed * 100 + len(configuration))
    given = _scenario(f"native-{configuration}", configuration, rng, suppressed=seed == 2)
    sync, rows, known, suppressions = given.sync, given.rows, given.known, given.suppressions
    previous: bytes | None = None
    for run in range(3):  # a first run, then changed exports against the state it left
        native = _both(storage, braze, sync, rows, previous, known=known,
                       suppressions=suppressions)  # fmt: skip
        assert native.counts["sent"] or configuration.endswith("-identity")  # Braze: ids only
        if configuration.startswith("mirror") and run:
            assert native.counts.get("mirror.removed"), native.counts  # absent profiles
        previous = native.state
        rows = _changed(rng, rows)


def test_a_large_bucket_gives_the_same_and_accounts_for_every_row(
    storage: Any, braze: FakeBraze
) -> None:
    document = {**sync_document("native-large"), **CONFIGURATIONS["boolean-audiences"]}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    rows = _random_rows(random.Random(9), 3000)
    native = _both(storage, braze, sync, rows, None, known=[r[0] for r in rows],
                   suppressions=SuppressionSnapshot({}))  # fmt: skip
    assert native.counts["rows"] == len(rows)
    assert native.counts["sent"] == len(native.sent) > 400


def test_the_mapping_falls_back_for_what_c_does_not_take() -> None:
    from core.sync.native import native_mapping

    colliding = {"fields": [{"source": "email", "target": "audience_vip"}], "audiences": SEGMENTS}
    document = {**sync_document("fallback"), **colliding}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    mapper = RowMapper(sync, FULL_COLUMNS)
    assert native_mapping(sync, mapper, SuppressionSnapshot({}), lambda v: None) is None


# -- single values -------------------------------------------------------------------------

_KIND_MAPPINGS: dict[int, dict[str, Any]] = {
    0: {"target": "nick", "max_length": 12, "whitespace": "trim"}, 1: {"target": "email"},
    2: {"target": "phone"}, 12: {"target": "nick", "max_length": 12},
    3: {"target": "n", "type": "integer"}, 4: {"target": "n", "type": "float"},
    5: {"target": "n", "type": "decimal"}, 6: {"target": "n", "type": "boolean"},
    7: {"target": "n", "type": "date"}, 8: {"target": "dob", "type": "date"},
    9: {"target": "n", "type": "datetime"}, 10: {"target": "n", "type": "array"},
}  # fmt: skip
_PIECES: dict[int, list[str]] = {
    0: ["a", "Z", " ", "\u00a0", "\u3000", "é", "Ã", "©", "\u2122", "漢", "😀", "\t", "\n", '"',
        "\\"],
    1: ["a", "B", "@", ".", "-", "_", " ", "+", "é", "@x.com", "example", "\t"],
    2: ["+", "0", "3", "1", "6", "9", " ", "-", "(", ")", ".", "٣", "x"],
    3: ["0", "1", "7", "9", "-", "+", " ", "_", ".", "e", "٣", "99999999"],
    4: ["0", "1", "5", "9", "-", "+", ".", "e", "E", " ", "_", "inf", "nan", "000"],
    6: ["t", "r", "u", "e", "f", "a", "l", "s", "y", "n", "o", "1", "0", " ", "T", "E"],
    7: ["19", "20", "00", "02", "29", "30", "31", "12", "13", "-", " ", "W", "T"],
    9: ["2026", "-", "01", "02", "29", "T", " ", ":", "10", "23", "59", "60", ".", "123",
        "000", "Z", "+00:00", "+02:00", "5"],
    10: ["a", "b", "|", " ", "||", "[", "]", '"', "é", "\u00a0"],
}  # fmt: skip
_PIECES[5] = _PIECES[4]
_PIECES[8] = _PIECES[7]
_PIECES[12] = _PIECES[0]


def _texts(rng: random.Random, kind: int, count: int) -> Iterator[str]:
    pieces = _PIECES[kind]
    for _ in range(count):
        yield "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12)))
    for _ in range(count if kind in (1, 2) else 0):  # near-valid addresses and numbers
        if kind == 1:
            local = "".join(rng.choice("aB.-_+é ") for _ in range(rng.randrange(0, 6)))
            domain = rng.choice(["x", "Ex.", ".y", ""]) + "." + rng.choice(["com", "", "c"])
            yield f"{rng.choice(['', ' '])}{local}@{domain}"
        else:
            digits = "".join(rng.choice("0123456789 -.()") for _ in range(rng.randrange(4, 20)))
            yield rng.choice(["+", "00", "0", "+0", "+ "]) + digits
    if kind in (7, 8, 9):
        for _ in range(count):  # near-valid dates and times
            year, month, day = rng.randrange(1850, 2200), rng.randrange(0, 14), rng.randrange(0, 33)
            text = f"{year:04d}-{month:02d}-{day:02d}"
            if kind == 9:
                hour, minute, second = (rng.randrange(0, n) for n in (25, 61, 61))
                text += f"T{hour:02d}:{minute:02d}:{second:02d}"
                text += rng.choice(["", "Z", ".123Z", ".000000", "+00:00", ".1Z", "-00:00"])
            yield text


@pytest.mark.parametrize("kind", sorted(_KIND_MAPPINGS))
def test_values_c_types_are_typed_as_the_reference_types_them(kind: int) -> None:
    from core.sync.definitions import FieldMapping
    from core.sync.mapping import RowRejected, coercer
    from core.sync.native import _coercer

    mapping = FieldMapping(source="column", **_KIND_MAPPINGS[kind])
    limit = datetime.now(UTC).year if kind == 8 else mapping.max_length or 255  # dob: this year
    reference = _coercer(coercer(mapping), "column")
    rng = random.Random(kind)
    typed = 0
    for text in _texts(rng, kind, 20_000):
        if not text.strip():
            continue  # empty values never reach a coercer
        fast = SPEEDUPS.typed(kind, limit, text)
        if fast is None:
            continue
        typed += 1
        try:
            expected = reference(text)
        except RowRejected as exc:
            raise AssertionError(f"C took {text!r}, the reference rejects it: {exc}") from None
        assert expected is not None and fast[:2] == expected[:2], text
        assert fast[2] == expected[2] or expected[2] is None, text
    assert typed > 200  # the fast path did take a share of them


def test_rows_run_without_the_gil_so_other_threads_keep_going(storage: Any) -> None:
    """A worker fetches and writes other buckets on threads while C processes one. With
    the interpreter's switch interval set far out, another thread runs during a call only
    if the call gives the GIL up: no timing is measured."""
    import sys
    import threading
    import time

    from core.sync.native import native_mapping

    sync = configured_sync("native-gil", "boolean-audiences")
    rows = [
        [f"CRM-{n}"]
        + [
            TYPICAL[c if not c.startswith("seg") else "status"]
            .replace("{i:07d}", f"{n:07d}")
            .replace("{i}", str(n))
            .replace("{d}", str(n % 9))
            for c in FULL_COLUMNS[1:]
        ]
        for n in range(30_000)
    ]  # fmt: skip  (typical values, distinct ids: no Python)
    lines = b"".join(orjson.dumps([n + 2, *row]) + b"\n" for n, row in enumerate(rows))
    mapping = native_mapping(sync, RowMapper(sync, FULL_COLUMNS), SuppressionSnapshot({}), str)
    ticks, stop = [0], threading.Event()

    def tick() -> None:  # like a thread waiting on storage, then running a little Python
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.0002)

    interval = sys.getswitchinterval()
    ticker = threading.Thread(target=tick)
    ticker.start()
    sys.setswitchinterval(30.0)  # the GIL changes hands only where a thread gives it up
    try:
        before = ticks[0]
        assert SPEEDUPS.State(b"", True).process(mapping, lines, {}) is not None
        during = ticks[0] - before
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        ticker.join()
    assert during > 0  # held throughout, no other thread could have run meanwhile


def _as_json_lines(state: bytes, fingerprint: str, version: int) -> bytes:
    """A format-6 state written as format `version` wrote it (JSON lines, hex hashes)."""
    decoded = StateStore(None, "s", "braze", fingerprint).decode_text((state, "e", None))  # type: ignore[arg-type]
    header = {"version": version, "fingerprint": fingerprint, "run": "r", "result": {}}
    lines = [orjson.dumps(header)]
    for identity, profile in decoded.profiles.items():
        hashes = {name: digest.hex() for name, digest in profile.hashes.items()}
        stored = orjson.dumps([hashes, sorted(profile.audiences)])
        digest = (profile.digest or b"").hex().encode()
        lines.append(b"%s\t%s\t%s" % (digest, orjson.dumps(identity), stored))
    return b"\n".join(lines) + b"\n"


def test_json_line_states_and_repeated_records_give_the_same_results(
    storage: Any, braze: FakeBraze
) -> None:
    """States written before format 6 are read (by the reference, which rewrites them);
    a record repeated in a later section takes the earlier one's place, in C too."""
    document = {**sync_document("native-v3"), **CONFIGURATIONS["boolean-audiences"]}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    rng = random.Random(5)
    rows = _random_rows(rng, 200)
    known = [row[0] for row in rows]
    empty = SuppressionSnapshot({})
    first = _run_bucket(storage, braze, sync, rows, None, native=False, known=known,
                        suppressions=empty)  # fmt: skip
    fingerprint = mapping_fingerprint(sync)
    older = {v: _as_json_lines(first.state, fingerprint, v) for v in (3, 5)}
    last = list(state_codec.sections(first.state))[-1]
    record = next(state_codec.records(first.state, last.records, last.end))
    header = first.state[: first.state.index(b"\n")]
    repeated = first.state + state_codec.section(
        header, last.tables, [first.state[record.start : record.end]]
    )
    states = StateStore(storage, sync.id, "braze", fingerprint)
    assert states.decode_text((repeated, "e", None), native=True).native is not None
    for v in (3, 5):
        text = older[v]
        read = states.decode_text((text, "e", None), native=True)
        assert read.native is None and not read.binary  # C reads format 6 only
        assert set(read.profiles) == set(states.decode_text((first.state, "e", None)).profiles)
    changed = _changed(rng, rows)
    after_5 = None
    for previous in (older[3], older[5], repeated):
        outcome = _both(storage, braze, sync, changed, previous, known=known, suppressions=empty)
        assert state_codec.header_version(outcome.state) == state_codec.FORMAT_VERSION
        if previous is older[5]:
            after_5 = outcome
        if previous is repeated:  # the same profiles and hashes, so the same changes sent
            assert after_5 is not None and outcome.sent == after_5.sent


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        b"\xef\xbb\xbf",
        b"id,id\n1,2\n",
        b"name\nx\n",
        b"id,name\n\xff\n",
        b'"id\n,x\n',
        b'x"y,"a\nb",id\nv,w,1\n',  # a quote inside a header field, a quoted line break
        b"id,name,note,status\r\r\nA,b,c,realized\n",  # a bare CR ends the header line
        b'id,"a"b\nx,\xff\n',  # a header csv reads its own way, then bytes not UTF-8
        gzip.compress(b"id,name,note,status\n" + b"A,b,c,realized\n" * 500)[:-40],  # cut short
    ],
)
def test_split_file_rejects_what_the_reference_rejects_alike(
    storage: Any, unique: str, data: bytes
) -> None:
    from core.sync.readers import FileRejected

    sync = parse_document({"version": 1, "syncs": [sync_document(f"r{unique}")]}).syncs[0]
    storage.blobs.create("segments", f"{sync.id}/f.csv", data, overwrite=True)
    blob = storage.blobs.ref("segments", f"{sync.id}/f.csv")
    outcomes = []
    for native in (True, False):
        try:
            split = split_file(storage, sync, [blob], run_id=f"r{unique}{native}", buckets=4,
                               in_memory_max_rows=10, held_max_bytes=0, native=native)  # fmt: skip
            outcomes.append(("split", _held_lines(split), split.malformed))
        except FileRejected as exc:
            outcomes.append((exc.code, str(exc)))
    assert outcomes[0] == outcomes[1]


def test_held_pieces_span_segments_and_segments_go_once_nothing_in_them_is_held(
    monkeypatch: Any,
) -> None:
    import core.sync.split as split

    monkeypatch.setattr(split, "_SEGMENT_BYTES", 10)
    arena = split._Arena()
    first, second = arena.append(b"0123456789abcdef"), arena.append(b"ghijklmnopqrstu")
    assert [size for _, _, size in first] == [10, 6] and len(second) == 3
    assert arena.read(first) == b"0123456789abcdef" and arena.read(second) == b"ghijklmnopqrstu"
    arena.release(first)  # the first segment held only `first`; the second is shared
    assert arena._segments[0] is None and arena._segments[1] is not None
    assert arena.read(second) == b"ghijklmnopqrstu"
    arena.release(second)
    assert not any(arena._segments)


def test_a_delimiter_of_more_than_one_byte_is_split_by_the_reference(
    storage: Any, unique: str
) -> None:
    document = sync_document(f"d{unique}", input={"delimiter": "\u00a7"})
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    data = "id\u00a7name\nA\u00a7x\nB\u00a7y\n".encode()
    storage.blobs.create("segments", f"{sync.id}/f.csv", data, overwrite=True)
    blob = storage.blobs.ref("segments", f"{sync.id}/f.csv")
    splits = [
        split_file(storage, sync, [blob], run_id=f"r{unique}{native}", buckets=4,
                   in_memory_max_rows=10, held_max_bytes=0, native=native)
        for native in (True, False)
    ]  # fmt: skip
    assert _held_lines(splits[0]) == _held_lines(splits[1])
    assert sum(splits[0].counts) == 2


def test_work_lines_spelled_otherwise_than_orjson_writes_them_go_to_the_reference(
    storage: Any, braze: FakeBraze
) -> None:
    """Identities and digests are compared as the work line's bytes in C: `"\\u0041"` and
    `"A"` are one profile to the reference, so C leaves such lines to it."""
    document = {**sync_document("native-escapes"), **CONFIGURATIONS["boolean-audiences"]}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    rows = _random_rows(random.Random(12), 4)
    plain = [orjson.dumps([n + 2, *row]) for n, row in enumerate(rows)]
    spelled = plain[0].replace(b'"CRM-0"', b'"\\u0043RM-0"')
    slash = plain[1].replace(b'"CRM-1"', b'"CRM\\/1"').replace(b"[3,", b"[10,")
    lines = b"\n".join([*plain, spelled.replace(b"[2,", b"[9,"), slash])
    native = _both(storage, braze, sync, lines + b"\n", None,  # type: ignore[arg-type]
                   known=[r[0] for r in rows], suppressions=SuppressionSnapshot({}))  # fmt: skip
    assert native.counts["rejected.duplicate_identity"] == 1


def test_a_datetime_past_the_calendar_in_utc_rejects_its_row_on_both_paths(
    storage: Any, braze: FakeBraze
) -> None:
    document = {**sync_document("native-overflow"), **CONFIGURATIONS["boolean-audiences"]}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    rows = _random_rows(random.Random(13), 6)
    bought = FULL_COLUMNS.index("bought")
    rows[1][bought] = "9999-12-31T23:59:59-01:00"
    rows[2][bought] = "0001-01-01T00:00:00+01:00"
    native = _both(storage, braze, sync, rows, None, known=[r[0] for r in rows],
                   suppressions=SuppressionSnapshot({}))  # fmt: skip
    assert native.counts["rejected.out_of_range"] == 2


def test_rejected_values_holding_nul_keep_their_own_raw_text(
    storage: Any, braze: FakeBraze
) -> None:
    document = {**sync_document("native-nul"), **CONFIGURATIONS["boolean-audiences"]}
    sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
    rows = _random_rows(random.Random(14), 6)
    points = FULL_COLUMNS.index("points")
    rows[1][points] = "1\x002"
    rows[3][points] = "x\x00y\x00"
    native = _both(storage, braze, sync, rows, None, known=[r[0] for r in rows],
                   suppressions=SuppressionSnapshot({}))  # fmt: skip
    written = list(csv.reader(io.StringIO(native.rejects_text.decode())))
    by_line = {row[0]: row[3] for row in written}
    assert by_line["3"].split(",")[points] == "1\x002"
    assert by_line["5"].split(",")[points] == "x\x00y\x00"


def test_a_long_address_identity_typed_by_the_reference_is_looked_up_where_it_is(
    storage: Any, braze: FakeBraze
) -> None:
    """254 characters of an address can be about 1,000 bytes: C once copied such an
    identity, unchanged since the last run, into a 256-byte buffer on its stack."""
    rng = random.Random(15)
    given = _scenario("native-long-address", "email-identity", rng, suppressed=True)
    rows = given.rows[:20]
    long_address = "\u00fc" * 200 + "@example.com"
    rows[3][1] = long_address
    known = [f"email:{row[1].strip().lower()}" for row in rows]
    outcome = _both(storage, braze, given.sync, rows, None, known=known,
                    suppressions=given.suppressions)  # fmt: skip
    again = _both(storage, braze, given.sync, rows, outcome.state, known=known,
                  suppressions=given.suppressions)  # fmt: skip
    assert again.counts["unchanged"] >= 1 and again.counts["rejected"] == outcome.counts["rejected"]


def test_a_state_processes_alike_whichever_mapping_came_before(storage: Any) -> None:
    """A `State` keeps the tables of the mapping it last processed with; one attached
    after another must not see the other's."""
    from core.sync.native import native_mapping

    rows = _random_rows(random.Random(16), 200)
    lines = b"".join(orjson.dumps([n + 2, *row]) + b"\n" for n, row in enumerate(rows))
    mappings = []
    for name in ("boolean-audiences", "array-upsert-nulls"):
        document = {**sync_document(f"native-attach-{name}"), **CONFIGURATIONS[name]}
        sync = parse_document({"version": 1, "syncs": [document]}).syncs[0]
        mappings.append(
            native_mapping(sync, RowMapper(sync, FULL_COLUMNS), SuppressionSnapshot({}), str)
        )
    alone = [SPEEDUPS.State(b"", True).process(m, lines, {}) for m in mappings]
    shared = SPEEDUPS.State(b"", True)
    first = shared.process(mappings[0], lines, {})
    assert first[:4] == alone[0][:4]
    fresh = SPEEDUPS.State(b"", True)
    fresh.process(mappings[0], lines, {})
    assert fresh.process(mappings[1], lines, {})[:4] == shared.process(mappings[1], lines, {})[:4]


@pytest.mark.parametrize("seed", range(8))
def test_records_and_fields_over_the_limits_end_alike_on_both_paths(
    storage: Any, unique: str, seed: int
) -> None:
    """C leaves a record or field over the limits to the reference, which rejects the file:
    the same verdict (or the same split, when nothing passes them) either way."""
    from core.sync.readers import DEFAULT_LIMITS, FileRejected, InputLimits

    rng = random.Random(seed)
    data = _random_csv(rng, 80)
    if seed % 2:  # a gzip'd file and a line longer than a read
        data = gzip.compress(data + b"L," + b"y" * rng.randrange(10, 3000) + b",n,exited\n")
    limits = InputLimits(rng.choice([48, 90, 200, 5000]), rng.choice([12, 40, 3000]))
    sync = parse_document({"version": 1, "syncs": [sync_document(f"l{unique}")]}).syncs[0]
    storage.blobs.create("segments", f"{sync.id}/f.csv", data, overwrite=True)
    blob = storage.blobs.ref("segments", f"{sync.id}/f.csv")
    outcomes = []
    try:
        for native in (True, False):
            try:
                split = split_file(storage, sync, [blob], run_id=f"r{unique}{native}", buckets=4,
                                   in_memory_max_rows=10_000, held_max_bytes=1 << 20,
                                   native=native, limits=limits)  # fmt: skip
                outcomes.append(("split", _held_lines(split), split.malformed))
            except FileRejected as exc:
                outcomes.append((exc.code, str(exc)))
    finally:
        csv.field_size_limit(DEFAULT_LIMITS.max_field_bytes)
    assert outcomes[0] == outcomes[1]
