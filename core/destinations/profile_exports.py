"""A platform's profile export landing under `known-profiles/{registry}/`: one run each.

The run applies the file to the registry (core/destinations/known_profiles.py) and ends
with its counts; rejected lines go to the rejects container. A file applied before (same
blob version) is not applied again: its run, found by a run id derived from the version,
already has its verdict.
"""

from __future__ import annotations

import logging

from core.destinations.known_profiles import CONTAINER, KnownProfiles
from core.runs import RunKind, RunRecord, RunStatus, new_run_id
from core.services import Services
from core.storage import BlobRef

log = logging.getLogger(__name__)


def registry_of(blob_name: str) -> str:
    registry, sep, rest = blob_name.partition("/")
    if not sep or not registry or not rest:
        raise ValueError(f"profile export {blob_name!r} is not under a registry prefix")
    return registry


def apply_profile_export(services: Services, blob: BlobRef) -> RunRecord:
    registry = registry_of(blob.name)
    started = blob.last_modified
    run_id = new_run_id(started, seed=f"{blob.path}\n{blob.etag}") if started else None
    run = services.runs.start(
        RunKind.KNOWN_PROFILES, run_id=run_id, source=f"{CONTAINER}/{blob.name}",
        detail={"registry": registry},
    )  # fmt: skip
    if run.status.ended:
        return run
    profiles = KnownProfiles(services.storage, registry)
    with services.storage.blobs.open_reader(blob, ahead=2) as reader:
        applied = profiles.apply_export(blob.name, reader)
    rejects = profiles.write_rejects(blob.name, applied)
    log.info(
        "profile export applied",
        extra={"run_id": run.run_id, "registry": registry, **applied.counts()},
    )
    status = RunStatus.PARTIALLY_FAILED if applied.rejected else RunStatus.SUCCEEDED
    return services.runs.finish(
        run.run_id, status, counts=applied.counts(),
        detail={"full": applied.full, **({"rejects": rejects} if rejects else {})},
    )  # fmt: skip
