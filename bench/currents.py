"""Currents ingestion: 1,000,000 events across 100 Avro files (mixed types) in local S3.

Measured in one run, on the same files, each pass reading them from the S3 server:
  fastavro    S3 body -> fastavro records, nothing else (the decoder's own rate)
  decode      S3 body -> fastavro -> engagement event -> dedup decision (no store writes)
  pipeline    the timer's whole path: discovery, claims, decode, map, dedup, segments
              written and placed, suppression changes, receipts (one process, inline)
The store-write rate is the events stored per second of what `pipeline` adds to `decode`.
Peak RSS: a million other events as 100 files of 10,000 and as 10 files of 100,000 (the
largest file Braze writes), each through the pipeline alone in a process of its own.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro

from bench.processes import in_process
from core.currents.discovery import CurrentsConfig, run_currents
from core.currents.mapping import kind_of, to_event
from core.currents.s3 import event_type_folders, list_folder, s3_client
from core.events.store import EventStore
from core.services import Services
from core.settings import load_settings
from devhost.fakes.currents import avro_bytes, currents_key, put_file, record_for

EVENTS = int(os.environ.get("BENCH_CURRENTS_EVENTS", "1000000"))  # smaller for trial runs
PREFIX = "currents/"
HOURS = 8
"""The files span this many hours of events, as 100 files of Currents traffic do."""
LOOKBACK_HOURS = 3 * HOURS + 2
# Share of events per type, as a message-engagement Current carries them.
MIX = {
    "users.messages.email.Send": 0.31, "users.messages.email.Delivery": 0.30,
    "users.messages.email.Open": 0.18, "users.messages.email.Click": 0.08,
    "users.messages.pushnotification.Send": 0.08, "users.messages.pushnotification.Open": 0.03,
    "users.messages.email.SoftBounce": 0.01, "users.messages.email.Bounce": 0.005,
    "users.messages.email.Unsubscribe": 0.002, "users.messages.email.MarkAsSpam": 0.0005,
    "users.behaviors.subscription.GlobalStateChange": 0.0025,
}  # fmt: skip
REDELIVERED = 0.02
"""Share of events Braze writes a second time into a later file (at-least-once)."""


def _plan(files: int) -> list[tuple[str, int]]:
    """(event type, events) per file: each type's share of the events, in files of about
    EVENTS / files events (a rare type gets one smaller file)."""
    per_file = EVENTS // files
    plan: list[tuple[str, int]] = []
    for event_type, share in MIX.items():
        total = round(EVENTS * share)
        count = max(1, round(total / per_file))
        plan += [(event_type, total // count + (i < total % count)) for i in range(count)]
    return plan


def generate(s3: Any, bucket: str, prefix: str, files: int, hours_back: int) -> int:
    """Write the files; returns the number of distinct events."""
    rng = random.Random(11)
    first_hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    first_hour -= timedelta(hours=hours_back + HOURS - 1)
    number = 0
    earlier: dict[str, list[dict[str, Any]]] = {}
    for index, (event_type, count) in enumerate(_plan(files)):
        hour = first_hour + timedelta(hours=index * HOURS // files)
        base = int(hour.timestamp())
        previous = earlier.get(event_type, [])
        # Re-delivered events come back unchanged (same id, same time) in a later file.
        again = rng.sample(previous, min(len(previous), int(count * REDELIVERED)))
        fresh = count - len(again)
        records = [
            record_for(
                event_type, number + i, base + rng.randrange(3600), salt=bucket,
                email_address=f"user{(number + i) % 400_000}@example.com",
            )
            for i in range(fresh)
        ]  # fmt: skip
        number += fresh
        key = currents_key(prefix, event_type, hour.strftime("%Y-%m-%d-%H"), offset=index)
        put_file(s3, bucket, key, avro_bytes(event_type, records + again, codec="deflate"))
        earlier[event_type] = rng.sample(records, min(len(records), 2000))
    return number


def _objects(s3: Any, bucket: str, prefix: str) -> list[Any]:
    since = (datetime.now(UTC) - timedelta(hours=LOOKBACK_HOURS)).strftime("%Y-%m-%d-%H")
    return [
        obj
        for folder in event_type_folders(s3, bucket, prefix)
        for obj in list_folder(s3, bucket, folder, since)
    ]


def fastavro_only(s3: Any, objects: list[Any]) -> int:
    records = 0
    for obj in objects:
        body = s3.get_object(Bucket=obj.bucket, Key=obj.key)["Body"]
        records += sum(1 for _ in fastavro.reader(body))
    return records


def decode_map_dedup(services: Services, s3: Any, objects: list[Any]) -> int:
    store = EventStore(services.storage)
    admitted = 0
    for obj in objects:
        kind = kind_of(obj.event_type)
        writer = store.writer("bench-decode", uuid.uuid4().hex)  # never placed
        body = s3.get_object(Bucket=obj.bucket, Key=obj.key)["Body"]
        for record in fastavro.reader(body):
            admitted += writer.admit(to_event(record, obj.event_type, kind))  # type: ignore[arg-type]
    return admitted


def prepare(files: int, hours_back: int) -> dict[str, Any]:
    """Generate the files into a new bucket (in a process of its own: generating holds
    whole files in memory, which must not count in the measured processes' peak RSS)."""
    settings = load_settings()
    s3 = s3_client(settings.s3_endpoint_url, settings.s3_region)
    bucket = f"bench-currents-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    started = time.perf_counter()
    distinct = generate(s3, bucket, PREFIX, files, hours_back)
    return {"bucket": bucket, "distinct_events": distinct,
            "generate_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def measure(bucket: str, modes: list[str]) -> dict[str, Any]:
    settings = load_settings()
    services = Services.from_settings(settings)
    s3 = s3_client(settings.s3_endpoint_url, settings.s3_region)
    objects = _objects(s3, bucket, PREFIX)
    figures: dict[str, Any] = {"objects": len(objects)}

    def timed(name: str, action: Any) -> Any:
        started = time.perf_counter()
        result = action()
        figures[f"{name}_seconds"] = time.perf_counter() - started
        return result

    if "fastavro" in modes:
        figures["records"] = timed("fastavro", lambda: fastavro_only(s3, objects))
    if "decode" in modes:
        figures["admitted"] = timed("decode", lambda: decode_map_dedup(services, s3, objects))
    config = CurrentsConfig(
        bucket=bucket, prefix=PREFIX, lookback=timedelta(hours=LOOKBACK_HOURS), inline_files=10_000,
        max_attempts=3, claim_seconds=900,
    )  # fmt: skip
    run = timed("pipeline", lambda: run_currents(services, s3=s3, config=config))
    figures["pipeline_counts"] = {k: v for k, v in run.counts.items() if k.startswith("events.")}
    figures["pipeline_files"] = run.counts.get("files.ingested", 0)
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures


def _in_process(*arguments: str) -> dict[str, Any]:
    return in_process("bench.currents", *arguments)


def _files(files: int, modes: list[str], hours_back: int) -> dict[str, Any]:
    print(f"   {EVENTS:,} events in {files} files: generate, then {', '.join(modes)} ...",
          flush=True)  # fmt: skip
    prepared = _in_process("prepare", str(files), str(hours_back))
    return {**prepared, **_in_process("measure", prepared["bucket"], *modes)}


def run() -> dict[str, Any]:
    # Each set of files covers hours of its own, so that no set's dedup index holds
    # another's events; peak RSS compares processes that ran the pipeline alone.
    main = _files(100, ["fastavro", "decode", "pipeline"], hours_back=0)
    small = _files(100, ["pipeline"], hours_back=HOURS)
    large = _files(10, ["pipeline"], hours_back=2 * HOURS)
    records = main["records"]
    stored = main["pipeline_counts"].get("events.stored", 0)
    store_seconds = max(main["pipeline_seconds"] - main["decode_seconds"], 1e-9)
    figures = {
        "events_written": records,
        "distinct_events": main["distinct_events"],
        "files": main["objects"],
        "generate_seconds": main["generate_seconds"],
        "fastavro_events_per_s": round(records / main["fastavro_seconds"]),
        "decode_map_dedup_events_per_s": round(records / main["decode_seconds"]),
        "decode_over_fastavro_rate": round(main["fastavro_seconds"] / main["decode_seconds"], 2),
        "pipeline_events_per_s": round(records / main["pipeline_seconds"]),
        "pipeline_over_fastavro_rate": round(
            main["fastavro_seconds"] / main["pipeline_seconds"], 2
        ),
        "store_write_events_per_s": round(stored / store_seconds),
        "pipeline_counts": main["pipeline_counts"],
        "peak_rss_mb_10k_per_file": small["peak_rss_mb"],
        "peak_rss_mb_100k_per_file": large["peak_rss_mb"],
        "rss_growth_10x_file_size": round(large["peak_rss_mb"] / small["peak_rss_mb"] - 1, 3),
        "pipeline_events_per_s_100k_files": round(
            large["pipeline_counts"].get("events.records", 0) / large["pipeline_seconds"]
        ),
    }
    print(f"   fastavro alone      {figures['fastavro_events_per_s']:>9,} events/s")
    print(f"   decode+map+dedup    {figures['decode_map_dedup_events_per_s']:>9,} events/s"
          f"  = {figures['decode_over_fastavro_rate']} of fastavro's rate")  # fmt: skip
    print(f"   whole pipeline      {figures['pipeline_events_per_s']:>9,} events/s"
          f"  = {figures['pipeline_over_fastavro_rate']} of fastavro's rate")  # fmt: skip
    print(f"   store writes        {figures['store_write_events_per_s']:>9,} events/s")
    print(f"   counts              {json.dumps(figures['pipeline_counts'])}")
    print(f"   peak RSS            {figures['peak_rss_mb_10k_per_file']} MB (10k-event files),"
          f" {figures['peak_rss_mb_100k_per_file']} MB (100k-event files),"
          f" {figures['rss_growth_10x_file_size'] * 100:+.1f}%")  # fmt: skip
    return figures


if __name__ == "__main__":
    action, argument, *rest = sys.argv[1:]
    if action == "prepare":
        result = prepare(int(argument), int(rest[0]))
    else:
        result = measure(argument, rest)
    print(json.dumps(result))
