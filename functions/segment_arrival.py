"""Blob trigger: a CDP segment export lands under `segments/{sync_id}/`."""

from __future__ import annotations

import azure.functions as func
import azurefunctions.extensions.bindings.blob as blob

from core.containers import SEGMENTS
from core.segments.arrival import run_of_blob
from core.sync.service import process_segment_file
from core.verdicts import verdict_on_failure
from functions._wiring import SETTINGS, blob_ref, services

bp = func.Blueprint()


@bp.blob_trigger(
    arg_name="client",
    path=SEGMENTS + "/{sync_id}/{name}",
    connection="AzureWebJobsStorage",
    source=func.BlobSource(SETTINGS.segments_trigger_source),
)
def segment_file_arrived(client: blob.BlobClient) -> None:
    ref = blob_ref(client)
    # The host retries a failing blob, then poisons it (functions/verdicts.py ends the run).
    with verdict_on_failure(services(), lambda: run_of_blob(services(), ref), final=False):
        process_segment_file(services(), ref)
