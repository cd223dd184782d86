"""Queue triggers of a segment run: a group of a large file's identity buckets (fan-out),
and a manifest whose parts are still landing."""

from __future__ import annotations

import azure.functions as func

from core.sync.service import (
    MANIFEST_QUEUE,
    SEGMENT_CHUNK_QUEUE,
    ManifestWait,
    SegmentChunkMessage,
    process_chunk,
    resume_manifest,
)
from core.verdicts import verdict_on_failure
from functions._wiring import services

bp = func.Blueprint()


@bp.queue_trigger(
    arg_name="message", queue_name=SEGMENT_CHUNK_QUEUE, connection="AzureWebJobsStorage"
)
def segment_chunk(message: func.QueueMessage) -> None:
    chunk = SegmentChunkMessage.model_validate_json(message.get_body())
    with verdict_on_failure(services(), chunk.run_id, final=False, attempt=message.dequeue_count):
        process_chunk(services(), chunk)


@bp.queue_trigger(arg_name="message", queue_name=MANIFEST_QUEUE, connection="AzureWebJobsStorage")
def segment_manifest_wait(message: func.QueueMessage) -> None:
    wait = ManifestWait.model_validate_json(message.get_body())
    with verdict_on_failure(services(), wait.run_id, final=False, attempt=message.dequeue_count):
        resume_manifest(services(), wait)
