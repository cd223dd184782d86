"""Rows settled during the split: the common case of a mostly unchanged export.

A row whose raw values are exactly those its profile's state acknowledged needs nothing
(engine: `unchanged_raw`), and neither does one its bucket held back last time for lack
of consent (`withheld_again`). Each bucket's snapshot has a small index: the sorted raw
digests of both (8 bytes per profile), kept with the snapshot's ETag in the index file of
the run that last loaded it (state.IndexWriter). The C splitter checks every row against
it and settles the rows it can be sure of, counted unchanged or suppressed (by the
suppression list as it is at the split), so they never become work lines and a bucket
with nothing else left is not even loaded. It is sure of a row only when:

- the row's identity key was not split before in this file (a Bloom filter; a false
  "maybe" sends a row on to its bucket), so it is no duplicate and no earlier row of that
  identity is waiting in its bucket;
- its raw digest is one its bucket's snapshot acknowledged, and the snapshot has not
  changed since (the bucket checks the ETag, and fails the run on a change, as a
  conflicting write would);
- its identity is ASCII and its addresses are ones C normalises (else the reference
  decides, in the bucket).

Most such rows are not even parsed: the last run's line index (core/sync/lines.py) gives,
for each of its rows' lines, the raw digest and the identity's Bloom filter key, so a row
whose line hashes as one of those is known without parsing it (parsed after all only to
look its addresses up, when addresses are suppressed). Its entry counts only if its
digest is in a bucket's index: that is what says the row was acknowledged (or held back).

The bucket still marks those identities seen, from the digests that follow its work
(`SettledRows`), so a later row of the same identity is a duplicate and mirror
mode does not take their audiences back; rows held back are held back again. Phone
identities are not settled: two spellings of one number have different identity keys.
Without the C splitter nothing is settled, and the buckets count every row themselves,
to the same totals.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from core.audit import Exclusion, exclusion
from core.errors import StorageError
from core.storage.blobs import BlockStager, BlockWriter
from core.suppression import SuppressionSnapshot
from core.sync.definitions import SyncDefinition
from core.sync.lines import LineIndex
from core.sync.mapping import RowMapper, RowRejected
from core.sync.native import native_mapping
from core.sync.readers import FileRejected
from core.sync.speedups import SPEEDUPS
from core.sync.state import DigestIndex, StateReader, StateStore

log = logging.getLogger(__name__)
_PREFETCH_BYTES = 64 << 20
"""Compressed state read ahead at most while a file is split (about 650,000 profiles')."""
_PREFETCH_MIN_BYTES = 16 << 20
_SPLIT_HOLDS_BYTES = 208 << 20
"""What the split's look-up tables and the state read ahead meanwhile take at most (the
tables, at least `_PREFETCH_MIN_BYTES` less): a small sync's state is all read ahead, a
large one's tables leave less room for it."""
_TABLE_BYTES_PER_DIGEST = 22
"""The splitter's directory (10 bytes), Bloom filter (up to 4) and settled digests (8)."""
_TABLE_BYTES_PER_LINE = 22
"""Its line table: 16-byte slots, at most three quarters full."""


def prefetch_bytes(digests: int, lines: int) -> int:
    """How much state to read ahead while a file is split whose tables take `digests`
    acknowledged profiles' digests and `lines` line index entries."""
    tables = digests * _TABLE_BYTES_PER_DIGEST + lines * _TABLE_BYTES_PER_LINE
    return max(_PREFETCH_MIN_BYTES, min(_PREFETCH_BYTES, _SPLIT_HOLDS_BYTES - tables))


@dataclass
class SettledRows:
    """The rows of one bucket settled during the split, carried in its work's last line."""

    state_etag: str
    digests: bytes
    """Raw digests of the rows settled as unchanged profiles (or suppressed now)."""
    withheld: bytes
    """Raw digests of the rows settled as held back again for lack of consent."""
    unchanged: int
    reasons: dict[str, int]
    """{"suppressed.<reason>": rows}"""

    @property
    def index(self) -> DigestIndex:
        return self.digests, self.withheld

    @property
    def rows(self) -> int:
        return self.unchanged + sum(self.reasons.values())

    def line(self) -> bytes:
        """What follows the bucket's work lines: a line of JSON about it, the digests as
        they are (8 bytes each: base64 cost more than the rest of a settled bucket), then
        the size of all that and `_TRAILER`."""
        about = orjson.dumps({
            "settled": len(self.digests) // 8, "withheld": len(self.withheld) // 8,
            "state_etag": self.state_etag, "unchanged": self.unchanged, "reasons": self.reasons,
        }) + b"\n"  # fmt: skip
        size = len(about) + len(self.digests) + len(self.withheld)
        return about + self.digests + self.withheld + size.to_bytes(8, "big") + _TRAILER

    @classmethod
    def take(cls, lines: bytes) -> tuple[bytes, SettledRows | None]:
        """A bucket's work lines without what `line` added, and what it says."""
        if not lines.endswith(_TRAILER):
            return lines, None
        end = len(lines) - len(_TRAILER) - 8
        start = end - int.from_bytes(lines[end : end + 8], "big")
        about_end = lines.index(b"\n", start) + 1
        about = orjson.loads(lines[start:about_end])
        middle = about_end + 8 * about["settled"]
        settled = cls(
            about["state_etag"], lines[about_end:middle],
            lines[middle : middle + 8 * about["withheld"]], about["unchanged"], about["reasons"],
        )  # fmt: skip
        return lines[:start], settled


def _take_lines(splitter: Any, lines: LineIndex, room: int) -> None:
    """The last line index's entries into the splitter, as they are read (`room` of them
    at most, those of the buckets it settles). The index only saves parsing: if it cannot
    be read to its end, the entries taken so far still hold."""
    try:
        splitter.lines_begin(room)
        for chunk in lines.chunks:
            splitter.lines_add(chunk)
    except StorageError:
        log.warning("the last line index could not be read to its end", exc_info=True)
    finally:
        lines.close()


_TRAILER = b"\nsettled rows\n"
"""Ends a bucket's work when rows of it were settled (work lines end with `]` and a line
break, so it cannot be one)."""


class UnchangedIndex:
    """The digest indexes of one sync's destination state and its last line index, read
    before the split; and where the split writes this file's line index."""

    def __init__(
        self, states: StateStore, sync: SyncDefinition, suppressions: SuppressionSnapshot,
        run_id: str,
    ) -> None:  # fmt: skip
        self.sync = sync
        self.suppressions = suppressions
        self.run_id = run_id
        self._states = states
        self.stored = states.stored_buckets()
        self.etags = {bucket: stored.etag for bucket, stored in self.stored.items()}
        self.reader: StateReader = states.reader(self.stored, sorted(self.stored))
        """The buckets' state, read ahead while the file is split."""
        self._lines = states.line_indexes()
        # The last line index is found (and read ahead, a few chunks) meanwhile; the split
        # takes it once it has built the digests' directory.
        self._finding = ThreadPoolExecutor(1, thread_name_prefix="find-lines")
        self._latest = self._finding.submit(self._lines.latest, run_id)
        try:
            self.digests = states.indexes(self.etags, run_id)
        except BaseException:
            self.stop()
            raise
        self._settling = bool(self.digests)
        """Whether a bucket's index was found: else nothing is settled, and the last line
        index is not read."""
        self._digest_count = sum(len(p) + len(w) for p, w in self.digests.values()) // 8
        self._kept_digests = self._kept_lines = 0
        """Digests and line index entries the split's tables take (`_within_budget`)."""
        self._prefetching = False
        self._stager: BlockStager | None = None
        self._writer: BlockWriter | None = None
        self.on_excluded: Callable[[list[str], list[tuple[str, bytes]]], None] | None = None
        """Where the suppressed rows settled here go (reason, record text): the audit."""

    def attach(self, splitter: Any, columns: list[str], buckets: int) -> bool:
        """Have a switchboard_sync.Splitter settle what it can and keep this file's lines
        for the next run; whether it settles anything."""
        try:
            mapper = RowMapper(self.sync, columns)
        except FileRejected:
            mapper = None  # the buckets report the file's missing columns
        mapping = mapper and native_mapping(self.sync, mapper, self.suppressions, _never_called)
        if mapper is None or mapping is None or mapper.identity_key == "phone":
            self.line_index()
            return False
        lines = LineIndex()
        index = self._within_budget(buckets) if self._settling else []
        settling = self._settling = any(item is not None for item in index)
        if settling:
            splitter.use_index(mapping, index, b"")
            del index  # in the splitter's directory now
            lines = self.line_index()
            _take_lines(splitter, lines, self._kept_lines)
            SPEEDUPS.release_freed()  # the digest indexes read, now in the splitter's tables
        else:
            self.line_index()
        # A delta on top of the last chain: the rows settled by their line are in it.
        delta = settling and lines.extendable
        splitter.record_lines(mapping, not delta)
        self._stager = BlockStager(threads=2, in_flight=4)
        self._writer = self._lines.writer(self.run_id, self._stager, lines.chain if delta else [])
        return settling

    def _within_budget(self, buckets: int) -> list[DigestIndex | None]:
        """Each bucket's digests for the split, from the first bucket on for as long as the
        tables they take (theirs and their share of the last line index's) fit
        `processing.unchanged_lookup_mb`; None for the rest, whose rows their buckets
        settle, more slowly. The digests of those are let go of here."""
        budget = self.sync.processing.unchanged_lookup_mb * (1 << 20)
        entries = self._last_lines().entries
        lines_per_digest = entries / max(1, self._digest_count)
        per_digest = _TABLE_BYTES_PER_DIGEST + _TABLE_BYTES_PER_LINE * lines_per_digest
        index: list[DigestIndex | None] = []
        kept, full = 0, False
        for bucket in range(buckets):
            found = self.digests.pop(bucket, None)
            count = 0 if found is None else (len(found[0]) + len(found[1])) // 8
            full = full or (kept + count) * per_digest > budget
            index.append(None if full else found)
            kept += 0 if full else count
        self.digests = {}
        if full:
            log.info(
                "unchanged rows of %d of %d buckets are settled in the split "
                "(processing.unchanged_lookup_mb); the rest in their buckets",
                sum(item is not None for item in index), buckets,
            )  # fmt: skip
        self._kept_digests = kept
        # Room for the kept buckets' lines (a few more: the share is by digests)
        self._kept_lines = min(entries, int(kept * lines_per_digest * 1.05) + 1024)
        return index

    def _last_lines(self) -> LineIndex:
        """The last run's line index as found (empty if it could not be)."""
        try:
            return self._latest.result()
        except StorageError:
            log.warning("the last line index could not be read", exc_info=True)
            self._latest = Future()
            self._latest.set_result(LineIndex())
            return LineIndex()

    def line_index(self) -> LineIndex:
        """The last run's line index (core/sync/lines.py), its entries read as they are
        taken; from now on the state is read ahead too (the split waits for the indexes,
        the buckets only for the state)."""
        found = self._last_lines()
        self._finding.shutdown()
        if not self._settling:
            found.close()
            found = LineIndex()
        self.prefetch(prefetch_bytes(self._kept_digests, self._kept_lines))
        return found

    def prefetch(self, most: int = _PREFETCH_BYTES) -> None:
        """Read the state ahead from now on (once), `most` bytes of it at a time."""
        if not self._prefetching:
            self._prefetching = True
            self.reader.prefetch(most)

    def stop(self) -> None:
        """Read nothing more (the split is over, or the run is): let go of what was read."""
        self._finding.shutdown(cancel_futures=True)
        if self._latest.done() and not self._latest.cancelled() and not self._latest.exception():
            self._latest.result().close()
        self.reader.stop()

    def keep_lines(self, splitter: Any) -> None:
        """Write the line index entries the splitter has kept so far."""
        if self._writer is not None:
            self._writer.write(splitter.take_lines())

    def take_excluded(self, splitter: Any, columns: list[str]) -> None:
        """Hand the suppressed rows the splitter settled so far to `on_excluded`."""
        found = splitter.excluded()
        if found and self.on_excluded is not None:
            self.on_excluded(columns, found)

    def commit_lines(self) -> None:
        """The file is split: its line index is the one the next run reads."""
        if self._writer is not None and self._stager is not None:
            try:
                self._writer.close()
            finally:
                self._stager.close()
                self._writer = self._stager = None

    def abandon_lines(self) -> None:
        """The split did not finish (the file was rejected, or split by the reference)."""
        if self._stager is not None:
            self._stager.close()
        self._writer = self._stager = None

    def settled(self, splitter: Any) -> dict[int, SettledRows]:
        """Each bucket's settled rows, after the whole file was split."""
        return {
            bucket: SettledRows(self.etags[bucket], *entry)
            for bucket, entry in enumerate(splitter.settled())
            if entry is not None
        }


def settled_exclusions(
    sync: SyncDefinition, columns: list[str], found: list[tuple[str, bytes]]
) -> list[Exclusion]:
    """The suppressed rows the split settled (reason, record text) as audit exclusions."""
    mapper = RowMapper(sync, columns)
    delimiter = sync.input.field_delimiter
    exclusions = []
    for reason, text in found:
        try:
            values = next(csv.reader(io.StringIO(text.decode(), newline=""), delimiter=delimiter))
            identity = mapper.identity(values)
            contact = mapper.contact(values)
        except (csv.Error, RowRejected, StopIteration, IndexError, UnicodeDecodeError):
            log.warning("a settled row could not be read back for the audit trail")
            continue
        exclusions.append(exclusion(identity, *contact, "suppressed", reason))
    return exclusions


def _never_called(values: list[str]) -> str | None:
    raise AssertionError("the splitter leaves addresses C does not read to the bucket")
