"""Sends one push chunk (queue `push-chunks`): slices of profiles, checkpointed after each,
and a chunk that was poisoned; the rules are in core/push/dispatch.py's docstring."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import secrets
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from core.audit import AuditLog, Exclusion, exclusion
from core.errors import ConfigError, EntityExists, TransientError
from core.events.model import EventChannel, EventType, epoch_millis
from core.events.store import EventStore
from core.push.apps import PushApp
from core.push.dispatch_model import (
    CONTAINER,
    GAVE_UP,
    PUSH_CHUNK_QUEUE,
    RETRY_ROUNDS,
    SLICE_PROFILES,
    SOURCE,
    ChunkState,
    DispatchMessage,
    PushChunkMessage,
    blob_path,
)
from core.push.dispatch_status import finish_if_complete
from core.push.outcome import SendOutcome
from core.push.provider import PushProvider, provider_for
from core.push.templates import CompiledTemplate, ProfileSkipped, PushTemplate
from core.push.tokens import Device, TokenRegistry
from core.runs import RunRecord, RunStatus
from core.services import Services
from core.storage.tables import EntityTable, safe_key
from core.suppression import Channel, SuppressionList, SuppressionSnapshot
from core.verdicts import poison_detail

log = logging.getLogger(__name__)
_UNSUBSCRIBED = {"unsubscribed", "false", "0", "no"}


# -- send ----------------------------------------------------------------------------


class PushChunkRunner:
    """Sends one chunk: slices of profiles, checkpointed after each."""

    def __init__(self, services: Services, message: PushChunkMessage, owner: str) -> None:
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
            CONTAINER, blob_path(self.dispatch_id, "message.json")
        )
        if stored is None:
            raise LookupError(f"dispatch {self.dispatch_id} has no stored message")
        self.message = DispatchMessage.model_validate_json(stored[0])
        self.template = CompiledTemplate(self.message.template)
        name = blob_path(self.dispatch_id, f"{self.chunk_key}.json.gz")
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
            if result.reason.startswith(GAVE_UP) and self.round < RETRY_ROUNDS:
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
        self.services.storage.blobs.create(CONTAINER, blob_path(self.dispatch_id, f"{key}.json.gz"),
                                           data, overwrite=True)  # fmt: skip
        row = ChunkState(partition_key=self.key, row_key=key, profiles=len(entries))
        if self.table.get(self.key, key) is None:
            with contextlib.suppress(EntityExists):
                self.table.insert(row)
        delay = self.services.settings.push_retry_delay_seconds * 2**self.round
        message = PushChunkMessage(dispatch_id=self.dispatch_id, chunk=self.chunk, retry_key=key,
                               round=self.round + 1)  # fmt: skip
        self.services.storage.queues.send(PUSH_CHUNK_QUEUE, message, delay_seconds=delay)
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
                outcome = SendOutcome("failed", reason=f"{GAVE_UP}{str(exc)[:160]}")
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


def run_chunk(services: Services, message: PushChunkMessage) -> None:
    """Queue worker: send one chunk, then close the dispatch if it was the last one.

    A chunk another worker claimed (a redelivery while the first still runs, or after it
    died) is looked at again once that claim expires: the first finishes it, or the
    later look takes over at its checkpoint."""
    owner = f"{message.chunk}-{secrets.token_hex(4)}"
    try:
        result = PushChunkRunner(services, message, owner).run()
    except LookupError as exc:  # its stored profiles or message are gone: not retryable
        services.runs.finish(message.dispatch_id, RunStatus.FAILED, error=f"{message.key}: {exc}")
        return
    if result is True:
        finish_if_complete(services, message.dispatch_id)
    elif isinstance(result, float):
        delay = min(int(result) + 1, 3600)
        services.storage.queues.send(PUSH_CHUNK_QUEUE, message, delay_seconds=delay)
        idle = datetime.now(UTC) + timedelta(seconds=delay)
        services.runs.heartbeat(message.dispatch_id, idle_until=idle)  # waits on purpose


def chunk_poisoned(services: Services, body: bytes, kept: str) -> list[RunRecord]:
    """A chunk message the host gave up on: the chunk's profiles not sent yet are lost
    (counted `lost`); the dispatch ends once its other chunks are done, partially failed."""
    message = PushChunkMessage.model_validate_json(body)
    table: EntityTable[ChunkState] = services.storage.tables.get(ChunkState)
    reason, _ = poison_detail(services, message.dispatch_id, f"{PUSH_CHUNK_QUEUE}-poison", kept)

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
