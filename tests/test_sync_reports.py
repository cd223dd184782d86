"""The rejects file of a run, put together from its parts: parts that staged blocks of
their own, and buckets whose few rejects were kept in their result instead."""

from __future__ import annotations

import csv
from typing import Any

from core.sync.reports import RejectsPart, commit_rejects

COLUMNS = ["id", "email"]


def _part(storage: Any, sync_id: str, run_id: str, part: int, rows: int) -> RejectsPart:
    rejects = RejectsPart(storage.blobs, sync_id, run_id, COLUMNS, part=part)
    for i in range(rows):
        message = "not an e-mail address"
        rejects.add(part * 1000 + i, "invalid_email", message, [f"P{part}-{i}", "x"])
    return rejects


def _read(storage: Any, location: str) -> list[list[str]]:
    container, name = location.split("/", 1)
    found = storage.blobs.read_versioned(container, name)
    assert found is not None
    return list(csv.reader(found[0].decode().splitlines()))


def test_kept_and_staged_parts_make_one_file_in_part_order(storage: Any, unique: str) -> None:
    sizes = {1: 3, 2: 5_000, 3: 0, 4: 2, 5: 40, 6: 1}  # part 2 is too large to keep
    parts: list[list[str] | str] = []
    kept = 0
    for part, rows in sizes.items():
        block_ids, stage_rest, text = _part(storage, unique, "run", part, rows).finish_small(16_000)
        stage_rest()
        parts.append(text or block_ids)
        kept += bool(text)
    assert kept == 4 and parts[1] and isinstance(parts[1], list)
    for _ in range(2):  # a second finisher stages the same blocks again
        location = commit_rejects(storage.blobs, unique, "run", parts)
        assert location == f"rejects/{unique}/run.csv"
        lines = _read(storage, location)
        assert lines[0] == ["line", "reason_code", "message", "raw_row"]
        expected = [f"P{part}-{i},x" for part, rows in sizes.items() for i in range(rows)]
        assert [line[3] for line in lines[1:]] == expected
        assert lines[1] == ["1000", "invalid_email", "not an e-mail address", "P1-0,x"]


def test_a_run_without_rejects_has_no_file(storage: Any, unique: str) -> None:
    assert commit_rejects(storage.blobs, unique, "run", [[], "", []]) is None
