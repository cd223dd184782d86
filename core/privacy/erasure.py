"""Erasure (GDPR Art. 17): a person's data taken out of every store Switchboard keeps.

    POST /api/privacy/erasure -> run (kind privacy_erasure) -> queue `privacy-erasures`
      -> worker: wait while segment syncs or push dispatches run
         -> sync delta state (core/sync/state_erasure.py)
         -> push devices and tokens
         -> stored events (core/events/event_erasure.py)
         -> files: rejects, previews, exports, quarantine, dispatch lists, kept poison
            messages (records taken out, core/privacy/scrub.py); landed segment files,
            work files and kept webhook deliveries that hold them are deleted (a segment
            file rewritten would land again)
         -> tables: run results' kept rejects, run details; the audit trail's records
         -> suppression entries keep their hash only (the masked hint goes), so the
            person is still never messaged
      -> the run records what was removed, and the identifiers by hash only.

The identifiers travel in the queue message only (deleted once handled; a poisoned one is
not kept, see core/verdicts.py).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote_to_bytes

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.audit import AuditLog
from core.errors import ConcurrencyConflict, LeaseUnavailable
from core.events.event_erasure import erase_events
from core.events.store import EVENTS_CONTAINER, EventStore
from core.privacy.person import Matcher, Person
from core.privacy.scrub import scrub_file, scrub_text
from core.push.tokens import ProfileDevices, PushToken, profile_partition
from core.runs import RunKind, RunRecord, RunStatus
from core.services import Services
from core.storage.blobs import BlobStore
from core.storage.tables import EntityTable, safe_key
from core.suppression import Channel, Suppression, address_hash
from core.sync.state import STATE_CONTAINER
from core.sync.state_erasure import erase_from_states
from core.webhooks.deliveries import WEBHOOKS_CONTAINER
from core.webhooks.processing import BATCHER_LEASE, PendingDelivery

log = logging.getLogger(__name__)
ERASURE_QUEUE = "privacy-erasures"
_ALIVE = timedelta(minutes=15)
"""A run with no sign of life for this long is not waited for (a lost one: the sweeper
ends it); nor is one waiting on purpose (a manifest's parts)."""
# Containers whose blobs are deleted whole when they hold the person: a landed segment file
# (rewritten, it would land again as a new file), a run's work files and kept webhook
# deliveries (a provider's exact bytes, read by their provider only).
_DELETED_WHOLE = frozenset({"segments", "sync-work", WEBHOOKS_CONTAINER})
# Handled by their own stores (above), or holding no personal data of their own.
_NOT_SCRUBBED = frozenset({STATE_CONTAINER, EVENTS_CONTAINER, "azure-webjobs-hosts",
                           "azure-webjobs-secrets"})  # fmt: skip
_BUSY_KINDS = (RunKind.SEGMENT_SYNC, RunKind.PUSH_DISPATCH)
_LEASE_WAIT_SECONDS = 90


class ErasureRequest(BaseModel):
    """The route's body: at least one identifier, each as the CDP or ESP knows it."""

    model_config = ConfigDict(extra="forbid")

    profile_ids: list[str] = Field(default_factory=list, max_length=50)
    emails: list[str] = Field(default_factory=list, max_length=50)
    phones: list[str] = Field(default_factory=list, max_length=50)
    reference: str = Field(
        default="", max_length=200, description="the requester's own id of the request"
    )

    @model_validator(mode="after")
    def _something(self) -> ErasureRequest:
        if not (self.profile_ids or self.emails or self.phones):
            raise ValueError("give at least one of profile_ids, emails or phones")
        return self

    def person(self) -> Person:
        """ValueError for an address that is not one."""
        return Person.of(profile_ids=self.profile_ids, emails=self.emails, phones=self.phones)


class ErasureMessage(BaseModel):
    run_id: str
    request: ErasureRequest
    waits: int = 0


def request_erasure(services: Services, request: ErasureRequest) -> RunRecord:
    """Record the request (identifiers by hash only) and queue its work."""
    person = request.person()
    run = services.runs.start(
        RunKind.PRIVACY_ERASURE, status=RunStatus.RECEIVED, source="POST /api/privacy/erasure",
        detail={"subjects": person.hashes(), "reference": request.reference},
    )  # fmt: skip
    services.storage.queues.send(ERASURE_QUEUE, ErasureMessage(run_id=run.run_id, request=request))
    log.info("erasure requested", extra={"run_id": run.run_id})
    return run


def run_erasure(services: Services, message: ErasureMessage) -> RunRecord | None:
    """Queue worker: the erasure, once no run that writes the same stores is under way."""
    run = services.runs.get(message.run_id)
    if run is None or run.status.ended:
        return run
    settings = services.settings
    busy = _runs_under_way(services, datetime.now(UTC))
    waited = message.waits * settings.erasure_wait_seconds
    if busy and waited < settings.erasure_max_wait_seconds:
        later = message.model_copy(update={"waits": message.waits + 1})
        pause = settings.erasure_wait_seconds
        services.storage.queues.send(ERASURE_QUEUE, later, delay_seconds=pause)
        until = datetime.now(UTC) + timedelta(seconds=2 * pause)

        def waiting(record: RunRecord) -> None:
            record.status, record.idle_until = RunStatus.RUNNING, until
            record.detail = {**record.detail, "waiting_for_runs": busy[:20]}

        return services.runs.update(run.run_id, waiting)
    services.runs.update(run.run_id, lambda r: setattr(r, "status", RunStatus.RUNNING))
    person = message.request.person()
    counts = erase(services, person, run.run_id)
    return services.runs.finish(
        run.run_id, RunStatus.SUCCEEDED, counts=dict(sorted(counts.items())),
        detail={"waiting_for_runs": None, "waited": message.waits},
    )  # fmt: skip


def _runs_under_way(services: Services, now: datetime) -> list[str]:
    """Segment syncs and push dispatches that may be writing the stores an erasure rewrites
    (a run after a request goes ahead once these are done, or once the wait is over: one
    that read state before the erasure fails at its commit and is retried)."""
    busy = []
    for run in services.runs.open_runs(now=now):
        if run.kind not in _BUSY_KINDS or run.status != RunStatus.RUNNING:
            continue
        if run.idle_until is not None and run.idle_until > now:
            continue
        alive = max(t for t in (run.started_at, run.updated_at) if t is not None)
        if now - alive < _ALIVE:
            busy.append(run.run_id)
    return busy


def erase(services: Services, person: Person, run_id: str) -> Counter[str]:
    """Every step; what each removed. Safe to repeat (a retried message finds less)."""
    storage = services.storage
    matcher = person.matcher()
    counts: Counter[str] = Counter()
    counts.update(erase_from_states(storage, matcher, run_id))
    counts.update(_push_registrations(services, person))
    counts.update(_pending_webhook_events(services, matcher))
    counts.update(erase_events(EventStore(storage), matcher))
    counts.update(_files(services, matcher))
    counts.update(_tables(services, matcher))
    audit = AuditLog(storage)
    counts["audit.records"] += sum(audit.forget(kind, value) for kind, value in person.subjects())
    counts["suppressions.hints_erased"] += _suppression_hints(services, person)
    log.info("erasure done", extra={"run_id": run_id, **counts})
    return counts


def _push_registrations(services: Services, person: Person) -> Counter[str]:
    """A profile's devices, and the token rows that point at it (found through them)."""
    counts: Counter[str] = Counter()
    tables = services.storage.tables
    devices: EntityTable[ProfileDevices] = tables.get(ProfileDevices)
    tokens: EntityTable[PushToken] = tables.get(PushToken)
    for profile_id in sorted(person.profile_ids):
        found = devices.get(profile_partition(profile_id), safe_key(profile_id))
        if found is None:
            continue
        for device in found.entity.devices.items:
            token = tokens.get(device.app_id, device.token_hash)
            if token is not None and token.entity.profile_id == profile_id:
                tokens.delete(device.app_id, device.token_hash)
                counts["push.tokens"] += 1
        devices.delete(found.entity.partition_key, found.entity.row_key)
        counts["push.profiles"] += 1
    return counts


def _files(services: Services, matcher: Matcher) -> Counter[str]:
    """Every other container's files: records about the person taken out, or (landed and
    work files, and files that cannot be read by record) the file deleted."""
    counts: Counter[str] = Counter()
    blobs = services.storage.blobs
    for container in sorted(blobs.containers()):
        if container in _NOT_SCRUBBED:
            continue
        for ref in list(blobs.list(container)):
            for attempt in range(_ATTEMPTS):
                try:
                    counts.update(_file(blobs, container, ref.name, matcher))
                    break
                except ConcurrencyConflict:  # written meanwhile: read it again
                    if attempt == _ATTEMPTS - 1:
                        raise
    return counts


_ATTEMPTS = 3


def _file(blobs: BlobStore, container: str, name: str, matcher: Matcher) -> Counter[str]:
    found = blobs.read_versioned(container, name)
    if found is None:
        return Counter()  # gone meanwhile
    data, etag = found
    if container == WEBHOOKS_CONTAINER:  # form bodies (Twilio) carry numbers URL-encoded
        data += b"\n" + unquote_to_bytes(data.replace(b"+", b" "))
    scrubbed = scrub_file(name, data, matcher)
    if scrubbed is None:
        return Counter()
    if container in _DELETED_WHOLE or scrubbed.data is None:
        blobs.delete(container, name)
        return Counter({f"files.{container}.deleted": 1})
    blobs.write_versioned(container, name, scrubbed.data, etag)
    return Counter({f"files.{container}.records": scrubbed.removed})


def _pending_webhook_events(services: Services, matcher: Matcher) -> Counter[str]:
    """Webhook events waiting for their batch, scrubbed while no batch is in flight (the
    batcher's lease held): a batch that took them before would store them after the
    event store was erased. Batches before the lease are stored by then, and erased next."""
    deadline = time.monotonic() + _LEASE_WAIT_SECONDS
    while True:
        try:
            with services.storage.blobs.lease(WEBHOOKS_CONTAINER, BATCHER_LEASE, seconds=60):
                return _scrub_table(services, PendingDelivery, matcher)
        except LeaseUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # a batch holds it for seconds; the message is retried if not


def _tables(services: Services, matcher: Matcher) -> Counter[str]:
    """Text properties of tables that may quote rows (kept rejects, run details, webhook
    events waiting for their batch)."""
    from core.runs import RunRecord as Runs
    from core.sync.service import BucketResult

    counts: Counter[str] = Counter()
    for model in (BucketResult, Runs, PendingDelivery):
        counts.update(_scrub_table(services, model, matcher))
    return counts


def _scrub_table(services: Services, model: Any, matcher: Matcher) -> Counter[str]:
    counts: Counter[str] = Counter()
    table: EntityTable[Any] = services.storage.tables.get(model)
    for row in list(table.query("")):
        if _scrub_entity(row, matcher) is None:
            continue

        def scrubbed(current: Any) -> Any:  # read again: a run may be writing it
            changed = None if current is None else _scrub_entity(current, matcher)
            return None if changed is None else current.model_validate(changed)

        table.mutate(row.partition_key, row.row_key, scrubbed)
        counts[f"tables.{model.table_name}"] += 1
    return counts


def _scrub_entity(row: BaseModel, matcher: Matcher) -> dict[str, Any] | None:
    data = row.model_dump()
    if not matcher.in_value(data):
        return None
    for name, value in data.items():
        if name in ("partition_key", "row_key"):
            continue
        if isinstance(value, str) and matcher.in_text(value):
            data[name] = scrub_text(value, matcher)[0]
        elif isinstance(value, dict | list) and matcher.in_value(value):
            data[name] = _without(value, matcher)
    return data


def _without(value: Any, matcher: Matcher) -> Any:
    if isinstance(value, list):
        return [_without(v, matcher) for v in value if not matcher.in_value(v)]
    if isinstance(value, dict):
        return {k: _without(v, matcher) for k, v in value.items() if not matcher.in_text(str(k))}
    if isinstance(value, str) and matcher.in_text(value):
        return scrub_text(value, matcher)[0]
    return value


def _suppression_hints(services: Services, person: Person) -> int:
    """The person stays suppressed, by hash only: the masked hint goes."""
    table: EntityTable[Suppression] = services.storage.tables.get(Suppression)
    erased = 0
    for channel, values in ((Channel.EMAIL, person.emails), (Channel.PHONE, person.phones),
                            (Channel.PUSH, person.profile_ids)):  # fmt: skip
        for value in values:
            prefix = address_hash(value)
            for row in list(
                table.query_partition(channel.value, row_from=f"{prefix}:", row_before=f"{prefix};")
            ):
                if _hinted(row):
                    table.mutate(row.partition_key, row.row_key, _unhinted)
                    erased += 1
    return erased


def _hinted(row: Suppression) -> bool:
    return bool(row.hint) or row.source.startswith("operator: ")


def _unhinted(current: Suppression | None) -> Suppression | None:
    """The entry as it is now, without its hint (read again: ingestion may be writing it)."""
    if current is None or not _hinted(current):
        return None
    return current.model_copy(update={"hint": "", "source": current.source.split(":", 1)[0]})
