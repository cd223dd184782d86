"""Braze Currents: the discovery timer over S3 and the queue worker for large backlogs."""

from __future__ import annotations

import azure.functions as func

from core.currents.discovery import FILES_QUEUE, ingest_queued, run_currents
from core.currents.s3 import CurrentsObject
from functions._wiring import SETTINGS, services

bp = func.Blueprint()


@bp.timer_trigger(
    arg_name="timer", schedule=SETTINGS.currents_schedule, run_on_startup=False, use_monitor=True
)
def currents_timer(timer: func.TimerRequest) -> None:
    run_currents(services())


@bp.queue_trigger(arg_name="message", queue_name=FILES_QUEUE, connection="AzureWebJobsStorage")
def currents_file(message: func.QueueMessage) -> None:
    ingest_queued(services(), CurrentsObject.model_validate_json(message.get_body()))
