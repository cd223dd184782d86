"""Queue trigger: one group of identity buckets of a large segment file (fan-out)."""

from __future__ import annotations

import azure.functions as func

from core.sync.service import CHUNK_QUEUE, ChunkMessage, process_chunk
from functions._wiring import services

bp = func.Blueprint()


@bp.queue_trigger(arg_name="message", queue_name=CHUNK_QUEUE, connection="AzureWebJobsStorage")
def segment_chunk(message: func.QueueMessage) -> None:
    process_chunk(services(), ChunkMessage.model_validate_json(message.get_body()))
