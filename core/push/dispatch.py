"""Push dispatch: one request, personalised pushes to every active device of its targets.

Here: accept, plan and an operator's retry. The shapes are in dispatch_model.py, the
sending in chunk_runner.py, the verdict and status in dispatch_status.py; the providers
(apns.py, fcm.py), templates and tokens live apart.

    POST /api/push/send  ->  accept()      202 with the dispatch id (a run id), at once
    queue `push-plans`   ->  plan()        targets resolved, cut into chunks of profiles
    queue `push-chunks`  ->  run_chunk()   each chunk sent by a worker of its own
    GET /api/push/dispatches/{id} -> status()

The request is kept in Blob storage (`push-dispatches/{id}/request.json`), each chunk's
profiles and their attributes in `chunk-{n}.json`, so queue messages stay small however
big the audience. A chunk is sent in slices of `SLICE_PROFILES` profiles; after each slice
its outcome events are stored and a checkpoint row records how far it got. A worker that
dies mid-chunk is replaced by the queue's redelivery, which resumes at the checkpoint:
at most one slice is pushed twice (a device may get the same push twice; no event is
counted twice, as event ids are deterministic).

Per profile: push-suppressed (suppression list, channel `push`, keyed by profile id) or
`push_subscribe` = unsubscribed in its attributes: skipped and counted; a template that
needs an attribute the profile lacks: skipped (`missing_attribute`); per device: inactive
tokens and tokens without push opt-in are skipped. Each attempt ends as an event: push
sent, push bounced (dead token, which is switched off) or push failed.
A provider's ConfigError stops that app for the whole dispatch (recorded once, read by
every chunk); the other apps go on.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
from datetime import UTC, datetime

import orjson
from pydantic import ValidationError

from core.errors import BlobAlreadyExists, EntityExists
from core.push.dispatch_model import (
    CONTAINER,
    PLAN_QUEUE,
    PUSH_CHUNK_QUEUE,
    ChunkState,
    DispatchKey,
    DispatchMessage,
    DispatchRejected,
    DispatchRequest,
    PlanMessage,
    PushChunkMessage,
    blob_path,
    chunk_key,
)
from core.push.dispatch_status import chunk_rows, finish_if_complete
from core.push.templates import CompiledTemplate
from core.push.tokens import profile_partition
from core.runs import RunKind, RunRecord, RunStatus, new_run_id
from core.services import Services
from core.storage.tables import EntityTable, safe_key
from core.sync.definitions import SyncDefinition, SyncDocument
from core.sync.state import audience_members

log = logging.getLogger(__name__)


# -- accept --------------------------------------------------------------------------


def _governed_audience(document: SyncDocument, sync: SyncDefinition, audience: str) -> None:
    """An audience a policy keeps back, or one collected under another channel's marketing
    permission, is not pushed to (a list carries one permission)."""
    governed = document.governed(sync.id)
    if governed is not None:
        violations = [*governed.verdict.blocked] + [
            v
            for v in governed.verdict.dropped
            if (v.sent.kind, v.sent.name) == ("audience", audience)
        ]
        if violations:
            reasons = "; ".join(v.sentence() for v in violations)
            raise DispatchRejected(409, "blocked_by_policy", f"sync {sync.id}: {reasons}")
    if sync.consent is not None and sync.consent.channel != "push":
        raise DispatchRejected(
            409, "wrong_permission",
            f"sync {sync.id} carries the {sync.consent.channel} marketing permission; a push "
            "dispatch needs an audience collected under the push permission",
        )  # fmt: skip


def accept(services: Services, request: DispatchRequest) -> tuple[RunRecord, bool]:
    """Check and record a dispatch request and queue its planning; (run, created)."""
    document = services.syncs()
    declared = {app.id: app for app in document.push_apps}
    if not declared:
        raise DispatchRejected(409, "no_push_apps", "no push app is declared")
    app_ids = request.app_ids or sorted(declared)
    unknown = [a for a in app_ids if a not in declared]
    if unknown:
        raise DispatchRejected(
            404, "unknown_app", f"no push app is declared with id {unknown[0]!r}"
        )
    CompiledTemplate(request.template)  # TemplateInvalid -> 400 before anything is stored
    segment = request.targets.segment
    if segment is not None:
        sync = document.get(segment.sync_id)
        if sync is None:
            raise DispatchRejected(
                404, "unknown_sync", f"no sync is declared with id {segment.sync_id!r}"
            )
        _governed_audience(document, sync, segment.audience)
        if segment.audience not in [s.name for s in sync.audiences.segments]:
            raise DispatchRejected(
                404, "unknown_audience", f"sync {sync.id} has no audience {segment.audience!r}"
            )
    now = datetime.now(UTC)
    run_id = new_run_id(now)
    if request.dispatch_key:
        keys: EntityTable[DispatchKey] = services.storage.tables.get(DispatchKey)
        try:
            keys.insert(DispatchKey(partition_key="key", row_key=safe_key(request.dispatch_key),
                                    dispatch_id=run_id))  # fmt: skip
        except EntityExists:
            found = keys.get("key", safe_key(request.dispatch_key))
            existing = services.runs.get(found.entity.dispatch_id) if found else None
            if existing is not None:
                return existing, False
            # The first request died between its key and its run: this one takes over.
            run_id = found.entity.dispatch_id if found else run_id
    blobs = services.storage.blobs
    blobs.ensure_container(CONTAINER)
    message = DispatchMessage(template=request.template, campaign_id=request.campaign_id)
    for name, data in (("request.json", request.model_dump_json()),
                       ("message.json", message.model_dump_json())):  # fmt: skip
        with contextlib.suppress(BlobAlreadyExists):  # a retried request finds it there
            blobs.create(CONTAINER, blob_path(run_id, name), data.encode())
    target = (
        {"profiles": len(request.targets.profile_ids or [])}
        if segment is None else {"sync_id": segment.sync_id, "audience": segment.audience}
    )  # fmt: skip
    run = services.runs.start(
        RunKind.PUSH_DISPATCH, run_id=run_id, status=RunStatus.RECEIVED, now=now,
        source="POST /api/push/send",
        detail={"apps": app_ids, "campaign_id": request.campaign_id, "targets": target,
                "title": request.template.title},
    )  # fmt: skip
    services.storage.queues.send(PLAN_QUEUE, PlanMessage(dispatch_id=run_id))
    return run, True


# -- plan ----------------------------------------------------------------------------


def _load_request(services: Services, dispatch_id: str) -> DispatchRequest:
    data = services.storage.blobs.read_versioned(CONTAINER, blob_path(dispatch_id, "request.json"))
    if data is None:
        raise LookupError(f"dispatch {dispatch_id} has no stored request")
    return DispatchRequest.model_validate_json(data[0])


def _targets(services: Services, request: DispatchRequest) -> list[str]:
    """Target profile ids, each once."""
    if request.targets.profile_ids is not None:
        found = request.targets.profile_ids
    else:
        assert request.targets.segment is not None
        segment = request.targets.segment
        found = list(audience_members(services.storage, segment.sync_id, segment.audience))
    # Grouped by the registry's partitions, so that a slice of a chunk reads few of them.
    return sorted(dict.fromkeys(found), key=lambda p: (profile_partition(p), p))


def _frozen_targets(services: Services, dispatch_id: str, request: DispatchRequest) -> list[str]:
    """The targets as first resolved: a re-planned dispatch keeps the same chunks even if
    the segment's membership changed meanwhile."""
    blobs, name = services.storage.blobs, blob_path(dispatch_id, "targets.json.gz")
    stored = blobs.read_versioned(CONTAINER, name)
    if stored is not None:
        return list(orjson.loads(gzip.decompress(stored[0])))
    profiles = _targets(services, request)
    with contextlib.suppress(BlobAlreadyExists):
        blobs.create(CONTAINER, name, gzip.compress(orjson.dumps(profiles), compresslevel=1))
        return profiles
    return _frozen_targets(services, dispatch_id, request)  # another planner won the race


def plan(services: Services, message: PlanMessage) -> None:
    """Queue worker: cut the targets into chunks and queue them (safe to repeat)."""
    dispatch_id = message.dispatch_id
    run = services.runs.get(dispatch_id)
    if run is None or run.status.ended:
        return
    try:
        request = _load_request(services, dispatch_id)
        profiles = _frozen_targets(services, dispatch_id, request)
    except (LookupError, ValidationError, ValueError) as exc:
        # Retrying cannot bring back a request that is gone or unreadable: say so.
        services.runs.finish(dispatch_id, RunStatus.FAILED, error=f"cannot plan: {exc}")
        return
    size = services.settings.push_targets_per_chunk
    chunks = [profiles[i : i + size] for i in range(0, len(profiles), size)]
    blobs = services.storage.blobs
    table: EntityTable[ChunkState] = services.storage.tables.get(ChunkState)
    key = safe_key(dispatch_id)
    for number, members in enumerate(chunks, start=1):
        entries = [[p, {**request.defaults, **request.attributes.get(p, {})}] for p in members]
        data = gzip.compress(orjson.dumps(entries), compresslevel=1)
        blobs.create(CONTAINER, blob_path(dispatch_id, f"{chunk_key(number)}.json.gz"), data,
                     overwrite=True)  # fmt: skip
        with contextlib.suppress(EntityExists):
            table.insert(ChunkState(partition_key=key, row_key=chunk_key(number),
                                    profiles=len(members)))  # fmt: skip

    def planned(record: RunRecord) -> None:
        record.status = RunStatus.RUNNING
        record.detail.update({"chunks": len(chunks), "profiles": len(profiles)})

    services.runs.update(dispatch_id, planned)
    if not chunks:
        services.runs.finish(dispatch_id, RunStatus.SUCCEEDED, counts={"profiles": 0})
        return
    for number in range(1, len(chunks) + 1):
        services.storage.queues.send(
            PUSH_CHUNK_QUEUE, PushChunkMessage(dispatch_id=dispatch_id, chunk=number)
        )
    log.info("push dispatch planned", extra={"run_id": dispatch_id, "chunks": len(chunks),
                                             "profiles": len(profiles)})  # fmt: skip


def retry_dispatch(services: Services, run: RunRecord) -> None:
    """An operator's retry (core/retries.py): planned again if it never was; else each
    chunk not finished, or poisoned, is queued again and resumes at its checkpoint."""
    dispatch_id = run.run_id
    if not run.detail.get("chunks"):
        services.storage.queues.send(PLAN_QUEUE, PlanMessage(dispatch_id=dispatch_id))
        return
    table: EntityTable[ChunkState] = services.storage.tables.get(ChunkState)
    queued = []
    for row in chunk_rows(services, dispatch_id):
        if not row.row_key.startswith("chunk-") or (row.done and not row.counts.get("lost")):
            continue
        counts = {name: value for name, value in row.counts.items() if name != "lost"}
        table.upsert(row.model_copy(update={"done": False, "error": None, "counts": counts,
                                            "claimed_until": None}))  # fmt: skip
        queued.append(int(row.row_key.removeprefix("chunk-")))
    services.runs.update(dispatch_id, lambda r: setattr(r, "status", RunStatus.RUNNING))
    for chunk in queued:
        services.storage.queues.send(
            PUSH_CHUNK_QUEUE, PushChunkMessage(dispatch_id=dispatch_id, chunk=chunk)
        )
    if not queued:
        finish_if_complete(services, dispatch_id)
