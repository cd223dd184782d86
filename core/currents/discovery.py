"""The Currents timer: find new files under the prefix and ingest them, or fan them out.

Per event type folder, `date=` hour folders are listed from a checkpoint on (paged). The
checkpoint only moves past a folder once every file in it is finished and the folder is
older than the lookback, so a file that arrives late into an older hour folder is still
found; a finished file (key + ETag) is never read again. Up to `inline_files` new files are
ingested by the timer itself; a larger backlog goes to the `currents-files` queue, one
message per file, for parallel queue-triggered workers.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from core.currents.files import FINISHED, FileLedger, FileReceipt, due, format_date_folder
from core.currents.ingest import FileReport, IngestContext, ingest_file
from core.currents.s3 import CurrentsObject, event_type_folders, list_folder, s3_client
from core.errors import ConfigError, SwitchboardError
from core.runs import RunKind, RunRecord, RunStatus, new_run_id
from core.services import Services
from core.storage import Storage
from core.verdicts import RunRef, verdict_on_failure

log = logging.getLogger(__name__)
FILES_QUEUE = "currents-files"
_MAX_REPORTED_ERRORS = 20


@dataclass(frozen=True)
class CurrentsConfig:
    bucket: str
    prefix: str
    lookback: timedelta
    inline_files: int
    max_attempts: int
    claim_seconds: int

    def context(self, storage: Storage, s3: Any) -> IngestContext:
        return IngestContext.create(
            storage, s3, max_attempts=self.max_attempts, claim_seconds=self.claim_seconds
        )


def config_of(services: Services) -> CurrentsConfig | None:
    settings = services.settings
    if settings.currents_bucket is None:
        return None
    return CurrentsConfig(
        bucket=settings.currents_bucket,
        prefix=settings.currents_prefix,
        lookback=timedelta(hours=settings.currents_lookback_hours),
        inline_files=settings.currents_inline_files,
        max_attempts=settings.currents_max_attempts,
        claim_seconds=settings.currents_claim_seconds,
    )


def client_for(services: Services) -> Any:
    return s3_client(services.settings.s3_endpoint_url, services.settings.s3_region)


def discover(
    services: Services, ledger: FileLedger, s3: Any, config: CurrentsConfig, now: datetime
) -> tuple[list[CurrentsObject], Counter[str]]:
    """Files due for ingestion, oldest hour first; advances the per-folder checkpoints."""
    counts: Counter[str] = Counter()
    due_files: list[CurrentsObject] = []
    settled_before = now - config.lookback
    for folder in event_type_folders(s3, config.bucket, config.prefix):
        scan_from = ledger.scan_from(config.bucket, folder, settled_before)
        by_date: dict[str, list[CurrentsObject]] = {}
        for obj in list_folder(s3, config.bucket, folder, scan_from):
            by_date.setdefault(obj.date, []).append(obj)
        oldest_open: str | None = None
        for date in sorted(by_date):
            objects = by_date[date]
            receipts = ledger.receipts_of_folder(objects[0])
            counts["files.listed"] += len(objects)
            for obj in objects:
                receipt = receipts.get(FileReceipt.row_for(obj))
                if due(receipt, now):
                    due_files.append(obj)
                    oldest_open = oldest_open or date
                elif receipt is not None and receipt.status not in FINISHED:
                    oldest_open = oldest_open or date  # in flight elsewhere: keep scanning
                else:
                    counts["files.finished_before"] += 1
        settled = format_date_folder(settled_before)
        next_from = max(scan_from, min(oldest_open, settled) if oldest_open else settled)
        if next_from != scan_from:
            ledger.advance(config.bucket, folder, next_from, now)
    return due_files, counts


def run_currents(
    services: Services,
    *,
    s3: Any | None = None,
    now: datetime | None = None,
    config: CurrentsConfig | None = None,
    run_id: str | None = None,
) -> RunRecord:
    """One timer firing: discover, then ingest inline or fan out; recorded as a run
    (`run_id`: an operator's retry of a failed one)."""
    config = config or config_of(services)
    run = services.runs.start(RunKind.CURRENTS, source="timer", run_id=run_id)
    with verdict_on_failure(services, run.run_id, final=True):  # timers are not retried
        return _run_currents(services, run, s3=s3, now=now, config=config)


def _run_currents(
    services: Services,
    run: RunRecord,
    *,
    s3: Any | None,
    now: datetime | None,
    config: CurrentsConfig | None,
) -> RunRecord:
    if config is None:
        return services.runs.finish(
            run.run_id, RunStatus.SUCCEEDED, counts={},
            detail={"skipped": "SWITCHBOARD_CURRENTS_BUCKET is not set"},
        )  # fmt: skip
    s3 = s3 or client_for(services)
    moment = now or datetime.now(UTC)
    ledger = FileLedger(services.storage, claim_seconds=config.claim_seconds)
    try:
        files, counts = discover(services, ledger, s3, config, moment)
    except SwitchboardError as exc:
        log.error("currents discovery failed", extra={"run_id": run.run_id})
        return services.runs.finish(run.run_id, RunStatus.FAILED, counts={}, error=str(exc))
    counts["files.new"] = len(files)
    reports: list[FileReport] = []
    errors: list[dict[str, str]] = []
    if len(files) > config.inline_files:
        for obj in files:
            if ledger.mark_queued(obj, moment):
                services.storage.queues.send(FILES_QUEUE, queued_file(obj, moment))
                counts["files.queued"] += 1
    else:
        context = config.context(services.storage, s3)
        for obj in files:
            try:
                reports.append(ingest_file(context, obj))
            except SwitchboardError as exc:  # transient: given back, retried next firing
                errors.append({"key": obj.key, "error": str(exc)})
                counts["files.retry_later"] += 1
    summary = summarise(reports, counts)
    errors += [{"key": r.key, "error": r.error or ""} for r in reports if r.error]
    detail: dict[str, Any] = {
        "bucket": config.bucket,
        "prefix": config.prefix,
        "errors": errors[:_MAX_REPORTED_ERRORS],
        "generic_types": sorted({r.event_type for r in reports if r.generic_type}),
    }
    status = RunStatus.SUCCEEDED
    log.info("currents run finished", extra={"run_id": run.run_id, **summary})
    return services.runs.finish(run.run_id, status, counts=dict(summary), detail=detail)


def summarise(reports: list[FileReport], counts: Counter[str]) -> Counter[str]:
    summary = Counter(counts)
    for report in reports:
        summary[f"files.{report.outcome}"] += 1
        for name, value in report.counts.items():
            summary[f"events.{name}"] += value
    return summary


class QueuedFile(CurrentsObject):
    """The `currents-files` message: an object version, and the run that ingests it (the
    same run on every delivery of the message)."""

    run_id: str | None = None


def queued_file(obj: CurrentsObject, now: datetime) -> QueuedFile:
    run_id = new_run_id(now, seed=FileReceipt.row_for(obj))
    return QueuedFile(**obj.model_dump(), run_id=run_id)


def run_of_file(message: CurrentsObject) -> RunRef:
    """The run of a queued file (a message queued before runs were named: a new one)."""
    run_id = getattr(message, "run_id", None)
    run_id = run_id or new_run_id(datetime.now(UTC), seed=FileReceipt.row_for(message))
    return RunRef(run_id, RunKind.CURRENTS, f"queue {FILES_QUEUE}: {message.key}")


def run_of_file_message(services: Services, body: bytes) -> RunRef:
    return run_of_file(QueuedFile.model_validate_json(body))


def ingest_queued(
    services: Services, message: CurrentsObject, *, s3: Any | None = None
) -> FileReport:
    """Queue worker: one file of a fanned-out backlog, reported as a run of its own."""
    config = config_of(services)
    ref = run_of_file(message)
    file = CurrentsObject.model_validate(message.model_dump()).model_dump()
    run = services.runs.start(ref.kind, run_id=ref.run_id, source=ref.source, detail={"file": file})
    if run.status.ended:  # delivered again after its run ended
        return FileReport(message.key, message.event_type, outcome="skipped")
    if config is None:
        raise ConfigError("SWITCHBOARD_CURRENTS_BUCKET is not set; cannot ingest queued files")
    context = config.context(services.storage, s3 or client_for(services))
    report = ingest_file(context, message)
    detail = {
        "bucket": message.bucket, "key": message.key,
        "errors": [{"key": report.key, "error": report.error}] if report.error else [],
        "generic_types": [report.event_type] if report.generic_type else [],
    }  # fmt: skip
    if report.outcome != "skipped":
        services.runs.finish(
            run.run_id, RunStatus.SUCCEEDED, counts=dict(summarise([report], Counter())),
            detail=detail,
        )  # fmt: skip
    else:  # done by an earlier message of the same file, or another worker has it now
        skipped = "finished" if context.ledger.finished(message) else "held by another worker"
        # (a redelivery of this message while its first delivery still works: that one's
        # finish comes later and says what it did)
        services.runs.finish(
            run.run_id, RunStatus.SUCCEEDED, counts={}, detail={**detail, "skipped": skipped}
        )
    log.info(
        "currents file ingested",
        extra={"key": message.key, "outcome": report.outcome, **dict(report.counts)},
    )
    return report
