"""Push dispatch: one request, personalised pushes to every active device of its targets.

Past 500 lines because accept, plan, chunk and retry share the chunk claims and
checkpoints; the providers (apns.py, fcm.py), templates and tokens live apart.

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

import asyncio
import contextlib
import gzip
import logging
import re
import secrets
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.audit import AuditLog, Exclusion, exclusion
from core.errors import BlobAlreadyExists, ConfigError, EntityExists, TransientError
from core.events.model import EventChannel, EventType, epoch_millis
from core.events.store import EventStore
from core.push.apps import APP_ID_PATTERN, PushApp
from core.push.outcome import SendOutcome
from core.push.provider import PushProvider, provider_for
from core.push.templates import CompiledTemplate, ProfileSkipped, PushTemplate
from core.push.tokens import Device, TokenRegistry, profile_partition
from core.runs import RunKind, RunRecord, RunStatus, new_run_id
from core.services import Services
from core.storage.tables import EntityTable, TableEntity, safe_key
from core.suppression import Channel, SuppressionList, SuppressionSnapshot
from core.sync.definitions import SyncDefinition, SyncDocument
from core.sync.state import audience_members
from core.verdicts import RunRef, poison_detail

log = logging.getLogger(__name__)

PLAN_QUEUE = "push-plans"
CHUNK_QUEUE = "push-chunks"
CONTAINER = "push-dispatches"
SOURCE = "push"
SLICE_PROFILES = 500
RETRY_ROUNDS = 3
"""Pushes still failing after a provider's retries are tried again this many times, later."""
MAX_PROFILE_IDS = 1_000_000
_UNSUBSCRIBED = {"unsubscribed", "false", "0", "no"}
_APP_ID = re.compile(APP_ID_PATTERN)
_GAVE_UP = "gave_up: "


class SegmentTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sync_id: str = Field(min_length=1, max_length=64)
    audience: str = Field(min_length=1, max_length=255)
    """The audience name in the sync's definition; members are those Switchboard added."""


class DispatchTargets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile_ids: list[str] | None = Field(default=None, min_length=1, max_length=MAX_PROFILE_IDS)
    segment: SegmentTarget | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.profile_ids is None) == (self.segment is None):
            raise ValueError("give either profile_ids or segment")
        if self.profile_ids is not None and any(not p or len(p) > 256 for p in self.profile_ids):
            raise ValueError("profile ids are 1 to 256 characters")
        return self


class DispatchRequest(BaseModel):
    """`POST /api/push/send`."""

    model_config = ConfigDict(extra="forbid")

    dispatch_key: str | None = Field(default=None, min_length=8, max_length=128,
                                     pattern=r"^[A-Za-z0-9._:-]+$")  # fmt: skip
    """The caller's idempotency key: posting the same key again returns the same dispatch."""
    app_ids: list[str] | None = Field(default=None, min_length=1, max_length=20)
    """Which apps to push through (default: every declared app)."""
    campaign_id: str | None = Field(default=None, max_length=128)
    template: PushTemplate
    targets: DispatchTargets
    defaults: dict[str, Any] = Field(default_factory=dict)
    """Attributes every profile gets unless its own say otherwise."""
    attributes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per profile id: attributes for the template (first_name, push_subscribe, ...)."""

    @model_validator(mode="after")
    def _app_ids_are_ids(self) -> Self:
        if self.app_ids is not None and not all(_APP_ID.match(a) for a in self.app_ids):
            raise ValueError("app_ids: not an app id")
        return self


class DispatchMessage(BaseModel):
    """What every chunk needs of the request (`message.json`), without its targets."""

    template: PushTemplate
    campaign_id: str | None = None


class DispatchRejected(ValueError):
    """The request cannot be dispatched; `status` and `code` go to the caller."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class PlanMessage(BaseModel):
    dispatch_id: str


class ChunkMessage(BaseModel):
    dispatch_id: str
    chunk: int
    retry_key: str | None = None
    """Set for a retry round: the pushes of one slice the provider could not take then."""
    round: int = 0

    @property
    def key(self) -> str:
        return self.retry_key or _chunk_key(self.chunk)


class ChunkState(TableEntity):
    """Table `pushchunks`, PK the dispatch id: RK `chunk-00001` per chunk, `app-{id}` for
    an app stopped by a configuration error."""

    table_name: ClassVar[str] = "pushchunks"

    profiles: int = 0
    next_index: int = 0
    done: bool = False
    owner: str | None = None
    claimed_until: datetime | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    error: str | None = None


class DispatchKey(TableEntity):
    """Table `pushdispatchkeys`: a caller's `dispatch_key` -> the dispatch it started."""

    table_name: ClassVar[str] = "pushdispatchkeys"

    dispatch_id: str


def _chunk_key(chunk: int) -> str:
    return f"chunk-{chunk:05d}"


def _blob(dispatch_id: str, name: str) -> str:
    return f"{dispatch_id}/{name}"


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
            blobs.create(CONTAINER, _blob(run_id, name), data.encode())
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
    data = services.storage.blobs.read_versioned(CONTAINER, _blob(dispatch_id, "request.json"))
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
    blobs, name = services.storage.blobs, _blob(dispatch_id, "targets.json.gz")
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
        blobs.create(CONTAINER, _blob(dispatch_id, f"{_chunk_key(number)}.json.gz"), data,
                     overwrite=True)  # fmt: skip
        with contextlib.suppress(EntityExists):
            table.insert(ChunkState(partition_key=key, row_key=_chunk_key(number),
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
            CHUNK_QUEUE, ChunkMessage(dispatch_id=dispatch_id, chunk=number)
        )
    log.info("push dispatch planned", extra={"run_id": dispatch_id, "chunks": len(chunks),
                                             "profiles": len(profiles)})  # fmt: skip


# -- send ----------------------------------------------------------------------------


class ChunkRunner:
    """Sends one chunk: slices of profiles, checkpointed after each."""

    def __init__(self, services: Services, message: ChunkMessage, owner: str) -> None:
        self.services = services
        self.dispatch_id = message.dispatch_id
        self.chunk = message.chunk
        self.chunk_key = message.key
        self.round = message.round
        self.owner = owner
        self.table: EntityTable[ChunkState] = services.storage.tables.get(ChunkState)
        self.key = safe_key(message.dispatch_id)
        self.registry = TokenRegistry(services.storage)
        self.store = EventStore(services.storage)
        self.stopped: dict[str, str] = {}
        self.excluded: list[Exclusion] = []
        """This slice's profiles kept out by a rule (for the audit trail)."""
        """app id -> why it is stopped (configuration error), for this dispatch."""
        self.providers: dict[str, PushProvider] = {}
        self.message: DispatchMessage | None = None
        self.template: CompiledTemplate | None = None
        self.suppressed = SuppressionSnapshot({})
        # The owner renews its claim with every checkpoint (a slice takes seconds).
        self.claim_for = timedelta(seconds=services.settings.push_claim_seconds)

    # claim, checkpoint, stopped apps

    def claim(self) -> ChunkState | float | None:
        """Own the chunk: its state; None when it is done; the seconds a live owner's claim
        has left when another worker holds it."""
        now = datetime.now(UTC)
        busy_for = 0.0

        def take(current: ChunkState | None) -> ChunkState | None:
            nonlocal busy_for
            busy_for = 0.0
            if current is None or current.done:
                return None
            if current.claimed_until is not None and current.claimed_until > now:
                busy_for = (current.claimed_until - now).total_seconds()
                return None
            return current.model_copy(
                update={"owner": self.owner, "claimed_until": now + self.claim_for}
            )

        result = self.table.mutate(self.key, self.chunk_key, take)
        if busy_for:
            return busy_for
        if result is None or result.entity.done or result.entity.owner != self.owner:
            return None
        return result.entity

    def checkpoint(self, state: ChunkState, next_index: int, counts: Counter[str]) -> ChunkState:
        merged = Counter(state.counts)
        merged.update(counts)
        done = next_index >= state.profiles
        updated = state.model_copy(update={
            "next_index": next_index, "counts": dict(merged), "done": done,
            "claimed_until": None if done else datetime.now(UTC) + self.claim_for,
        })  # fmt: skip
        self.table.upsert(updated)  # the claim makes this worker the only writer
        return updated

    def stop_app(self, app_id: str, error: str) -> None:
        self.stopped[app_id] = error
        with contextlib.suppress(EntityExists):
            self.table.insert(
                ChunkState(partition_key=self.key, row_key=f"app-{app_id}", error=error)
            )
        log.error(
            "push app stopped for this dispatch by a configuration error",
            extra={"run_id": self.dispatch_id, "app_id": app_id, "error": error},
        )

    # the work

    def run(self) -> bool | float:
        """Send the chunk. True if it is finished (now or before); the seconds to wait
        when another worker's claim on it is still live."""
        state = self.claim()
        if isinstance(state, float):
            return state
        if state is None:
            found = self.table.get(self.key, self.chunk_key)
            return found is not None and found.entity.done
        stored = self.services.storage.blobs.read_versioned(
            CONTAINER, _blob(self.dispatch_id, "message.json")
        )
        if stored is None:
            raise LookupError(f"dispatch {self.dispatch_id} has no stored message")
        self.message = DispatchMessage.model_validate_json(stored[0])
        self.template = CompiledTemplate(self.message.template)
        name = _blob(self.dispatch_id, f"{self.chunk_key}.json.gz")
        data = self.services.storage.blobs.read_versioned(CONTAINER, name)
        if data is None:
            raise LookupError(f"dispatch {self.dispatch_id} {self.chunk_key} has no profiles")
        entries: list[list[Any]] = orjson.loads(gzip.decompress(data[0]))
        for row in self.table.query_partition(self.key, row_from="app-", row_before="app."):
            self.stopped[row.row_key.removeprefix("app-")] = row.error or "stopped"
        self.suppressed = SuppressionList(self.services.storage).snapshot((Channel.PUSH,))
        asyncio.run(self._send_all(state, entries))
        return True

    async def _send_all(self, state: ChunkState, entries: list[list[Any]]) -> None:
        assert self.message is not None
        run = self.services.runs.get(self.dispatch_id)
        wanted = set(run.detail.get("apps", [])) if run else set()
        apps = [a for a in self.services.syncs().push_apps if a.id in wanted]
        await self._open_providers(apps, self.message.template)
        try:
            while state.next_index < len(entries):
                end = min(len(entries), state.next_index + SLICE_PROFILES)
                counts = await self._send_slice(entries[state.next_index : end], state.next_index)
                state = self.checkpoint(state, end, counts)
            if not state.done:
                self.checkpoint(state, state.next_index, Counter())
        finally:
            for provider in self.providers.values():
                await provider.aclose()

    async def _open_providers(self, apps: list[PushApp], template: PushTemplate) -> None:
        for app in apps:
            if app.id in self.stopped:
                continue
            try:
                provider = provider_for(app, template, self.services.settings)
                await provider.validate()
            except ConfigError as exc:
                self.stop_app(app.id, str(exc))
                continue
            self.providers[app.id] = provider

    async def _send_slice(self, entries: list[list[Any]], first: int) -> Counter[str]:
        counts: Counter[str] = Counter()
        # A retry round counts only its pushes: its profiles were counted the first time.
        profile_counts = counts if self.round == 0 else Counter()
        devices = await asyncio.to_thread(self.registry.devices_of, [e[0] for e in entries])
        limit = asyncio.Semaphore(
            self.services.settings.push_concurrency * len(self.providers) or 1
        )
        attempts = []
        for profile_id, attributes, *only in entries:
            wanted = set(only[0]) if only else None  # a retry round: these tokens only
            for device, body in self._messages_for(
                profile_id, attributes, devices, profile_counts, wanted
            ):
                attempts.append(self._attempt(profile_id, device, body, limit))
        events = []
        dead: list[tuple[Device, SendOutcome]] = []
        later: dict[str, list[str]] = {}
        for profile_id, device, result in await asyncio.gather(*attempts):
            if result is None:
                counts["devices.skipped.app_stopped"] += 1
                continue
            counts["messages.retries"] += result.retries
            counts["messages.rate_limited_waits"] += result.rate_limited_waits
            if result.reason.startswith(_GAVE_UP) and self.round < RETRY_ROUNDS:
                later.setdefault(profile_id, []).append(device.token_hash)
                counts["messages.deferred"] += 1
                continue
            counts[f"messages.{result.status}"] += 1
            counts[f"apps.{device.app_id}.{result.status}"] += 1
            events.append(self._event(device, profile_id, result))
            if result.status == "dead_token":
                dead.append((device, result))
        excluded, self.excluded = self.excluded, []
        await asyncio.to_thread(self._record, events, dead, counts, first, excluded)
        if later:
            attributes_of = {entry[0]: entry[1] for entry in entries}
            retry = [[p, attributes_of[p], hashes] for p, hashes in later.items()]
            await asyncio.to_thread(self._defer, retry, first)
        return +counts  # drops zero counts

    def _defer(self, entries: list[list[Any]], first: int) -> None:
        """Pushes the providers would not take now (5xx or broken connections through every
        retry) become a chunk of their own, sent again after a growing delay. Its row is
        written before this slice's checkpoint, so the dispatch cannot finish without it."""
        key = f"{self.chunk_key}-r{self.round + 1}-{first:07d}"
        data = gzip.compress(orjson.dumps(entries), compresslevel=1)
        self.services.storage.blobs.create(CONTAINER, _blob(self.dispatch_id, f"{key}.json.gz"),
                                           data, overwrite=True)  # fmt: skip
        row = ChunkState(partition_key=self.key, row_key=key, profiles=len(entries))
        if self.table.get(self.key, key) is None:
            with contextlib.suppress(EntityExists):
                self.table.insert(row)
        delay = self.services.settings.push_retry_delay_seconds * 2**self.round
        message = ChunkMessage(dispatch_id=self.dispatch_id, chunk=self.chunk, retry_key=key,
                               round=self.round + 1)  # fmt: skip
        self.services.storage.queues.send(CHUNK_QUEUE, message, delay_seconds=delay)
        log.warning("push deferred to a later round", extra={
            "run_id": self.dispatch_id, "chunk": key, "profiles": len(entries),
        })  # fmt: skip

    def _messages_for(
        self, profile_id: str, attributes: dict[str, Any], devices: dict[str, list[Device]],
        counts: Counter[str], wanted: set[str] | None = None,
    ) -> list[tuple[Device, bytes]]:  # fmt: skip
        """The (device, body) pairs of one profile, after its skips are counted; `wanted`
        limits them to those token hashes."""
        assert self.template is not None
        counts["profiles"] += 1
        usable = [d for d in devices.get(profile_id, [])
                  if (d.app_id in self.providers or d.app_id in self.stopped)
                  and (wanted is None or d.token_hash in wanted)]  # fmt: skip
        reason = self._skip_reason(profile_id, attributes)
        if reason is None and not any(d.active and d.push_opt_in for d in usable):
            reason = "no_active_device"
        if reason is None:
            try:
                message = self.template.render({**attributes, "profile_id": profile_id})
            except ProfileSkipped as skipped:
                reason = skipped.reason
        if reason is not None:
            counts[f"profiles.skipped.{reason}"] += 1
            if reason in ("suppressed", "no_push_consent") and self.round == 0:
                found = self.suppressed.reason_for(Channel.PUSH, profile_id)
                rule = found.value if reason == "suppressed" and found else reason
                self.excluded.append(exclusion(profile_id, None, None, "suppressed", rule))
            return []
        counts["profiles.targeted"] += 1
        messages = []
        for device in usable:
            provider = self.providers.get(device.app_id)
            skip = ("inactive" if not device.active else "no_opt_in" if not device.push_opt_in
                    else "app_stopped" if provider is None else None)  # fmt: skip
            if skip is None and provider is not None:
                try:
                    messages.append((device, provider.encode(message, device)))
                except ProfileSkipped as skipped:
                    skip = skipped.reason
            if skip is not None:
                counts[f"devices.skipped.{skip}"] += 1
        return messages

    def _skip_reason(self, profile_id: str, attributes: dict[str, Any]) -> str | None:
        if self.suppressed.reason_for(Channel.PUSH, profile_id) is not None:
            return "suppressed"
        consent = attributes.get("push_subscribe")
        if consent is not None and str(consent).strip().lower() in _UNSUBSCRIBED:
            return "no_push_consent"
        return None

    async def _attempt(
        self, profile_id: str, device: Device, body: bytes, limit: asyncio.Semaphore
    ) -> tuple[str, Device, SendOutcome | None]:
        """One push; None when its app was stopped before or by it."""
        async with limit:
            if device.app_id in self.stopped:
                return profile_id, device, None
            try:
                return profile_id, device, await self.providers[device.app_id].send(device, body)
            except ConfigError as exc:
                if device.app_id not in self.stopped:
                    self.stop_app(device.app_id, str(exc))
                return profile_id, device, None
            except TransientError as exc:
                outcome = SendOutcome("failed", reason=f"{_GAVE_UP}{str(exc)[:160]}")
                return profile_id, device, outcome

    def _record(self, events: list[dict[str, Any]], dead: list[tuple[Device, SendOutcome]],
                counts: Counter[str], first: int, excluded: list[Exclusion]) -> None:  # fmt: skip
        """Store a slice's events (one segment), the profiles it kept out (the audit trail)
        and switch its dead tokens off."""
        if excluded:
            AuditLog(self.services.storage).record("push", self.dispatch_id, excluded)
        if events:
            segment = f"push-{self.dispatch_id}-{self.chunk_key}-{first:07d}"
            writer = self.store.writer(SOURCE, segment)
            for event in events:
                writer.add(event)
            writer.place()
        for device, outcome in dead:
            gone = (datetime.fromtimestamp(outcome.unregistered_at_ms / 1000, UTC)
                    if outcome.unregistered_at_ms else None)  # fmt: skip
            if self.registry.deactivate(device.app_id, device.token_hash, outcome.reason,
                                        unregistered_at=gone):  # fmt: skip
                counts["devices.deactivated"] += 1

    def _event(self, device: Device, profile_id: str, outcome: SendOutcome) -> dict[str, Any]:
        assert self.message is not None
        kind, event_type = _EVENT_KINDS[outcome.status]
        event: dict[str, Any] = {
            # One event per dispatch and device: a resent slice finds its events again.
            "event_id": f"push:{self.dispatch_id}:{device.app_id}:{device.token_hash[:32]}",
            "source": SOURCE,
            "source_type": f"push.{kind}",
            "type": event_type.value,
            "channel": EventChannel.PUSH.value,
            "occurred_at": epoch_millis(datetime.now(UTC)),
            "external_id": profile_id,
            "app_id": device.app_id,
            "platform": device.platform,
            "dispatch_id": self.dispatch_id,
            "raw": {"token_hash": device.token_hash},
        }
        if self.message.campaign_id:
            event["campaign_id"] = self.message.campaign_id
        if outcome.message_id:
            event["send_id"] = outcome.message_id
        if outcome.reason:
            event["bounce_reason"] = outcome.reason
        return event


_EVENT_KINDS = {
    "sent": ("sent", EventType.SENT),
    "dead_token": ("bounced", EventType.BOUNCED_HARD),
    "failed": ("failed", EventType.DELIVERY_FAILED),
}


def run_chunk(services: Services, message: ChunkMessage) -> None:
    """Queue worker: send one chunk, then close the dispatch if it was the last one.

    A chunk another worker claimed (a redelivery while the first still runs, or after it
    died) is looked at again once that claim expires: the first finishes it, or the
    later look takes over at its checkpoint."""
    owner = f"{message.chunk}-{secrets.token_hex(4)}"
    try:
        result = ChunkRunner(services, message, owner).run()
    except LookupError as exc:  # its stored profiles or message are gone: not retryable
        services.runs.finish(message.dispatch_id, RunStatus.FAILED, error=f"{message.key}: {exc}")
        return
    if result is True:
        finish_if_complete(services, message.dispatch_id)
    elif isinstance(result, float):
        delay = min(int(result) + 1, 3600)
        services.storage.queues.send(CHUNK_QUEUE, message, delay_seconds=delay)
        idle = datetime.now(UTC) + timedelta(seconds=delay)
        services.runs.heartbeat(message.dispatch_id, idle_until=idle)  # waits on purpose


def chunk_poisoned(services: Services, body: bytes, kept: str) -> list[RunRecord]:
    """A chunk message the host gave up on: the chunk's profiles not sent yet are lost
    (counted `lost`); the dispatch ends once its other chunks are done, partially failed."""
    message = ChunkMessage.model_validate_json(body)
    table: EntityTable[ChunkState] = services.storage.tables.get(ChunkState)
    reason, _ = poison_detail(services, message.dispatch_id, f"{CHUNK_QUEUE}-poison", kept)

    def lose(current: ChunkState | None) -> ChunkState | None:
        if current is None or current.done:
            return None
        lost = max(current.profiles - current.next_index, 0)
        counts = {**current.counts, "lost": current.counts.get("lost", 0) + lost}
        return current.model_copy(update={"done": True, "counts": counts, "error": reason})

    table.mutate(safe_key(message.dispatch_id), message.key, lose)
    services.runs.attempt_failed(message.dispatch_id, "poisoned", f"{message.key}: {reason}")
    run = finish_if_complete(services, message.dispatch_id)
    return [run] if run is not None else []


def retry_dispatch(services: Services, run: RunRecord) -> None:
    """An operator's retry (core/retries.py): planned again if it never was; else each
    chunk not finished, or poisoned, is queued again and resumes at its checkpoint."""
    dispatch_id = run.run_id
    if not run.detail.get("chunks"):
        services.storage.queues.send(PLAN_QUEUE, PlanMessage(dispatch_id=dispatch_id))
        return
    table: EntityTable[ChunkState] = services.storage.tables.get(ChunkState)
    queued = []
    for row in _chunk_rows(services, dispatch_id):
        if not row.row_key.startswith("chunk-") or (row.done and not row.counts.get("lost")):
            continue
        counts = {name: value for name, value in row.counts.items() if name != "lost"}
        table.upsert(row.model_copy(update={"done": False, "error": None, "counts": counts,
                                            "claimed_until": None}))  # fmt: skip
        queued.append(int(row.row_key.removeprefix("chunk-")))
    services.runs.update(dispatch_id, lambda r: setattr(r, "status", RunStatus.RUNNING))
    for chunk in queued:
        services.storage.queues.send(
            CHUNK_QUEUE, ChunkMessage(dispatch_id=dispatch_id, chunk=chunk)
        )
    if not queued:
        finish_if_complete(services, dispatch_id)


def run_of_dispatch(dispatch_id: str) -> RunRef:
    return RunRef(dispatch_id, RunKind.PUSH_DISPATCH, "push dispatch")


def _chunk_rows(services: Services, dispatch_id: str) -> list[ChunkState]:
    table: EntityTable[ChunkState] = services.storage.tables.get(ChunkState)
    return list(table.query_partition(safe_key(dispatch_id)))


def _summary(rows: list[ChunkState]) -> tuple[Counter[str], dict[str, str], int, int]:
    counts: Counter[str] = Counter()
    stopped: dict[str, str] = {}
    chunks = done = 0
    for row in rows:
        if row.row_key.startswith("app-"):
            stopped[row.row_key.removeprefix("app-")] = row.error or "stopped"
            continue
        chunks += 1
        done += row.done
        counts.update(row.counts)
    return counts, stopped, chunks, done


def finish_if_complete(services: Services, dispatch_id: str) -> RunRecord | None:
    run = services.runs.get(dispatch_id)
    if run is None or run.status.ended:
        return run
    counts, stopped, chunks, done = _summary(_chunk_rows(services, dispatch_id))
    if chunks < int(run.detail.get("chunks", 0)) or done < chunks:
        return run
    apps = list(run.detail.get("apps", []))
    every_app_stopped = bool(apps) and all(a in stopped for a in apps)
    status, code = RunStatus.SUCCEEDED, None
    if every_app_stopped:
        status, code = RunStatus.FAILED, "apps_stopped"
    elif counts.get("lost"):  # a poisoned chunk's profiles
        status, code = RunStatus.PARTIALLY_FAILED, "poisoned"
    errors = [f"{a}: {e}" for a, e in stopped.items()]
    if code == "poisoned":
        errors.append(f"{counts['lost']} profiles were not sent: a chunk was poisoned")
    return services.runs.finish(
        dispatch_id,
        status,
        counts=dict(counts),
        detail={"stopped_apps": stopped} if stopped else None,
        error="; ".join(errors) or None,
        error_code=code,
    )


def status(services: Services, dispatch_id: str) -> dict[str, Any] | None:
    """A dispatch as the status route shows it: the run, with live counts while it runs."""
    run = services.runs.get(dispatch_id)
    if run is None or run.kind != RunKind.PUSH_DISPATCH:
        return None
    counts, stopped, chunks, done = _summary(_chunk_rows(services, dispatch_id))
    answer = run.public()
    answer["dispatch_id"] = dispatch_id
    if not run.status.ended:
        answer["counts"] = dict(counts)
    answer["chunks"] = {"total": max(chunks, int(run.detail.get("chunks", 0))), "done": done}
    answer["stopped_apps"] = stopped
    return answer
