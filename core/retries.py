"""An operator starts a failed run again: `POST /api/runs/{run_id}/retry`.

The route checks that the run can be retried and reopens it (`received`, the earlier
verdicts kept in `detail.retries`); the `run-retries` queue worker then does what a
retry of that kind of run means, under the same run id, so the run resumes where its
work stopped rather than starting over:

- segment sync: the same file version again (refused if the file changed or is gone:
  a new version is a run of its own); buckets already committed are not sent again.
- Currents: a queued file again (its attempts reset), or a timer run's discovery again.
- log export: the export again; every window after the watermark is exported.
- push dispatch: planned again if it never was, else its unfinished and poisoned chunks
  are queued again (a lost chunk's profiles are sent from its checkpoint).
- webhook delivery: the kept delivery handled again (its message from the run, or from
  the poison container).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from core.runs import RunKind, RunRecord, RunStatus
from core.services import Services
from core.storage import BlobRef

log = logging.getLogger(__name__)
RETRY_QUEUE = "run-retries"
RETRYABLE = (RunStatus.FAILED, RunStatus.PARTIALLY_FAILED)


class RetryMessage(BaseModel):
    run_id: str


class RetryRefused(Exception):
    """The run cannot be retried; `status` and `code` go to the operator."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class RetryKind:
    check: Callable[[Services, RunRecord], None]
    """Raises RetryRefused when the run cannot be retried (before it is reopened)."""
    start: Callable[[Services, RunRecord], None]
    """The retry itself, on the queue worker."""


def request_retry(services: Services, run_id: str) -> RunRecord:
    run = services.runs.get(run_id)
    if run is None:
        raise RetryRefused(404, "run_not_found", f"no run with id {run_id!r}")
    if run.status not in RETRYABLE:
        raise RetryRefused(409, "not_failed", f"run {run_id} is {run.status}: only failed runs")
    kind = _KINDS[run.kind]
    kind.check(services, run)

    def reopen(record: RunRecord) -> None:
        if record.status not in RETRYABLE:
            raise RetryRefused(409, "not_failed", f"run {run_id} is {record.status} now")
        earlier = {
            "at": datetime.now(UTC).isoformat(), "status": record.status.value,
            "error_code": record.error_code, "error": record.error,
        }  # fmt: skip
        record.detail = {**record.detail, "retries": [*record.detail.get("retries", []), earlier]}
        record.detail.pop("last_error", None)
        record.status = RunStatus.RECEIVED
        record.finished_at = record.error = record.error_code = None

    reopened = services.runs.update(run_id, reopen)
    services.storage.queues.send(RETRY_QUEUE, RetryMessage(run_id=run_id))
    log.info("run retry requested", extra={"run_id": run_id})
    return reopened


def run_retry(services: Services, message: RetryMessage) -> None:
    """Queue worker: the retry of a reopened run (a redelivery after it started: nothing)."""
    run = services.runs.get(message.run_id)
    if run is None or run.status != RunStatus.RECEIVED:
        return
    _KINDS[run.kind].start(services, run)


# -- per kind --------------------------------------------------------------------------


def _segment_blob(services: Services, run: RunRecord) -> BlobRef:
    container, _, name = (run.source or "").partition("/")
    ref = services.storage.blobs.find(container, name) if name else None
    if ref is None:
        raise RetryRefused(409, "input_gone", f"{run.source} is no longer there")
    if ref.etag != run.detail.get("etag"):
        raise RetryRefused(
            409, "input_changed",
            f"{run.source} changed since this run; its new version is a run of its own",
        )  # fmt: skip
    return ref


def _check_segment(services: Services, run: RunRecord) -> None:
    _segment_blob(services, run)


def _retry_segment(services: Services, run: RunRecord) -> None:
    from core.segments.arrival import reopen
    from core.sync.service import process_segment_file

    blob = _segment_blob(services, run)
    reopen(services, blob)
    process_segment_file(services, blob)


def _check_currents(services: Services, run: RunRecord) -> None:
    if "file" in run.detail and _queued_file(services, run) is None:
        raise RetryRefused(409, "nothing_to_retry", "the file was ingested since")


def _queued_file(services: Services, run: RunRecord) -> Any:
    from core.currents.discovery import QueuedFile
    from core.currents.files import FileLedger

    file = QueuedFile.model_validate({**run.detail["file"], "run_id": run.run_id})
    return None if FileLedger(services.storage).finished(file) else file


def _retry_currents(services: Services, run: RunRecord) -> None:
    from core.currents.discovery import ingest_queued, run_currents
    from core.currents.files import FileLedger

    if "file" not in run.detail:
        run_currents(services, run_id=run.run_id)
        return
    file = _queued_file(services, run)
    if file is None:
        services.runs.finish(run.run_id, RunStatus.SUCCEEDED, detail={"skipped": "finished"})
        return
    FileLedger(services.storage).reopen(file)
    ingest_queued(services, file)


def _retry_export(services: Services, run: RunRecord) -> None:
    from core.export.service import run_log_export

    run_log_export(services, source="retry", run_id=run.run_id)


def _retry_dispatch(services: Services, run: RunRecord) -> None:
    from core.push.dispatch import retry_dispatch

    retry_dispatch(services, run)


def _no_check(services: Services, run: RunRecord) -> None:
    return None


def _resubmit(services: Services, run: RunRecord) -> None:
    raise RetryRefused(
        409, "resubmit",
        "an erasure's identifiers are not kept: submit the request again "
        "(POST /api/privacy/erasure)",
    )  # fmt: skip


def _delivery(services: Services, run: RunRecord) -> Any:
    """A failed webhook delivery's message: in the run (unreadable) or kept (poisoned)."""
    from core.verdicts import read_kept
    from core.webhooks.deliveries import DeliveryMessage

    if "delivery" in run.detail:
        return DeliveryMessage.model_validate(run.detail["delivery"])
    kept = run.detail.get("poison_message")
    body = read_kept(services, kept) if isinstance(kept, str) else None
    if body is None:
        raise RetryRefused(409, "nothing_to_retry", "the delivery's message was not kept")
    return DeliveryMessage.model_validate_json(body)


def _check_webhook(services: Services, run: RunRecord) -> None:
    _delivery(services, run)


def _retry_webhook(services: Services, run: RunRecord) -> None:
    from core.webhooks.processing import process_delivery
    from core.webhooks.providers import configured_providers

    report = process_delivery(services, configured_providers(services.settings),
                              _delivery(services, run))  # fmt: skip
    if report.outcome != "failed":  # failed: its run failed again, saying why
        services.runs.finish(run.run_id, RunStatus.SUCCEEDED, counts=dict(report.counts),
                             detail={"outcome": report.outcome})  # fmt: skip


_KINDS: dict[RunKind, RetryKind] = {
    RunKind.SEGMENT_SYNC: RetryKind(_check_segment, _retry_segment),
    RunKind.CURRENTS: RetryKind(_check_currents, _retry_currents),
    RunKind.LOG_EXPORT: RetryKind(_no_check, _retry_export),
    RunKind.PUSH_DISPATCH: RetryKind(_no_check, _retry_dispatch),
    RunKind.PRIVACY_ERASURE: RetryKind(_resubmit, _resubmit),
    RunKind.WEBHOOK_DELIVERY: RetryKind(_check_webhook, _retry_webhook),
}
