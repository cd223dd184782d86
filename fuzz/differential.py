"""The C path of a segment sync held to its Python reference, input by input.

Shared by the tests (tests/test_sync_speedups.py) and the fuzz targets (fuzz/targets.py):
a CSV file split by C and by the reference, a value typed by both, a bucket processed by
both against the same state and suppression list. Each comparison says where the two
differ (`Divergence`); what C leaves to the reference (it punts) is not compared.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from core.destinations.base import BatchResult, Destination, ItemFailure
from core.destinations.braze import BrazeDestination
from core.suppression import SuppressionSnapshot
from core.sync.checkpoints import CheckpointLog
from core.sync.definitions import InputSpec, SyncDefinition, mapping_fingerprint
from core.sync.engine import BucketWork, SegmentChunkRunner
from core.sync.mapping import RowMapper
from core.sync.readers import (
    DECOMPRESSION_ERRORS,
    FileRejected,
    InputLimits,
    RowReader,
    decompressed,
)
from core.sync.reports import RejectsPart
from core.sync.speedups import SPEEDUPS
from core.sync.split import (
    ReferenceNeeded,
    bucket_of,
    feed_splitter,
    identity_key,
    read_header,
    work_line,
)
from core.sync.state import Change, StateStore


class Divergence(AssertionError):
    """C and the reference gave different answers for the same input."""


_TEXT_ERRORS: tuple[type[Exception], ...] = (UnicodeDecodeError, *DECOMPRESSION_ERRORS)
_FILE_ERRORS: tuple[type[Exception], ...] = (FileRejected, *_TEXT_ERRORS)


def same(what: str, native: Any, reference: Any) -> None:
    if native != reference:
        raise Divergence(f"{what}: C {native!r:.400} != reference {reference!r:.400}")


# -- the split ---------------------------------------------------------------------------

SplitOutcome = tuple[str, Any, Any]
"""("split", work lines per bucket, malformed rows), or (rejection code, "", "")."""


def _rejected(exc: BaseException) -> SplitOutcome:
    """The whole-file verdict split_file gives for a reader's exception."""
    if isinstance(exc, FileRejected):
        return (exc.code, "", "")
    if isinstance(exc, UnicodeDecodeError):
        return ("not_utf8", "", "")
    return ("corrupt_compression", "", "")  # OSError, EOFError: split._file_errors


def reference_split(data: bytes, spec: InputSpec, buckets: int, limits: InputLimits) -> Any:
    try:
        reader = RowReader(io.BytesIO(data), spec, [], limits)
        if not reader.columns:
            return ("no_identity", "", "")
        lines: list[list[bytes]] = [[] for _ in range(buckets)]
        malformed = []
        for entry in reader:
            if isinstance(entry, tuple):
                malformed.append(entry)
                continue
            bucket = bucket_of(identity_key(entry.values[0]), buckets)
            lines[bucket].append(work_line(entry) + b"\n")
    except _FILE_ERRORS as exc:
        return _rejected(exc)
    return ("split", lines, malformed)


def native_split(
    data: bytes, spec: InputSpec, buckets: int, limits: InputLimits, chunk: int
) -> Any:
    """What C makes of the file (identity in the first column), or None when it leaves the
    file to the reference."""
    try:
        text = decompressed(io.BytesIO(data))
        columns, rest, header = read_header(text, spec.field_delimiter, limits)
    except ReferenceNeeded:
        return None
    except _FILE_ERRORS as exc:
        return _rejected(exc)
    if not columns:
        return ("no_identity", "", "")
    splitter = SPEEDUPS.Splitter(len(columns), 0, spec.field_delimiter, buckets, 64, identity_key)
    splitter.limits(limits.max_line_bytes, limits.max_field_bytes)
    splitter.line_seed(header)
    lines: list[list[bytes]] = [[] for _ in range(buckets)]
    malformed: list[Any] = []
    try:
        for bad_rows, ready in feed_splitter(splitter, text, rest, 2, read_bytes=chunk):
            malformed += bad_rows
            for bucket, block in ready:
                lines[bucket] += io.BytesIO(block).readlines()
    except ReferenceNeeded:
        return None
    except _TEXT_ERRORS as exc:
        return _rejected(exc)
    for bucket, block in splitter.drain():
        lines[bucket] += io.BytesIO(block).readlines()
    return ("split", lines, malformed)


def compare_split(
    data: bytes, spec: InputSpec, buckets: int, limits: InputLimits, chunks: list[int]
) -> Any:
    """The reference's outcome; C's must be the same wherever C does not punt."""
    expected = reference_split(data, spec, buckets, limits)
    for chunk in chunks:
        got = native_split(data, spec, buckets, limits, chunk)
        if got is not None:
            same(f"split in chunks of {chunk}", got, expected)
    return expected


# -- one value ---------------------------------------------------------------------------


def compare_value(kind: int, limit: int, text: str, reference: Callable[[str], Any]) -> None:
    """A value C types (not left to the reference) is typed exactly as the reference types
    it: its JSON, its state hash, its text."""
    fast = SPEEDUPS.typed(kind, limit, text)
    if fast is None:
        return
    try:
        expected = reference(text)
    except Exception as exc:
        raise Divergence(f"C typed {text!r}, the reference refuses it: {exc}") from None
    if expected is None or fast[:2] != expected[:2] or (fast[2] != expected[2] and expected[2]):
        raise Divergence(f"{text!r}: C {fast!r} != reference {expected!r}")


# -- one bucket --------------------------------------------------------------------------


@dataclass
class BucketOutcome:
    sent: list[Any]
    counts: dict[str, int]
    rejects: list[tuple[Any, ...]]
    state: bytes
    checkpoints: list[dict[str, list[Any]]] = field(default_factory=list)
    rejects_text: bytes = b""
    """The rejects file part's lines as written."""
    exclusions: list[Any] = field(default_factory=list)
    """The rows kept back, for the audit trail, in order."""


class CheckpointsKept(CheckpointLog):
    """Kept in memory: the batches acknowledged in one run."""

    def __init__(self) -> None:
        self.records: list[dict[str, list[Any]]] = []

    def load(self, run_id: str) -> dict[str, list[Any]]:
        return {}

    def record(self, run_id: str, key: str, items: dict[str, list[Any]]) -> None:
        self.records.append(items)


class RejectsKept(RejectsPart):
    """Writes the rejects file part as usual (kept in memory below 1 MB), and keeps what it
    was given and wrote."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.added: list[tuple[Any, ...]] = []
        self.text = b""

    def add(self, line: int, code: str, message: str, values: Any, raw: str | None = None) -> None:
        self.added.append((line, code, message, list(values), raw))
        super().add(line, code, message, values, raw)

    def add_texts(self, rejects: list[tuple[int, str, str, list[str], str | None]]) -> None:
        self.added += [(line, code, message, list(values), raw)
                       for line, code, message, values, raw in rejects]  # fmt: skip
        super().add_texts(rejects)

    def write(self, data: bytes, rows: int = 1) -> None:
        self.text += data
        super().write(data, rows)


class AcceptingDestination:
    """Braze's wire format, every object of every batch acknowledged (or, with
    `unmatched_one_in`, about one in that many answered as a profile Braze does not know,
    chosen by the object's bytes), in memory: what the sync engine sends is the comparison
    here, not a destination's answers."""

    name = "braze"
    capabilities = BrazeDestination.capabilities
    max_in_flight = 1  # `sent` is in the order of sending

    def __init__(
        self, batch_size: int = 7, max_body_bytes: int = 2500, unmatched_one_in: int = 0
    ) -> None:
        self.max_batch_objects = batch_size
        self.max_body_bytes = max_body_bytes
        self._braze = BrazeDestination("http://unused.invalid", "unused", batch_size=batch_size)
        self._unmatched = unmatched_one_in
        self.sent: list[Any] = []

    def item(self, sync: SyncDefinition, identity: str, change: Change) -> dict[str, Any]:
        return self._braze.item(sync, identity, change)

    def encode(self, item: dict[str, Any]) -> bytes:
        return self._braze.encode(item)

    def close(self) -> None:
        pass

    def send_batch(self, items: list[bytes]) -> BatchResult:
        self.sent += [orjson.loads(item) for item in items]
        if not self._unmatched:
            return BatchResult()
        return BatchResult(failures={
            index: ItemFailure(index, True, "user not found")
            for index, item in enumerate(items) if zlib.crc32(item) % self._unmatched == 0
        })  # fmt: skip


def run_bucket(
    storage: Any,
    sync: SyncDefinition,
    columns: list[str],
    lines: bytes,
    previous: bytes | None,
    destination: Destination,
    sent: Callable[[], list[Any]],
    *,
    native: bool,
    suppressions: SuppressionSnapshot,
) -> BucketOutcome:
    """One bucket's work lines against a state (`previous`: its text) on one path."""
    states = StateStore(storage, sync.id, "braze", mapping_fingerprint(sync))
    stored = None if previous is None else (gzip.compress(previous), "etag", None)
    state = states.decode(stored, native=native)
    rejects = RejectsKept(storage.blobs, sync.id, f"run-{native}", columns, part=1,
                          delimiter=sync.input.field_delimiter)  # fmt: skip
    checkpoints = CheckpointsKept()
    done: list[bytes] = []
    runner = SegmentChunkRunner(
        storage, sync, RowMapper(sync, columns), destination, suppressions,
        run_id="r", worker="w", checkpoints=checkpoints, native=native,
        on_bucket_done=lambda work: done.append(
            states.snapshot(0, work.state, run_id="r", result={}).text
        ),
    )  # fmt: skip
    if (runner.native is not None) != native:
        raise Divergence(f"the mapping was {'not ' if native else ''}compiled for C")
    work = BucketWork(0, state, rejects)
    runner.run_bucket(work, lines)
    runner.finish()
    if len(done) != 1:
        raise Divergence(f"the bucket was done {len(done)} times")
    return BucketOutcome(
        sent(), work.counts.as_dict(), rejects.added, done[0], checkpoints.records, rejects.text,
        sorted(work.exclusions, key=repr),
    )  # fmt: skip


def compare_buckets(native: BucketOutcome, reference: BucketOutcome) -> BucketOutcome:
    """They must agree in every respect: the objects sent, counts, rejects (as given and as
    written), checkpoints, the state's bytes, the rows kept back."""
    same("objects sent", native.sent, reference.sent)
    same("counts", native.counts, reference.counts)
    same("rejects", native.rejects, reference.rejects)
    same("rejects written", native.rejects_text, reference.rejects_text)
    same("checkpoints", native.checkpoints, reference.checkpoints)
    same("state", native.state, reference.state)
    same("exclusions", native.exclusions, reference.exclusions)
    return native
