"""The erasure worker: requests queued by `POST /api/privacy/erasure` (core/privacy/erasure.py)."""

from __future__ import annotations

import azure.functions as func

from core.privacy.erasure import ERASURE_QUEUE, ErasureMessage, run_erasure
from core.verdicts import verdict_on_failure
from functions._wiring import services

bp = func.Blueprint()


@bp.queue_trigger(arg_name="message", queue_name=ERASURE_QUEUE, connection="AzureWebJobsStorage")
def privacy_erasure(message: func.QueueMessage) -> None:
    erasure = ErasureMessage.model_validate_json(message.get_body())
    with verdict_on_failure(services(), erasure.run_id, final=False, attempt=message.dequeue_count):
        run_erasure(services(), erasure)
