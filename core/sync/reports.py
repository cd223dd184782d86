"""Per-row reports of a run: the rejects file and the outcome counts.

`rejects/{sync_id}/{run_id}.csv` (UTF-8, header line) holds every rejected row with its
line number, reason code, message and the raw row; rows are grouped by part (malformed
rows first, then bucket by bucket), in line order within a part. Cells that a spreadsheet
would run as a formula (`=`, `+`, `-`, `@`, tab, CR first) are prefixed with `'`. The name
is fixed per run, so a resumed run rewrites the same file instead of adding a second one.
"""

from __future__ import annotations

import base64
import csv
import functools
import io
import json
from collections import Counter
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

from azure.storage.blob import BlobBlock, ContentSettings

from core.containers import REJECTS
from core.storage.blobs import BlobStore

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


PREVIEWS = "previews"


class Outcome(StrEnum):
    SENT = "sent"
    WOULD_SEND = "would_send"
    """Dry runs only: the row would have been sent."""
    UNCHANGED = "unchanged"
    REJECTED = "rejected"
    UNMATCHED = "unmatched"
    SUPPRESSED = "suppressed"
    BLOCKED_BY_POLICY = "blocked_by_policy"
    """A governance policy blocks the sync: the row would have been sent."""
    FAILED = "failed"


def spreadsheet_safe(cell: str) -> str:
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell


class OutcomeCounts:
    """Counts per outcome and per (outcome, reason), for the run record."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()

    def add(self, outcome: Outcome, reason: str | None = None, times: int = 1) -> None:
        self.outcomes[outcome.value] += times
        if reason:
            self.reasons[f"{outcome.value}.{reason}"] += times

    @property
    def rows(self) -> int:
        return sum(self.outcomes.values())

    def as_dict(self) -> dict[str, int]:
        counts = {
            outcome.value: self.outcomes.get(outcome.value, 0)
            for outcome in Outcome
            if outcome != Outcome.WOULD_SEND or self.outcomes.get(outcome.value)
        }
        counts["rows"] = self.rows
        counts.update(sorted(self.reasons.items()))
        return counts


def _block_id(part: int, sequence: int) -> str:
    return base64.b64encode(f"{part:05d}{sequence:07d}".encode()).decode()


HEADER_BLOCK = base64.b64encode(b"header000000").decode()
_KEPT_PART = 99_999
"""Blocks staged at the end from the texts parts kept (`commit_rejects`)."""
_STAGE_BYTES = 1 << 20


class StagedPart:
    """One part of a run's output blob, written as uncommitted blocks.

    Parts are written independently, possibly by parallel workers, with deterministic
    block ids; `commit_parts` commits them in part order once every part is done. A re-run
    of a part restages the same ids, so nothing is duplicated.
    """

    def __init__(self, blobs: BlobStore, container: str, name: str, part: int) -> None:
        self.blobs = blobs
        self.container = container
        self.name = name
        self.part = part
        self.count = 0
        self.block_ids: list[str] = []
        self._buffer = bytearray()

    def write(self, data: bytes, rows: int = 1) -> None:
        self._buffer += data
        self.count += rows
        if len(self._buffer) >= _STAGE_BYTES:
            self.flush()

    def flush(self) -> None:
        """Stage what is buffered now."""
        if self._buffer:
            self._put(self._next_block_id(), bytes(self._buffer))
            self._buffer.clear()

    def _next_block_id(self) -> str:
        block_id = _block_id(self.part, len(self.block_ids))
        self.block_ids.append(block_id)
        return block_id

    def _put(self, block_id: str, data: bytes) -> None:
        self.blobs.ensure_container(self.container)
        client = self.blobs.service.get_blob_client(self.container, self.name)
        client.stage_block(block_id, data)

    def close(self) -> list[str]:
        block_ids, stage_rest = self.finish()
        stage_rest()
        return block_ids

    def finish_small(self, up_to: int) -> tuple[list[str], Callable[[], None], str]:
        """As `finish`, except that a part of at most `up_to` bytes in all is returned as
        text to keep elsewhere (a bucket's result) rather than staged: a request saved."""
        if not self.block_ids and len(self._buffer) <= up_to:
            text = self._buffer.decode("utf-8")
            self._buffer.clear()
            return [], lambda: None, text
        return (*self.finish(), "")

    def finish(self) -> tuple[list[str], Callable[[], None]]:
        """Every block id, and a call that stages what is still buffered: the caller may
        make it on another thread (ids are deterministic, so they are known now)."""
        if not self._buffer:
            return list(self.block_ids), lambda: None
        stage_rest = functools.partial(self._put, self._next_block_id(), bytes(self._buffer))
        self._buffer.clear()
        return list(self.block_ids), stage_rest


def commit_parts(
    blobs: BlobStore,
    container: str,
    name: str,
    block_ids: list[str],
    *,
    header: bytes | None,
    content_type: str,
) -> str | None:
    """Commit staged parts (after a header line); None when no part wrote anything."""
    if not block_ids:
        return None
    client = blobs.service.get_blob_client(container, name)
    blocks = [BlobBlock(block_id) for block_id in block_ids]
    if header is not None:
        client.stage_block(HEADER_BLOCK, header)
        blocks.insert(0, BlobBlock(HEADER_BLOCK))
    client.commit_block_list(blocks, content_settings=ContentSettings(content_type=content_type))
    return f"{container}/{name}"


class RejectsPart(StagedPart):
    """Rejected rows of one part of a run (a bucket, or the split pass). `raw_row` is the
    record as it is in the file: its text where the reader kept it (a CSV record with a
    quote, a JSON Lines line, a malformed record), else its values joined by the file's
    delimiter, which is the same text for a record without quotes."""

    def __init__(
        self,
        blobs: BlobStore,
        sync_id: str,
        run_id: str,
        columns: Sequence[str],
        part: int,
        label: Callable[[int], str] = str,
        delimiter: str = ",",
    ) -> None:
        super().__init__(blobs, REJECTS, rejects_name(sync_id, run_id), part)
        self.columns = list(columns)
        self.label = label
        self.delimiter = delimiter
        # One writer over a buffer emptied for each line (a writer per row was most of a
        # reject's cost).
        self._line = io.StringIO()
        self._lines = csv.writer(self._line, lineterminator="\n")

    def _raw(self, values: Sequence[Any] | str, raw: str | None) -> str:
        if raw is not None:
            return raw
        if isinstance(values, str):
            return values
        if set(map(type, values)) <= _TEXT_OR_NONE:  # the usual: a CSV row's texts
            return self.delimiter.join("" if v is None else v for v in values)
        return json.dumps(dict(zip(self.columns, values, strict=False)), ensure_ascii=False)

    def add_texts(self, rejects: list[tuple[int, str, str, list[str], str | None]]) -> None:
        """Many rejected rows whose values are all text (as C gives them): the same lines
        as `add` gives each, written by one writer call for all of them (a call per row was
        most of a reject's cost)."""
        if not rejects:
            return
        join = self.delimiter.join
        rows = [
            [self.label(line), code, spreadsheet_safe(message),
             spreadsheet_safe(join(values) if raw is None else raw)]
            for line, code, message, values, raw in rejects
        ]  # fmt: skip
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        self.write(out.getvalue().encode("utf-8"), rows=len(rows))

    def add(
        self,
        line: int,
        code: str,
        message: str,
        values: Sequence[Any] | str,
        raw: str | None = None,
    ) -> None:
        row = [
            self.label(line),
            code,
            spreadsheet_safe(message),
            spreadsheet_safe(self._raw(values, raw)),
        ]
        self.write(_written(self._line, self._lines, row).encode("utf-8"))


_TEXT_OR_NONE = {str, type(None)}


def _written(buffer: io.StringIO, writer: Any, row: list[str]) -> str:
    """`row` as `writer` writes it into `buffer`, which holds nothing else."""
    buffer.seek(0)
    buffer.truncate()
    writer.writerow(row)
    return buffer.getvalue()


class PreviewPart(StagedPart):
    """What a dry run would send, one destination object per line (JSON Lines)."""

    def __init__(self, blobs: BlobStore, sync_id: str, run_id: str, part: int) -> None:
        super().__init__(blobs, PREVIEWS, f"{sync_id}/{run_id}.jsonl", part)

    def add(self, line: int, item: dict[str, Any]) -> None:
        record = {"line": line, "object": item}
        self.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")


def rejects_name(sync_id: str, run_id: str) -> str:
    return f"{sync_id}/{run_id}.csv"


def commit_rejects(
    blobs: BlobStore, sync_id: str, run_id: str, parts: Sequence[list[str] | str]
) -> str | None:
    """The rejects file, from its parts in order: each the blocks it staged, or the text it
    kept instead (`finish_small`). Consecutive texts are staged together, up to
    `_STAGE_BYTES` a block, under ids of their own (the same again on a re-run)."""
    name = rejects_name(sync_id, run_id)
    kept = StagedPart(blobs, REJECTS, name, part=_KEPT_PART)
    block_ids: list[str] = []
    taken = 0  # of kept's block ids
    for part in [*parts, []]:
        if isinstance(part, str):
            kept.write(part.encode("utf-8"))
            continue
        kept.flush()
        block_ids += kept.block_ids[taken:] + part
        taken = len(kept.block_ids)
    return commit_parts(
        blobs, REJECTS, name, block_ids,
        header=b"line,reason_code,message,raw_row\n", content_type="text/csv; charset=utf-8",
    )  # fmt: skip


def commit_preview(blobs: BlobStore, sync_id: str, run_id: str, block_ids: list[str]) -> str | None:
    return commit_parts(
        blobs, PREVIEWS, f"{sync_id}/{run_id}.jsonl", block_ids,
        header=None, content_type="application/x-ndjson; charset=utf-8",
    )  # fmt: skip
