"""Braze Currents: the discovery timer over S3 and the queue worker for large backlogs."""

from __future__ import annotations

import azure.functions as func

from core.currents.discovery import (
    FILES_QUEUE,
    QueuedFile,
    ingest_queued,
    run_currents,
    run_of_file,
)
from core.verdicts import verdict_on_failure
from functions._wiring import SETTINGS, services

bp = func.Blueprint()


@bp.timer_trigger(
    arg_name="timer", schedule=SETTINGS.currents_schedule, run_on_startup=False, use_monitor=True
)
def currents_timer(timer: func.TimerRequest) -> None:
    run_currents(services())


@bp.queue_trigger(arg_name="message", queue_name=FILES_QUEUE, connection="AzureWebJobsStorage")
def currents_file(message: func.QueueMessage) -> None:
    file = QueuedFile.model_validate_json(message.get_body())
    with verdict_on_failure(
        services(), run_of_file(file), final=False, attempt=message.dequeue_count
    ):
        ingest_queued(services(), file)
