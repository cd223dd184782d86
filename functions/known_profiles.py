"""Blob trigger: a platform's profile export lands under `known-profiles/{registry}/`."""

from __future__ import annotations

import azure.functions as func
import azurefunctions.extensions.bindings.blob as blob

from core.destinations.known_profiles import CONTAINER
from core.destinations.profile_exports import apply_profile_export
from functions._wiring import SETTINGS, blob_ref, services

bp = func.Blueprint()


@bp.blob_trigger(
    arg_name="client",
    path=CONTAINER + "/{registry}/{name}",
    connection="AzureWebJobsStorage",
    source=func.BlobSource(SETTINGS.segments_trigger_source),
)
def profile_export_arrived(client: blob.BlobClient) -> None:
    ref = blob_ref(client)
    apply_profile_export(services(), ref)
