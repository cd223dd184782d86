"""The four-hourly log export: engagement events back to the CDP, each window once.

Past 500 lines because the window loop, its guard (watermark and four-hour slot) and
the manifest-last write are one set of ordering rules; the records (xdm.py), the quarantine
books (quarantine.py) and the targets (aep.py) live apart.

    claim the watermark (ETag) -> for each complete window after it, in order:
        seal its ingestion hours -> read its events -> broadLog and trackingLog files
        -> quarantine states -> non-deliverable addresses file -> manifest (last)
        -> advance the watermark
    -> release

Windows are aligned four-hour ranges of ingestion time (00-04, 04-08, ... UTC). Output names
are deterministic, so a retried window rewrites the same files; the manifest is written
after its files, and the watermark moves only after the manifest. The guard: at most one
export per four-hour slot (a forced operator run may break it; it never exports a window
that is not complete or twice in one run).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import orjson
from isal import isal_zlib

from core.errors import ConcurrencyConflict, ConfigError
from core.events.model import EventType, epoch_millis
from core.events.store import EventStore, hour_start
from core.export.aep import AepStreamingClient, AepStreamingWriter
from core.export.preferences import (
    PREFERENCE_EVENT_TYPES,
    PREFERENCES,
    ProfilePreferences,
    note_preference,
    preference_records,
)
from core.export.quarantine import (
    ADDRESS_EVENT_TYPES,
    AddressState,
    QuarantineBook,
    TouchedAddress,
    address_event,
    address_key,
    relevant,
    with_errors_key,
)
from core.export.xdm import (
    BROADLOG,
    NON_DELIVERABLE,
    TRACKINGLOG,
    NotableEvents,
    XdmOptions,
    identity_map,
    iso,
    record_id,
    segment_lines,
)
from core.runs import RunKind, RunRecord, RunStatus
from core.services import Services
from core.settings import Settings
from core.storage import Storage
from core.storage.tables import TableEntity
from core.verdicts import verdict_on_failure

log = logging.getLogger(__name__)
WINDOW = timedelta(hours=4)
_FLUSH_BYTES = 1 << 20
_GZIP_LEVEL = 1
"""Fast: XDM JSON is repetitive enough that level 1 keeps most of level 6's ratio."""
_SLICE_EVENTS = 2_000
"""Events parsed and written at a time: a segment may hold 100,000 (memory stays flat)."""
SCHEMAS = {
    BROADLOG: "https://switchboard.dev/schemas/xdm/broadlog.schema.json",
    TRACKINGLOG: "https://switchboard.dev/schemas/xdm/trackinglog.schema.json",
    NON_DELIVERABLE: "https://switchboard.dev/schemas/xdm/non-deliverable-address.schema.json",
    PREFERENCES: "https://switchboard.dev/schemas/xdm/profile-preferences.schema.json",
}


def _streaming_client(settings: Settings) -> AepStreamingClient:
    assert settings.aep_streaming is not None  # guaranteed by the settings' validation
    token, key = settings.aep_access_token, settings.aep_api_key
    return AepStreamingClient(
        settings.aep_streaming,
        access_token=token.get_secret_value() if token else None,
        api_key=key.get_secret_value() if key else None,
    )


def window_floor(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return moment.replace(hour=moment.hour - moment.hour % 4, minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class Window:
    start: datetime

    @property
    def end(self) -> datetime:
        return self.start + WINDOW

    @property
    def label(self) -> str:
        return f"{self.start:%Y%m%dT%H%MZ}_{self.end:%Y%m%dT%H%MZ}"

    def blob_name(self, log_name: str, suffix: str = ".jsonl.gz") -> str:
        return f"{log_name}/{self.start:%Y/%m/%d}/{log_name}_{self.label}{suffix}"

    @property
    def manifest_name(self) -> str:
        return self.blob_name("manifest", ".json")


class ExportWatermark(TableEntity):
    """Table `exportwatermarks`: PK the export container, RK `watermark`."""

    table_name: ClassVar[str] = "exportwatermarks"

    exported_through: datetime | None = None
    """End of the last window whose files and manifest are written."""
    last_slot: datetime | None = None
    """Start of the four-hour slot of the last (unforced) export run: the guard."""
    lease_owner: str | None = None
    lease_until: datetime | None = None


@dataclass(frozen=True)
class ExportSettings:
    container: str
    xdm: XdmOptions
    soft_threshold: int
    start: datetime | None = None
    """No window before this one is exported (None: from the oldest stored event's)."""
    lease: timedelta = timedelta(minutes=15)
    """How long a run owns the watermark without progress; then another run may take over."""
    streaming: AepStreamingClient | None = None
    """Set: records go to AEP streaming ingestion instead of files (the manifest stays)."""
    preferences: bool = False
    """Also export the profile preferences (consent per channel) file."""
    native_records: bool = True
    """broadLog/trackingLog records by the C speedups when built (else the reference)."""

    def open_log(
        self, storage: Storage, window: Window, log_name: str
    ) -> LogFile | AepStreamingWriter:
        if self.streaming is not None:
            if log_name not in self.streaming.target.logs:
                raise ConfigError(f"SWITCHBOARD_AEP_STREAMING names no dataset for {log_name}")
            return AepStreamingWriter(self.streaming, log_name, SCHEMAS[log_name])
        return LogFile(storage, self.container, window.blob_name(log_name), log_name)

    @classmethod
    def of(cls, services: Services) -> ExportSettings:
        settings = services.settings
        return cls(
            container=settings.export_container,
            xdm=XdmOptions(settings.xdm_tenant, settings.export_profile_namespace),
            soft_threshold=settings.quarantine_soft_threshold,
            start=settings.export_start,
            lease=timedelta(seconds=settings.export_lease_seconds),
            preferences=settings.export_preferences,
            native_records=settings.export_native_records,
            streaming=_streaming_client(settings)
            if settings.export_target == "aep_streaming"
            else None,
        )


class LogFile:
    """One gzip JSON Lines output file; counts and checksums it.

    Records are serialised on the caller's thread; compressing, hashing and uploading
    happen on a thread of the file's own (isal and hashlib release the GIL), so they
    overlap with building the next records instead of adding to them. Compression is
    ISA-L's deflate (python-isal): gzip like zlib's, about five times faster at level 1.
    """

    def __init__(self, storage: Storage, container: str, name: str, log_name: str) -> None:
        self.name, self.log_name = name, log_name
        self._writer = storage.blobs.writer(
            container, name, overwrite=True, content_type="application/x-ndjson",
            block_bytes=_FLUSH_BYTES,
        )  # fmt: skip
        # The gzip header has no time or name: the same records give the same bytes.
        self._gzip = isal_zlib.compressobj(_GZIP_LEVEL, isal_zlib.DEFLATED, 31)
        self._buffer = bytearray()
        self._sha256 = hashlib.sha256()
        self._pending: Future[None] | None = None
        self._pool = ThreadPoolExecutor(1)
        self.records = 0
        self.bytes = 0

    def write(self, record: dict[str, Any]) -> None:
        self.write_lines(orjson.dumps(record) + b"\n", 1)

    def write_lines(self, lines: bytes, count: int) -> None:
        """`count` records as JSON lines, each ending in a newline."""
        self._buffer += lines
        self.records += count
        if len(self._buffer) >= _FLUSH_BYTES:
            self._hand_over(bytes(self._buffer), final=False)
            self._buffer.clear()

    def _hand_over(self, data: bytes, *, final: bool) -> None:
        if self._pending is not None:
            self._pending.result()  # one chunk in flight: memory stays bounded
        self._pending = self._pool.submit(self._compress_and_send, data, final)

    def _compress_and_send(self, data: bytes, final: bool) -> None:
        compressed = self._gzip.compress(data) + (self._gzip.flush() if final else b"")
        self._sha256.update(compressed)
        self.bytes += len(compressed)
        self._writer.write(compressed)

    def close(self) -> dict[str, Any]:
        self._hand_over(bytes(self._buffer), final=True)
        self._buffer.clear()
        assert self._pending is not None
        self._pending.result()
        self._pool.shutdown()
        self._writer.close()
        return {
            "log": self.log_name,
            "name": self.name,
            "records": self.records,
            "bytes": self.bytes,
            "sha256": self._sha256.hexdigest(),
            "schema": SCHEMAS[self.log_name],
        }


@dataclass
class WindowResult:
    window: Window
    manifest: dict[str, Any]
    events_read: int = 0
    segments: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def export_window(
    services: Services, window: Window, options: ExportSettings, store: EventStore | None = None
) -> WindowResult:
    """Write one window's three files and its manifest (same names and bytes every time)."""
    store = store or EventStore(services.storage)
    storage = services.storage
    store.seal(window.start, window.end)  # nothing may land in these hours any more
    book = QuarantineBook(storage, options.soft_threshold)
    with_errors = book.with_errors(window.start)
    broadlog = options.open_log(storage, window, BROADLOG)
    tracking = options.open_log(storage, window, TRACKINGLOG)
    touched: dict[tuple[str, str], TouchedAddress] = {}
    result = WindowResult(window, {})
    xdm = options.xdm
    profiles: dict[str, ProfilePreferences] | None = {} if options.preferences else None
    with _no_cyclic_gc():  # the reference path makes millions of acyclic dicts: gc only costs
        _write_logs(
            store, window, options, (broadlog, tracking), touched, with_errors, result, profiles
        )
    files = [broadlog.close(), tracking.close()]
    states = book.apply_window(window.start, touched.values())
    addresses = options.open_log(storage, window, NON_DELIVERABLE)
    for item, state in states:
        addresses.write(non_deliverable_record(item, state, xdm))
    files.append(addresses.close())
    if profiles is not None:
        preferences = options.open_log(storage, window, PREFERENCES)
        for record in preference_records(profiles, xdm):
            preferences.write(record)
        files.append(preferences.close())
    result.manifest = {
        "window": {"start": iso(epoch_millis(window.start)), "end": iso(epoch_millis(window.end))},
        "files": files,
        "events_read": result.events_read,
        "segments": result.segments,
        "format": "XDM ExperienceEvent, UTF-8 JSON Lines, gzip",
    }
    manifest = orjson.dumps(result.manifest, option=orjson.OPT_INDENT_2)
    storage.blobs.create(
        options.container, window.manifest_name, manifest,
        overwrite=True, content_type="application/json",
    )  # fmt: skip
    result.counts = {f"records.{f['log']}": f["records"] for f in files}
    return result


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _write_logs(
    store: EventStore,
    window: Window,
    options: ExportSettings,
    logs: tuple[LogFile | AepStreamingWriter, LogFile | AepStreamingWriter],
    touched: dict[tuple[str, str], TouchedAddress],
    with_errors: frozenset[str],
    result: WindowResult,
    profiles: dict[str, ProfilePreferences] | None,
) -> None:
    """Every event of the window into its log (`logs`: broadLog, trackingLog), and the
    addresses its events touch."""
    # Events the quarantine (and preference) books look at; a delivery only matters to an
    # address With errors.
    types = ADDRESS_EVENT_TYPES - {EventType.DELIVERED}
    notable = NotableEvents(
        types | PREFERENCE_EVENT_TYPES if profiles is not None else types,
        with_errors or None,
    )
    seen_segments: set[str] = set()
    entries = []
    for entry in store.segments(window.start, window.end):
        if entry.row_key not in seen_segments:  # placed twice (a worker outlived its claim)
            seen_segments.add(entry.row_key)
            entries.append(entry)
    # The next segment downloads and inflates on a thread while this one is turned into
    # records: I/O and gunzip overlap with the CPU work instead of adding to it.
    with ThreadPoolExecutor(1) as fetcher:
        upcoming = fetcher.submit(store.segment_data, entries[0]) if entries else None
        for index, entry in enumerate(entries):
            assert upcoming is not None
            data = upcoming.result()
            if index + 1 < len(entries):
                upcoming = fetcher.submit(store.segment_data, entries[index + 1])
            ingested = iso(epoch_millis(entry.committed_at or hour_start(entry.partition_key)))
            offset = 0
            while offset < len(data):
                written = segment_lines(
                    data, offset, _SLICE_EVENTS, ingested, options.xdm, notable,
                    native=options.native_records,
                )  # fmt: skip
                offset = written.next_offset
                result.events_read += written.events
                logs[0].write_lines(written.broadlog, written.broadlog_count)
                logs[1].write_lines(written.trackinglog, written.trackinglog_count)
                for line in written.notable:
                    event = orjson.loads(line)
                    _note_address(event, touched, with_errors)
                    if profiles is not None:
                        note_preference(event, profiles)
    result.segments = len(seen_segments)


def _note_address(
    event: dict[str, Any],
    touched: dict[tuple[str, str], TouchedAddress],
    with_errors: frozenset[str],
) -> None:
    found = relevant(event)
    if found is None:
        return
    channel, address = found
    if event["type"] == EventType.DELIVERED and (
        with_errors_key(channel, address_key(address)) not in with_errors
    ):
        return  # a delivery only matters to an address With errors
    item = touched.get(found)
    if item is None:
        item = touched[found] = TouchedAddress(channel, address)
    item.events.append(address_event(event))


def non_deliverable_record(
    item: TouchedAddress, state: AddressState, xdm: XdmOptions
) -> dict[str, Any]:
    """The address's state after the window, as recorded when the window was applied."""
    assert state.window_event_id is not None and state.window_event_at is not None
    field_name = {"email": "email", "push": "push_token"}.get(item.channel, "phone")
    identity_source = {field_name: item.address, "external_id": state.external_id}
    details: dict[str, Any] = {
        "address": item.address,
        "channel": item.channel,
        "status": state.status.value,
        "errorCount": state.error_count,
    }
    for key, value in (
        ("failureType", state.failure_type), ("failureReason", state.failure_reason),
        ("lastError", state.failure_reason),
        ("lastErrorAt", state.last_error_at), ("firstErrorAt", state.first_error_at),
    ):  # fmt: skip
        if value is not None:
            details[key] = iso(epoch_millis(value)) if isinstance(value, datetime) else value
    return {
        "_id": record_id(NON_DELIVERABLE, f"{item.channel}|{item.key}|{state.window_event_id}"),
        "timestamp": iso(epoch_millis(state.window_event_at)),
        "eventType": "message.feedback",
        "identityMap": identity_map(identity_source, xdm),
        "_experience": {
            "campaign": {
                "channel": item.channel,
                "quarantine": state.status.value in ("Quarantine", "On denylist"),
            }
        },
        f"_{xdm.tenant}": {"nonDeliverable": details},
    }


# -- runs --------------------------------------------------------------------------------


@dataclass
class ExportOutcome:
    run: RunRecord
    refused: str | None = None
    """Why nothing was exported: `export_guard` or `export_running` (None if it ran)."""


class _Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def run_log_export(
    services: Services,
    *,
    now: datetime | None = None,
    force: bool = False,
    window_start: datetime | None = None,
    source: str = "timer",
    options: ExportSettings | None = None,
    run_id: str | None = None,
) -> ExportOutcome:
    """Export every complete window not exported yet (or, forced, one given past window);
    `run_id`: an operator's retry of a failed export run, which runs again under its id."""
    moment = now or datetime.now(UTC)
    options = options or ExportSettings.of(services)
    run = services.runs.start(RunKind.LOG_EXPORT, source=source, now=moment, run_id=run_id)
    with verdict_on_failure(services, run.run_id, final=True):  # no trigger retries it
        return _run_log_export(services, run, moment, force, window_start, options)


def _run_log_export(
    services: Services,
    run: RunRecord,
    moment: datetime,
    force: bool,
    window_start: datetime | None,
    options: ExportSettings,
) -> ExportOutcome:
    watermarks = services.storage.tables.get(ExportWatermark)
    key = (options.container, "watermark")
    slot = window_floor(moment)
    started = time.monotonic()

    def clock() -> datetime:
        """Now on the run's timeline (`now` may be given, e.g. by tests and the demo)."""
        return moment + timedelta(seconds=time.monotonic() - started)

    def claim(current: ExportWatermark | None) -> ExportWatermark:
        mark = current or ExportWatermark(partition_key=key[0], row_key=key[1])
        if mark.lease_owner and mark.lease_until and mark.lease_until > moment:
            raise _Refused("export_running", f"export run {mark.lease_owner} is still running")
        if not force and mark.last_slot is not None and mark.last_slot >= slot:
            raise _Refused(
                "export_guard",
                f"already exported in the four-hour slot from {slot:%Y-%m-%dT%H:%MZ}; "
                "the next export may start at "
                f"{slot + WINDOW:%Y-%m-%dT%H:%MZ} (or force it)",
            )
        # The slot is taken when the run succeeds: a crashed run leaves it to a retry.
        return mark.model_copy(
            update={"lease_owner": run.run_id, "lease_until": moment + options.lease}
        )

    try:
        mark = watermarks.mutate(*key, claim)
    except _Refused as refused:
        finished = services.runs.finish(
            run.run_id, RunStatus.SUCCEEDED, counts={},
            detail={"skipped": refused.code, "reason": str(refused)},
        )  # fmt: skip
        log.info("log export skipped", extra={"run_id": run.run_id, "reason": refused.code})
        return ExportOutcome(finished, refused.code)
    assert mark is not None
    exported_through = mark.entity.exported_through
    store = EventStore(services.storage)
    counts: dict[str, int] = {}
    windows: list[dict[str, Any]] = []
    try:
        if window_start is not None:
            todo = [Window(window_floor(window_start))]
            if exported_through is None or todo[0].end > exported_through:
                raise _Refused(
                    "not_exported_yet", "only windows exported before can be re-exported"
                )
        else:
            todo = _due_windows(store, exported_through, moment, options.start)
        for window in todo:
            result = export_window(services, window, options, store)
            if window_start is None:
                _advance(services, key, run.run_id, window.end, clock() + options.lease)
            for name, value in result.counts.items():
                counts[name] = counts.get(name, 0) + value
            counts["events_read"] = counts.get("events_read", 0) + result.events_read
            windows.append({"window": result.window.label, "manifest": window.manifest_name})
        counts["windows"] = len(windows)
    except _Refused as refused:
        _release(services, key, run.run_id, slot=None)
        finished = services.runs.finish(
            run.run_id, RunStatus.FAILED, counts={}, error=str(refused),
            detail={"skipped": refused.code},
        )  # fmt: skip
        return ExportOutcome(finished, refused.code)
    except Exception:
        _release(services, key, run.run_id, slot=None)
        services.runs.update(run.run_id, lambda r: setattr(r, "counts", counts))
        raise  # the run fails with the exception's reason (verdict_on_failure)
    _release(services, key, run.run_id, slot=None if force else slot)
    finished = services.runs.finish(
        run.run_id, RunStatus.SUCCEEDED, counts=counts,
        detail={"windows": windows, "container": options.container, "forced": force},
    )  # fmt: skip
    log.info("log export finished", extra={"run_id": run.run_id, "windows": len(windows)})
    return ExportOutcome(finished)


def _due_windows(
    store: EventStore, exported_through: datetime | None, now: datetime, first: datetime | None
) -> list[Window]:
    """Complete windows after the watermark, oldest first. The first run starts at the
    configured start, else at the oldest stored event's window (an empty store: the last
    complete window)."""
    if exported_through is not None:
        start = exported_through
    elif first is not None:
        start = window_floor(first)
    else:
        first_hour = store.first_hour()
        start = window_floor(first_hour) if first_hour else window_floor(now) - WINDOW
    windows = []
    while start + WINDOW <= now:
        windows.append(Window(start))
        start += WINDOW
    return windows


def _advance(
    services: Services, key: tuple[str, str], run_id: str, through: datetime, lease_until: datetime
) -> None:
    """Move the watermark past a written window, and renew the lease for the next one."""

    def change(current: ExportWatermark | None) -> ExportWatermark:
        if current is None or current.lease_owner != run_id:
            raise ConcurrencyConflict("the export lease was lost to another run")
        return current.model_copy(update={"exported_through": through, "lease_until": lease_until})

    services.storage.tables.get(ExportWatermark).mutate(*key, change)


def _release(
    services: Services, key: tuple[str, str], run_id: str, *, slot: datetime | None
) -> None:
    """Give the watermark back; a successful unforced run also takes its slot (the guard)."""

    def change(current: ExportWatermark | None) -> ExportWatermark | None:
        if current is None or current.lease_owner != run_id:
            return None
        update: dict[str, Any] = {"lease_owner": None, "lease_until": None}
        if slot is not None:
            update["last_slot"] = slot
        return current.model_copy(update=update)

    services.storage.tables.get(ExportWatermark).mutate(*key, change)
