"""Fuzz targets: each takes the fuzzer's bytes, reads them as one structured input, and
runs the native code and its Python reference on it (fuzz/differential.py).

A target raises `Divergence` when the two disagree; any other exception escaping it, or
a sanitizer report, is a bug too. Bytes are read structurally (a few bytes choose the
settings, the rest is the input), so that a coverage-guided fuzzer's small changes stay
small changes of the input. Targets do not import the fuzzer: `python -m fuzz --replay`
and the tests run them on the committed corpus without it.
"""

from __future__ import annotations

import functools
import gzip
import io
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import xxhash

from core.errors import CorruptState
from core.events.model import EventType
from core.export.quarantine import address_key, with_errors_key
from core.export.xdm import NotableEvents, SegmentLines, XdmOptions, segment_lines
from core.storage import Storage
from core.storage.connection import parse_connection_string
from core.suppression import Channel, Reason, SuppressionSnapshot, address_hash
from core.sync.definitions import FieldMapping, InputSpec
from core.sync.mapping import RowMapper, coercer
from core.sync.native import _coercer, native_mapping
from core.sync.readers import InputLimits, RowReader
from core.sync.speedups import SPEEDUPS
from core.sync.split import ReferenceNeeded, feed_splitter, identity_key, work_line
from core.sync.state import raw_digest
from fuzz.differential import (
    AcceptingDestination,
    BucketOutcome,
    Divergence,
    compare_buckets,
    compare_split,
    compare_value,
    run_bucket,
)
from fuzz.syncs import CONFIGURATIONS, FULL_COLUMNS, POOLS, TYPICAL, configured_sync


class _Bytes:
    """The fuzzer's bytes, read front to back; past the end, zeros and empty text."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def byte(self) -> int:
        value = self.data[self.at] if self.at < len(self.data) else 0
        self.at += 1
        return value

    def pick(self, options: list[Any] | tuple[Any, ...]) -> Any:
        return options[self.byte() % len(options)]

    def text(self, most: int) -> str:
        size = self.byte() % (most + 1)
        piece = self.data[self.at : self.at + size]
        self.at += size
        return piece.decode("utf-8", "replace")

    def rest(self) -> bytes:
        piece = self.data[self.at :]
        self.at = len(self.data)
        return piece


# -- the CSV splitter --------------------------------------------------------------------

_DELIMITERS = [",", "\t", ";", "|"]
_LIMITS = [InputLimits(64, 32), InputLimits(300, 120), InputLimits(4096, 1024),
           InputLimits(1 << 20, 1 << 20)]  # fmt: skip
_CHUNKS = [[1, 5], [3, 64], [7, 1 << 20], [1 << 20]]


def split(data: bytes) -> None:
    """A CSV or TSV file (header included), split into 8 buckets by C, in chunks of a few
    sizes, and by the reference: the same work lines, malformed rows and verdicts."""
    taken = _Bytes(data)
    spec = InputSpec(delimiter=taken.pick(_DELIMITERS))
    limits, chunks = taken.pick(_LIMITS), taken.pick(_CHUNKS)
    compare_split(taken.rest(), spec, 8, limits, chunks)


# -- one value ---------------------------------------------------------------------------

_KINDS: dict[int, dict[str, Any]] = {
    0: {"target": "nick", "max_length": 12, "whitespace": "trim"}, 1: {"target": "email"},
    2: {"target": "phone"}, 3: {"target": "n", "type": "integer"},
    4: {"target": "n", "type": "float"}, 5: {"target": "n", "type": "decimal"},
    6: {"target": "n", "type": "boolean"}, 7: {"target": "n", "type": "date"},
    8: {"target": "dob", "type": "date"}, 9: {"target": "n", "type": "datetime"},
    10: {"target": "n", "type": "array"}, 12: {"target": "nick", "max_length": 12},
}  # fmt: skip


@functools.cache
def _reference(kind: int) -> Callable[[str], Any]:
    return _coercer(coercer(FieldMapping(source="column", **_KINDS[kind])), "column")


def value(data: bytes) -> None:
    """One value of one kind: what C types (not left to the reference), it types exactly
    as the reference does."""
    taken = _Bytes(data)
    kind = taken.pick(sorted(_KINDS))
    limit = datetime.now(UTC).year if kind == 8 else 12 if kind in (0, 12) else 255
    text = taken.rest().decode("utf-8", "replace")
    if text.strip():  # empty values never reach a coercer
        compare_value(kind, limit, text, _reference(kind))


# -- one bucket, twice -------------------------------------------------------------------


@functools.cache
def _storage() -> Storage:
    """Clients never asked to make a request: a bucket's state and rejects stay in memory."""
    return Storage(parse_connection_string("UseDevelopmentStorage=true"))


def _rows(taken: _Bytes, count: int, start: int) -> list[list[str]]:
    """Rows of FULL_COLUMNS: each value typical, from its pool, or the fuzzer's own text."""
    rows = []
    for i in range(start, start + count):
        row = [f"CRM-{taken.byte() % 40}"]
        for column in FULL_COLUMNS[1:]:
            pool = "status" if column.startswith("segmentMembership") else column
            choice = taken.byte()
            if choice < 160:
                template = TYPICAL[pool]
            elif choice < 240:
                template = POOLS[pool][choice % len(POOLS[pool])]
            else:
                template = taken.text(24)
            row.append(template.replace("{i:07d}", f"{i:07d}").replace("{i:04d}", f"{i:04d}")
                       .replace("{i}", str(i)).replace("{d}", str(i % 9)))  # fmt: skip
        rows.append(row)
    return rows


def _lines(rows: list[list[str]]) -> bytes:
    return b"".join(orjson.dumps([n + 2, *row]) + b"\n" for n, row in enumerate(rows))


def _both(
    sync: Any, lines: bytes, previous: bytes | None, suppressions: Any, unmatched_one_in: int = 0
) -> BucketOutcome:
    outcomes = []
    for native in (True, False):
        destination = AcceptingDestination(unmatched_one_in=unmatched_one_in)
        outcomes.append(run_bucket(
            _storage(), sync, FULL_COLUMNS, lines, previous, destination,
            destination.sent.copy, native=native, suppressions=suppressions,
        ))  # fmt: skip
    return compare_buckets(*outcomes)


def bucket(data: bytes) -> None:
    """A bucket of rows in one sync configuration, processed by C and by the reference;
    then its next export (some rows changed) against the state the first run left."""
    taken = _Bytes(data)
    configuration = taken.pick(sorted(CONFIGURATIONS))
    sync = configured_sync(f"fuzz-{configuration}", configuration)
    rows = _rows(taken, 1 + taken.byte() % 12, 0)
    suppressed = {address_hash(row[1].strip().lower()) for row in rows if taken.byte() > 200}
    suppressions = SuppressionSnapshot(
        {Channel.EMAIL: dict.fromkeys(suppressed, Reason.HARD_BOUNCE)} if suppressed else {}
    )
    first = _both(sync, _lines(rows), None, suppressions)
    changed = [list(row) for row in rows]
    for _ in range(taken.byte() % 4):
        row, column = taken.byte() % len(changed), 1 + taken.byte() % (len(FULL_COLUMNS) - 1)
        changed[row][column] = _rows(taken, 1, row)[0][column]
    # The next run's destination does not know some profiles (update_only: unmatched).
    _both(
        sync, _lines(changed + _rows(taken, taken.byte() % 3, 50)), first.state, suppressions,
        unmatched_one_in=taken.byte() % 4,
    )  # fmt: skip


# -- stored state ------------------------------------------------------------------------

_STATE_ROWS = _lines([
    [f"CRM-{n}", *(TYPICAL[c if not c.startswith("segmentMembership") else "status"]
                   for c in FULL_COLUMNS[1:])]
    for n in range(6)
]).replace(b"{i}", b"1").replace(b"{d}", b"1").replace(b"{i:07d}", b"0000001")  # fmt: skip


def state(data: bytes) -> None:
    """A bucket's stored state as read back from storage, corrupt or truncated: C and the
    reference both refuse it (alike) or both read it, and then process the same rows
    against it alike."""
    sync = configured_sync("fuzz-state", "boolean-audiences")
    text = data
    if data[:2] == b"\x1f\x8b":  # stored compressed: as StateStore.inflate reads it
        try:
            text = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return  # a corrupt compressed state fails its inflate, on both paths alike
    outcomes: list[Any] = []
    for native in (True, False):
        destination = AcceptingDestination()
        try:
            outcomes.append(run_bucket(
                _storage(), sync, FULL_COLUMNS, _STATE_ROWS, text, destination,
                destination.sent.copy, native=native,
                suppressions=SuppressionSnapshot({}),
            ))  # fmt: skip
        except Divergence:
            raise
        except (CorruptState, ValueError, KeyError, TypeError, IndexError, OverflowError) as error:
            outcomes.append(type(error).__name__)
    if isinstance(outcomes[0], BucketOutcome) and isinstance(outcomes[1], BucketOutcome):
        compare_buckets(*outcomes)
    elif outcomes[0] != outcomes[1]:
        raise Divergence(f"stored state: C {outcomes[0]!r:.200} != reference {outcomes[1]!r:.200}")


# -- the last run's line index -----------------------------------------------------------


def _digests(rows: list[list[str]], mapper: Any) -> list[bytes]:
    return [raw_digest(mapper.digest_values(row)) for row in rows]


def lines(data: bytes) -> None:
    """A CSV split by C with the digest index and line index a last run left, as read back
    from storage (any bytes: real entries of the file's rows among corrupt ones). Every
    row is either settled, with a digest its bucket's index holds, or goes to its bucket
    with the work line the reference writes for it."""
    taken = _Bytes(data)
    sync = configured_sync("fuzz-lines", "boolean-audiences")
    rows = _rows(taken, 1 + taken.byte() % 16, 0)
    header = ",".join(FULL_COLUMNS).encode()
    csv_text = header + b"\n" + b"".join(
        ",".join('"' + v.replace('"', '""') + '"' if set(v) & set(',"\r\n') else v for v in row)
        .encode() + b"\n"
        for row in rows
    )  # fmt: skip
    mapper = RowMapper(sync, FULL_COLUMNS)
    mapping = native_mapping(sync, mapper, SuppressionSnapshot({}), lambda values: None)
    digests = _digests(rows, mapper)
    buckets = 8
    chosen: list[set[bytes]] = [set() for _ in range(buckets)]
    for digest in digests:
        if taken.byte() > 90:
            chosen[taken.byte() % buckets].add(digest)
    for _ in range(taken.byte() % 6):
        chosen[taken.byte() % buckets].add(bytes(taken.byte() for _ in range(8)))
    index = [
        (b"".join(sorted(found)), b"") if found or taken.byte() > 128 else None for found in chosen
    ]
    seed = xxhash.xxh64_intdigest(header)
    entries = bytearray()
    for row, digest in zip(rows, digests, strict=True):
        if taken.byte() > 60:
            line = csv_text.split(b"\n")[1 + rows.index(row)]
            key = xxhash.xxh64_intdigest(row[0].strip().lower().encode())
            entries += xxhash.xxh64_intdigest(line, seed=seed).to_bytes(8, "big") + digest
            entries += key.to_bytes(8, "big")
    entries += taken.rest()[: 24 * 8]
    entries = entries[: len(entries) - len(entries) % 24]
    splitter = SPEEDUPS.Splitter(len(FULL_COLUMNS), 0, ",", buckets, 64, identity_key)
    splitter.use_index(mapping, index, b"")
    splitter.lines_begin(len(entries) // 24)
    splitter.lines_add(bytes(entries))
    splitter.line_seed(header)
    work: list[bytes] = []
    try:
        for _, ready in feed_splitter(splitter, io.BytesIO(b""), csv_text[len(header) + 1 :], 2):
            work += [line for _, block in ready for line in io.BytesIO(block).readlines()]
    except ReferenceNeeded:
        return
    work += [line for _, block in splitter.drain() for line in io.BytesIO(block).readlines()]
    settled = splitter.settled()
    expected = {orjson.loads(w)[0]: w for w in _reference_work(csv_text)}
    for line in work:
        if expected.get(orjson.loads(line)[0]) != line:
            raise Divergence(f"line index: C wrote {line!r:.300}")
    held = [set() if item is None else {item[0][i : i + 8] for i in range(0, len(item[0]), 8)}
            for item in index]  # fmt: skip
    settled_rows = 0
    for bucket, found in enumerate(settled):
        if found is None:
            continue
        for i in range(0, len(found[0]), 8):
            if found[0][i : i + 8] not in held[bucket]:
                raise Divergence(f"bucket {bucket} settled a digest its index does not hold")
        settled_rows += found[2] + sum(found[3].values())
    if settled_rows + len(work) != len(rows) or sum(splitter.counts()) != len(work):
        raise Divergence(f"line index: {settled_rows} settled + {len(work)} work != {len(rows)}")


def _reference_work(csv_text: bytes) -> list[bytes]:
    reader = RowReader(io.BytesIO(csv_text), InputSpec(), [])
    return [work_line(row) + b"\n" for row in reader if not isinstance(row, tuple)]


# -- the log export's records ------------------------------------------------------------

_OPTIONS = XdmOptions("switchboard", "crmId")
_NOTABLE = NotableEvents(
    frozenset({EventType.BOUNCED_HARD, EventType.BOUNCED_SOFT, EventType.UNSUBSCRIBED}),
    frozenset(with_errors_key("email", address_key(a)) for a in ("a@b.example", "e1")),
)


def export(data: bytes) -> None:
    """Stored events (JSON Lines, any bytes) to broadLog and trackingLog records, by C and
    by the reference, in slices: the same records, offsets, or the same exception type."""
    taken = _Bytes(data)
    slice_size = 1 + taken.byte() % 8
    lines = taken.rest()
    outcomes: list[SegmentLines | str] = []
    for native in (True, False):
        try:
            outcomes.append(segment_lines(lines, 0, slice_size, "2026-11-24T08:00:00.000Z",
                                          _OPTIONS, _NOTABLE, native=native))  # fmt: skip
        except Exception as error:
            outcomes.append(type(error).__name__)
    if outcomes[0] != outcomes[1]:
        raise Divergence(f"export records: C {outcomes[0]!r:.300} != {outcomes[1]!r:.300}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "split": split,
    "value": value,
    "bucket": bucket,
    "state": state,
    "export": export,
    "lines": lines,
}


def each_seed(folder: Any) -> Iterator[tuple[str, bytes]]:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            yield path.name, path.read_bytes()
