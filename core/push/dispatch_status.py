"""Push dispatch status: the chunks' rows summed into the run's verdict, and the
`GET /api/push/dispatches/{id}` answer."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from core.push.dispatch_model import (
    ChunkState,
)
from core.runs import RunKind, RunRecord, RunStatus
from core.services import Services
from core.storage.tables import EntityTable, safe_key
from core.verdicts import RunRef

log = logging.getLogger(__name__)


def run_of_dispatch(dispatch_id: str) -> RunRef:
    return RunRef(dispatch_id, RunKind.PUSH_DISPATCH, "push dispatch")


def chunk_rows(services: Services, dispatch_id: str) -> list[ChunkState]:
    table: EntityTable[ChunkState] = services.storage.tables.get(ChunkState)
    return list(table.query_partition(safe_key(dispatch_id)))


def _summary(rows: list[ChunkState]) -> tuple[Counter[str], dict[str, str], int, int]:
    counts: Counter[str] = Counter()
    stopped: dict[str, str] = {}
    chunks = done = 0
    for row in rows:
        if row.row_key.startswith("app-"):
            stopped[row.row_key.removeprefix("app-")] = row.error or "stopped"
            continue
        chunks += 1
        done += row.done
        counts.update(row.counts)
    return counts, stopped, chunks, done


def finish_if_complete(services: Services, dispatch_id: str) -> RunRecord | None:
    run = services.runs.get(dispatch_id)
    if run is None or run.status.ended:
        return run
    counts, stopped, chunks, done = _summary(chunk_rows(services, dispatch_id))
    if chunks < int(run.detail.get("chunks", 0)) or done < chunks:
        return run
    apps = list(run.detail.get("apps", []))
    every_app_stopped = bool(apps) and all(a in stopped for a in apps)
    status, code = RunStatus.SUCCEEDED, None
    if every_app_stopped:
        status, code = RunStatus.FAILED, "apps_stopped"
    elif counts.get("lost"):  # a poisoned chunk's profiles
        status, code = RunStatus.PARTIALLY_FAILED, "poisoned"
    errors = [f"{a}: {e}" for a, e in stopped.items()]
    if code == "poisoned":
        errors.append(f"{counts['lost']} profiles were not sent: a chunk was poisoned")
    return services.runs.finish(
        dispatch_id,
        status,
        counts=dict(counts),
        detail={"stopped_apps": stopped} if stopped else None,
        error="; ".join(errors) or None,
        error_code=code,
    )


def status(services: Services, dispatch_id: str) -> dict[str, Any] | None:
    """A dispatch as the status route shows it: the run, with live counts while it runs."""
    run = services.runs.get(dispatch_id)
    if run is None or run.kind != RunKind.PUSH_DISPATCH:
        return None
    counts, stopped, chunks, done = _summary(chunk_rows(services, dispatch_id))
    answer = run.public()
    answer["dispatch_id"] = dispatch_id
    if not run.status.ended:
        answer["counts"] = dict(counts)
    answer["chunks"] = {"total": max(chunks, int(run.detail.get("chunks", 0))), "done": done}
    answer["stopped_apps"] = stopped
    return answer
