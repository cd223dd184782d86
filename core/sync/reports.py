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
import io
import json
from collections import Counter
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from azure.storage.blob import BlobBlock, ContentSettings

from core.containers import REJECTS
from core.storage.blobs import BlobStore

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


def _block_id(part: int, sequence: int) -> str:
    return base64.b64encode(f"{part:05d}{sequence:07d}".encode()).decode()


HEADER_BLOCK = base64.b64encode(b"header000000").decode()


class RejectsPart:
    """Rejected rows of one part of a run (a bucket, or the split pass), staged as blocks.

    Parts are written independently, possibly by parallel workers, as uncommitted blocks
    of the run's rejects blob with deterministic ids; `commit_rejects` commits them in part
    order once every part is done. A re-run of a part restages the same ids.
    """

    def __init__(self, blobs: BlobStore, sync_id: str, run_id: str, columns: Sequence[str],
                 part: int) -> None:  # fmt: skip
        self.blobs = blobs
        self.name = rejects_name(sync_id, run_id)
        self.columns = list(columns)
        self.part = part
        self.count = 0
        self.block_ids: list[str] = []
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
        self._csv.writerow(
            [str(line), code, spreadsheet_safe(message), spreadsheet_safe(self._raw(values))]
        )
        self.count += 1
        if self._buffer.tell() > 1 << 20:
            self._stage()

    def _stage(self) -> None:
        data = self._buffer.getvalue().encode("utf-8")
        if not data:
            return
        self.blobs.ensure_container(REJECTS)
        block_id = _block_id(self.part, len(self.block_ids))
        self.blobs.service.get_blob_client(REJECTS, self.name).stage_block(block_id, data)
        self.block_ids.append(block_id)
        self._buffer.seek(0)
        self._buffer.truncate()

    def close(self) -> list[str]:
        self._stage()
        return self.block_ids


def rejects_name(sync_id: str, run_id: str) -> str:
    return f"{sync_id}/{run_id}.csv"


def commit_rejects(blobs: BlobStore, sync_id: str, run_id: str, block_ids: list[str]) -> str | None:
    """Commit the staged parts after a header line; None when nothing was rejected."""
    if not block_ids:
        return None
    name = rejects_name(sync_id, run_id)
    client = blobs.service.get_blob_client(REJECTS, name)
    client.stage_block(HEADER_BLOCK, b"line,reason_code,message,raw_row\n")
    client.commit_block_list(
        [BlobBlock(HEADER_BLOCK), *(BlobBlock(block_id) for block_id in block_ids)],
        content_settings=ContentSettings(content_type="text/csv; charset=utf-8"),
    )
    return f"{REJECTS}/{name}"
