"""A segment file from arrival to run report: receipt, sync lookup, run, state commit."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from core.destinations.registry import destination_for
from core.errors import ConfigError, TerminalError
from core.runs import RunRecord, RunStatus
from core.segments import arrival
from core.services import Services
from core.storage import BlobRef
from core.suppression import SuppressionList
from core.sync.engine import SegmentSyncRun
from core.sync.state import StateStore

log = logging.getLogger(__name__)


def process_segment_file(services: Services, blob: BlobRef) -> RunRecord:
    """Handle one delivered segment blob version; safe to call again for the same version."""
    accepted = arrival.accept(services, blob)
    run = accepted.run
    if accepted.duplicate:
        return run
    sync_id = run.sync_id or ""
    try:
        sync = services.syncs().get(sync_id)
        if sync is None:
            raise ConfigError(f"no sync is declared with id {sync_id!r}")
        destination = destination_for(sync, services.settings)
    except ConfigError as exc:
        return _close(services, blob, run.run_id, RunStatus.FAILED, error=str(exc))
    services.runs.update(run.run_id, lambda r: setattr(r, "status", RunStatus.RUNNING))
    states = StateStore(services.storage)
    state = states.load(sync.id, destination.name)
    engine = SegmentSyncRun(
        services.storage,
        sync,
        destination,
        state,
        SuppressionList(services.storage).snapshot(),
        run_id=run.run_id,
    )
    try:
        result = engine.execute(blob)
    except TerminalError as exc:
        # Retrying cannot help; nothing of the failed batch counts as sent.
        return _close(services, blob, run.run_id, RunStatus.FAILED, error=str(exc))
    if result.file_error is not None:
        error = f"{result.file_error.code}: {result.file_error}"
        return _close(services, blob, run.run_id, RunStatus.FAILED, error=error)
    states.commit(sync.id, destination.name, state)
    log.info(
        "segment sync finished",
        extra={"run_id": run.run_id, "sync_id": sync.id, **result.counts.outcomes},
    )
    return _close(
        services,
        blob,
        run.run_id,
        RunStatus.SUCCEEDED,
        counts=result.counts.as_dict(),
        detail=result.summary(),
    )


def _close(
    services: Services,
    blob: BlobRef,
    run_id: str,
    status: RunStatus,
    *,
    counts: dict[str, int] | None = None,
    detail: dict[str, object] | None = None,
    error: str | None = None,
) -> RunRecord:
    def close(record: RunRecord) -> None:
        record.status = status
        record.finished_at = datetime.now(UTC)
        record.counts = counts or record.counts
        record.detail = {**record.detail, **(detail or {})}
        record.error = error

    record = services.runs.update(run_id, close)
    arrival.mark_completed(services, blob)
    return record
