"""Per-row reports of a run: the rejects file and the outcome counts.

`rejects/{sync_id}/{run_id}.csv` (UTF-8, header line) holds every rejected row with its
line number, reason code, message and the raw row. Cells that a spreadsheet would run as a
formula (`=`, `+`, `-`, `@`, tab, CR first) are prefixed with `'`. The name is fixed per
run, so a resumed run rewrites the same file instead of adding a second one.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from core.containers import REJECTS
from core.storage.blobs import BlobStore, BlockWriter

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class Outcome(StrEnum):
    SENT = "sent"
    UNCHANGED = "unchanged"
    REJECTED = "rejected"
    UNMATCHED = "unmatched"
    SUPPRESSED = "suppressed"
    FAILED = "failed"


def spreadsheet_safe(cell: str) -> str:
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell


class OutcomeCounts:
    """Counts per outcome and per (outcome, reason), for the run record."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()

    def add(self, outcome: Outcome, reason: str | None = None) -> None:
        self.outcomes[outcome.value] += 1
        if reason:
            self.reasons[f"{outcome.value}.{reason}"] += 1

    @property
    def rows(self) -> int:
        return sum(self.outcomes.values())

    def as_dict(self) -> dict[str, int]:
        counts = {outcome.value: self.outcomes.get(outcome.value, 0) for outcome in Outcome}
        counts["rows"] = self.rows
        counts.update(sorted(self.reasons.items()))
        return counts


class RejectsWriter:
    """Streams rejected rows to Blob storage; nothing is written for a clean file."""

    def __init__(self, blobs: BlobStore, sync_id: str, run_id: str, columns: Sequence[str]) -> None:
        self.blobs = blobs
        self.name = f"{sync_id}/{run_id}.csv"
        self.columns = list(columns)
        self.count = 0
        self._writer: BlockWriter | None = None
        self._buffer = io.StringIO()
        self._csv = csv.writer(self._buffer, lineterminator="\n")

    def _raw(self, values: Sequence[Any] | str) -> str:
        if isinstance(values, str):
            return values
        if all(isinstance(v, str) or v is None for v in values):
            line = io.StringIO()
            csv.writer(line, lineterminator="").writerow(["" if v is None else v for v in values])
            return line.getvalue()
        return json.dumps(dict(zip(self.columns, values, strict=False)), ensure_ascii=False)

    def add(self, line: int, code: str, message: str, values: Sequence[Any] | str) -> None:
        if self._writer is None:
            self._writer = self.blobs.writer(
                REJECTS, self.name, overwrite=True, content_type="text/csv; charset=utf-8"
            )
            self._csv.writerow(["line", "reason_code", "message", "raw_row"])
        self._csv.writerow(
            [str(line), code, spreadsheet_safe(message), spreadsheet_safe(self._raw(values))]
        )
        self.count += 1
        if self._buffer.tell() > 1 << 20:
            self._flush()

    def _flush(self) -> None:
        assert self._writer is not None
        self._writer.write(self._buffer.getvalue().encode("utf-8"))
        self._buffer.seek(0)
        self._buffer.truncate()

    def close(self) -> str | None:
        """Commit the file; returns its blob path, or None when nothing was rejected."""
        if self._writer is None:
            return None
        self._flush()
        self._writer.close()
        return f"{REJECTS}/{self.name}"
