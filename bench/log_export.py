"""Log export: one four-hour window holding 1,000,000 engagement events.

Measured in one run, on the same window, in a process of its own:
  fetch     the window's segments listed, downloaded and gunzipped, not parsed (the part of
            reading that no parser can save; shown for scale)
  read      the window's events from the store (segments listed, downloaded, gunzipped,
            parsed), nothing else
  export    the whole window export: seal, read, XDM records for broadLog and trackingLog,
            quarantine states, the non-deliverable file, gzip, upload, manifest; then the
            same export with the records written by the Python reference (the C speedups'
            reference: same bytes) into another container
Peak RSS: the export of a 200,000-event window and of the 1,000,000-event one, each alone
in a process of its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.currents import MIX
from bench.processes import in_process
from core.currents.mapping import kind_of, to_event
from core.events.store import EventStore
from core.export.service import ExportSettings, Window, export_window
from core.export.xdm import SPEEDUPS, XdmOptions
from core.services import Services
from core.settings import load_settings
from devhost.fakes.currents import record_for

EVENTS = int(os.environ.get("BENCH_LOG_EXPORT_EVENTS", "1000000"))  # smaller for trial runs
SEGMENT_EVENTS = 10_000


class _Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def prepare(events: int) -> dict[str, Any]:
    """Place `events` events in a window of their own (far from now and other runs)."""
    services = Services.from_settings(load_settings())
    window = Window(
        datetime(2060, 1, 1, tzinfo=UTC) + timedelta(hours=4 * random.randrange(40_000))
    )
    rng = random.Random(5)
    kinds = list(MIX)
    weights = list(MIX.values())
    salt = uuid.uuid4().hex
    started = time.perf_counter()
    for segment in range(0, events, SEGMENT_EVENTS):
        # Segments spread over the window's four ingestion hours.
        placed_at = window.start + timedelta(minutes=240 * segment // events)
        store = EventStore(services.storage, clock=_Clock(placed_at))
        writer = store.writer("bench", f"bench-{salt}-{segment}")
        for number in range(segment, min(events, segment + SEGMENT_EVENTS)):
            kind = rng.choices(kinds, weights)[0]
            moment = int((placed_at - timedelta(seconds=rng.randrange(3600))).timestamp())
            record = record_for(
                kind, number, moment, salt=salt,
                email_address=f"user{number % 300_000}@example.com",
            )  # fmt: skip
            writer.add(to_event(record, kind, kind_of(kind)))
        writer.place()
    return {"window": window.start.isoformat(), "prepare_seconds": time.perf_counter() - started}


def measure(window_start: str) -> dict[str, Any]:
    services = Services.from_settings(load_settings())
    window = Window(datetime.fromisoformat(window_start))
    store = EventStore(services.storage)
    figures: dict[str, Any] = {}
    started = time.perf_counter()
    entries = list(store.segments(window.start, window.end))
    fetched = sum(len(store.segment_data(entry)) for entry in entries)
    figures["fetch_seconds"] = time.perf_counter() - started
    figures["fetch_bytes"] = fetched
    started = time.perf_counter()
    read = sum(
        1 for entry in store.segments(window.start, window.end)  # listed again: part of reading
        for _ in store.read_segment_stored(entry)
    )  # fmt: skip
    figures["read_seconds"] = time.perf_counter() - started
    figures["read_events"] = read
    options = ExportSettings(
        f"bench-export-{uuid.uuid4().hex[:8]}", XdmOptions("switchboard", "crmId"), 5
    )
    started = time.perf_counter()
    result = export_window(services, window, options, store)
    figures["export_seconds"] = time.perf_counter() - started
    figures["export_counts"] = {**result.counts, "events_read": result.events_read}
    reference = dataclasses.replace(
        options, container=f"{options.container}-py", native_records=False
    )
    started = time.perf_counter()
    export_window(services, window, reference, store)
    figures["reference_export_seconds"] = time.perf_counter() - started
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures


def export_only(window_start: str) -> dict[str, Any]:
    services = Services.from_settings(load_settings())
    options = ExportSettings(
        f"bench-export-{uuid.uuid4().hex[:8]}", XdmOptions("switchboard", "crmId"), 5
    )
    result = export_window(services, Window(datetime.fromisoformat(window_start)), options)
    return {
        "events": result.events_read,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _in_process(*arguments: str) -> dict[str, Any]:
    return in_process("bench.log_export", *arguments)


def run() -> dict[str, Any]:
    print(f"   placing {EVENTS:,} events in one window ...", flush=True)
    big = _in_process("prepare", str(EVENTS))
    print(f"   placing {EVENTS // 5:,} events in another window ...", flush=True)
    small = _in_process("prepare", str(EVENTS // 5))
    print("   read, then export, the large window ...", flush=True)
    main = _in_process("measure", big["window"])
    print("   export alone: the small window, then the large one ...", flush=True)
    rss_small = _in_process("export", small["window"])
    rss_big = _in_process("export", big["window"])
    events = main["read_events"]
    figures = {
        "events": events,
        "fetch_events_per_s": round(events / main["fetch_seconds"]),
        "fetch_mb": round(main["fetch_bytes"] / 1e6, 1),
        "read_events_per_s": round(events / main["read_seconds"]),
        "export_events_per_s": round(events / main["export_seconds"]),
        "export_over_read": round(main["export_seconds"] / main["read_seconds"], 2),
        "export_over_fetch": round(main["export_seconds"] / main["fetch_seconds"], 2),
        "reference_export_events_per_s": round(events / main["reference_export_seconds"]),
        "reference_export_over_read": round(
            main["reference_export_seconds"] / main["read_seconds"], 2
        ),
        "records_by": "C speedups" if SPEEDUPS is not None else "Python reference",
        "export_counts": main["export_counts"],
        "peak_rss_mb_small_window": rss_small["peak_rss_mb"],
        "peak_rss_mb_large_window": rss_big["peak_rss_mb"],
        "small_window_events": rss_small["events"],
        "rss_growth_5x_window": round(rss_big["peak_rss_mb"] / rss_small["peak_rss_mb"] - 1, 3),
    }
    print(f"   fetch only      {figures['fetch_events_per_s']:>9,} events/s"
          f"  ({figures['fetch_mb']} MB of JSON Lines, not parsed)")  # fmt: skip
    print(f"   read only       {figures['read_events_per_s']:>9,} events/s")
    print(f"   export          {figures['export_events_per_s']:>9,} events/s"
          f"  = {figures['export_over_read']}x the read-only time,"
          f" {figures['export_over_fetch']}x the fetch-only time"
          f" (records by the {figures['records_by']})")  # fmt: skip
    print(f"   export, records by the Python reference"
          f" {figures['reference_export_events_per_s']:>9,} events/s"
          f"  = {figures['reference_export_over_read']}x the read-only time")  # fmt: skip
    print(f"   records         {json.dumps(figures['export_counts'])}")
    print(f"   peak RSS        {figures['peak_rss_mb_small_window']} MB ({rss_small['events']:,}"
          f" events), {figures['peak_rss_mb_large_window']} MB ({events:,} events),"
          f" {figures['rss_growth_5x_window'] * 100:+.1f}%")  # fmt: skip
    return figures


if __name__ == "__main__":
    action, argument = sys.argv[1:3]
    if action == "prepare":
        result = prepare(int(argument))
    elif action == "measure":
        result = measure(argument)
    else:
        result = export_only(argument)
    print(json.dumps(result))
