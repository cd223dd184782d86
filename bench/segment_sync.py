"""Segment sync: a generated CDP export (gzip CSV, 20 columns, memberships, 1% bad rows).

Measured in one run; each run of each size in a process of its own, so its peak RSS is
its own (the second run reads the state the first left in Azurite):
  parse      read + gunzip + CSV-parse the file with the reference reader (Python's csv)
  c parse    the same with the C splitter the pipeline uses (rows bucketed and encoded as
             work lines, then dropped)
  payloads   the whole pipeline up to the Braze request bodies: split into buckets (work
             blobs in Azurite), typing, suppression, diff, batching, JSON bodies, state
             commit; no network send and no checkpoint writes
  changed    the same file again with 1% of the rows changed (state from `payloads`)
  fake       the first run through the fake Braze server on loopback, checkpoints included,
             one batch at a time (the baseline (b) has always been)
  paced      (e) and (f): at the destination's speed, bench/paced_sync.py"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import resource
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from isal import igzip

from bench.paced_sync import run_paced
from bench.processes import in_process
from core.destinations.base import BatchResult
from core.destinations.braze import BrazeDestination
from core.runs import RunKind, RunRecord
from core.services import Services
from core.settings import load_settings
from core.storage import BlobRef
from core.sync.checkpoints import CheckpointLog
from core.sync.definitions import SyncDefinition, parse_document
from core.sync.readers import RowReader, SourceRow, decompressed
from core.sync.service import RunPlan, finalize, plan_run, process_buckets, unchanged_index
from core.sync.speedups import SPEEDUPS
from core.sync.split import feed_splitter, read_header, split_file

SIZES = (1_000_000, 5_000_000)
EXTRA_ROWS = int(os.environ.get("BENCH_SYNC_EXTRA_ROWS", "0"))
"""A third size to run both runs at (`make bench ONLY=segment_sync BENCH_SYNC_EXTRA_ROWS=
10000000`): how a sync past `processing.unchanged_lookup_mb` fares."""
COLUMNS = [
    "crmId", "email", "firstName", "lastName", "birthDate", "gender", "country", "language",
    "phone", "city", "timeZone", "points", "lifetimeValue", "isVip", "lastPurchase", "tier",
    "tags", "score", "emailConsent", "segmentMembership.ups.seg-vip.status",
]  # fmt: skip
SYNC = {
    "id": "bench",
    "identity": {"column": "crmId", "namespace": "crmId"},
    "fields": [
        {"source": "email", "target": "email"},
        {"source": "firstName", "target": "first_name"},
        {"source": "lastName", "target": "last_name"},
        {"source": "birthDate", "target": "dob", "type": "date"},
        {"source": "gender", "target": "gender"},
        {"source": "country", "target": "country"},
        {"source": "language", "target": "language"},
        {"source": "phone", "target": "phone"},
        {"source": "city", "target": "home_city"},
        {"source": "timeZone", "target": "time_zone"},
        {"source": "points", "target": "loyalty_points", "type": "integer"},
        {"source": "lifetimeValue", "target": "lifetime_value", "type": "decimal"},
        {"source": "isVip", "target": "is_vip", "type": "boolean"},
        {"source": "lastPurchase", "target": "last_purchase", "type": "datetime"},
        {"source": "tier", "target": "tier"},
        {"source": "tags", "target": "tags", "type": "array"},
        {"source": "score", "target": "score", "type": "float"},
    ],
    "audiences": {"segments": [{"id": "seg-vip", "name": "vip"}]},
    "consent": {"channel": "email", "column": "emailConsent"},
}
_CITIES = ["Lisboa", "Amsterdam", "Paris", "Berlin", "Köln", "São Paulo", "Zürich"]
_ZONES = ["Europe/Lisbon", "Europe/Amsterdam", "Europe/Paris", "Europe/Berlin"]


def generate(path: Path, rows: int, *, changed_every: int = 0, seed: int = 7) -> None:
    """Write the export; with `changed_every`, every n-th row differs from the base file."""
    rng = random.Random(seed)
    with gzip.open(path, "wt", encoding="utf-8", newline="", compresslevel=6) as out:
        writer = csv.writer(out)
        writer.writerow(COLUMNS)
        for i in range(rows):
            bad = i % 100 == 37  # 1% bad rows
            points = i % 5000 + (1 if changed_every and i % changed_every == 1 else 0)
            writer.writerow([
                f"CRM-{i:09d}", "not-an-email" if bad else f"user{i}@example.com",
                "Ana", "Müller" if i % 3 else "Silva", f"19{50 + i % 50}-0{1 + i % 9}-1{i % 9}",
                "MFONP"[i % 5], ["PT", "NL", "FR", "DE"][i % 4], ["pt", "nl", "fr", "de"][i % 4],
                f"+3161{i % 10_000_000:07d}", _CITIES[i % 7], _ZONES[i % 4], points,
                f"{i % 1000}.{i % 100:02d}", "true" if i % 2 else "false",
                f"2026-{1 + i % 12:02d}-0{1 + i % 9}T10:00:00Z",
                ["gold", "silver", "bronze"][i % 3],
                "news|offers" if i % 2 else "offers", f"{rng.random() * 100:.3f}",
                "y" if i % 20 else "n", "realized" if i % 3 else "exited",
            ])  # fmt: skip


class PayloadOnly:
    """Builds every request body exactly as the Braze client does, and sends nothing."""

    name = "braze"
    max_in_flight = 1  # nothing to wait for: inline, as (a)-(d) always measured

    def __init__(self, spec: BrazeDestination) -> None:
        self.max_batch_objects = spec.max_batch_objects
        self.max_body_bytes = spec.max_body_bytes
        self.encode = spec.encode
        self.bodies = 0
        self.bytes = 0

    def close(self) -> None:
        pass

    def send_batch(self, items: list[bytes]) -> BatchResult:
        body = b'{"attributes":[' + b",".join(items) + b"]}"
        self.bodies += 1
        self.bytes += len(body)
        return BatchResult()


class NoCheckpoints(CheckpointLog):
    """`payloads` measures the pipeline up to request bodies: nothing is sent, so nothing
    is acknowledged and there is nothing to checkpoint."""

    def __init__(self) -> None:
        pass

    def load(self, run_id: str) -> dict[str, list[Any]]:
        return {}

    def record(self, run_id: str, key: str, items: dict[str, list[Any]]) -> None:
        pass


def _c_parse(path: Path, sync: SyncDefinition) -> int:
    """Rows of the file as the pipeline's C splitter reads them (work lines dropped)."""
    with path.open("rb") as file:
        text = igzip.IGzipFile(fileobj=file, mode="rb")
        columns, rest, _ = read_header(text, ",")
        splitter = SPEEDUPS.Splitter(
            len(columns), columns.index(sync.identity.column), ",", 256, 32 * 1024, str.lower
        )
        for _ in feed_splitter(splitter, text, rest, 2):
            pass
        return int(splitter.rows)


def _upload(services: Services, sync: SyncDefinition, path: Path, name: str) -> BlobRef:
    with path.open("rb") as data:
        services.storage.blobs.create(
            "segments", f"{sync.id}/{name}", iter(lambda: data.read(4 << 20), b""), overwrite=True
        )
    return services.storage.blobs.ref("segments", f"{sync.id}/{name}")


def _csv_baseline(file: Any) -> int:
    """The baseline of (a), as it has been since the first run of this benchmark: the
    csv module reading the file into rows with their line numbers (what the reference's
    reader did before it bounded its lines)."""
    text = io.TextIOWrapper(decompressed(file), encoding="utf-8-sig", newline="")
    reader = csv.reader(text, strict=True)
    width = len(next(reader))
    rows = 0
    while True:
        start = reader.line_num + 1
        values = next(reader, None)
        if values is None:
            return rows
        if len(values) == width:
            rows += bool(SourceRow(start, values))


def _pipeline(
    services: Services, sync: SyncDefinition, blob: BlobRef, run_id: str, destination: Any
) -> RunRecord:
    unchanged = unchanged_index(services, sync, destination.name, run_id)
    split = split_file(
        services.storage, sync, [blob], run_id=run_id, buckets=sync.processing.state_buckets,
        in_memory_max_rows=sync.processing.in_memory_max_rows,
        held_max_bytes=sync.processing.in_memory_max_mb << 20, unchanged=unchanged,
    )  # fmt: skip
    plan: RunPlan = plan_run(services, sync, blob, run_id, split, [blob.name])
    checkpoints = NoCheckpoints() if isinstance(destination, PayloadOnly) else None
    finished = process_buckets(
        services, sync, plan, run_id, plan.buckets, split.in_memory,
        destination=destination, checkpoints=checkpoints,
        unchanged=unchanged, record_results=False,
    )  # fmt: skip
    services.runs.start(RunKind.SEGMENT_SYNC, run_id=run_id)
    return finalize(services, sync, plan, run_id, blob, finished)


def worker(rows: int, sync_id: str, modes: list[str]) -> dict[str, Any]:
    """The given runs of one file size, in this process."""
    services = Services.from_settings(load_settings())
    sync = parse_document({"version": 1, "syncs": [{**SYNC, "id": sync_id}]}).syncs[0]
    figures: dict[str, Any] = {"rows": rows}
    spec = BrazeDestination("http://unused", "unused")
    with tempfile.TemporaryDirectory() as tmp:
        base, changed = Path(tmp) / "base.csv.gz", Path(tmp) / "changed.csv.gz"

        def measure(mode: str, run: int, sync: SyncDefinition, blob: BlobRef, to: Any) -> None:
            started = time.perf_counter()
            record = _pipeline(services, sync, blob, f"20261124T00000{run}Z-{os.getpid():08x}", to)
            figures[f"{mode}_seconds"] = time.perf_counter() - started
            figures[f"{mode}_counts"] = {k: v for k, v in record.counts.items() if "." not in k}
            figures[f"{mode}_requests"] = record.detail.get("requests", 0)

        if "payloads" in modes:
            generate(base, rows)
            started = time.perf_counter()
            with base.open("rb") as file:
                parsed = _csv_baseline(file)
            figures["parse_seconds"] = time.perf_counter() - started
            started = time.perf_counter()
            with base.open("rb") as file:  # the reference's reader (bounded lines, raw text)
                assert sum(1 for _ in RowReader(file, sync.input, [])) == rows
            figures["reference_reader_seconds"] = time.perf_counter() - started
            assert parsed == rows
            started = time.perf_counter()
            assert _c_parse(base, sync) == rows
            figures["c_parse_seconds"] = time.perf_counter() - started
            destination = PayloadOnly(spec)
            measure("payloads", 0, sync, _upload(services, sync, base, "base.csv.gz"), destination)
            figures["payload_bodies"] = destination.bodies
            figures["payload_megabytes"] = round(destination.bytes / 2**20, 1)
        if "changed" in modes:  # after `payloads` (in this process or another)
            generate(changed, rows, changed_every=100)
            measure("changed", 1, sync, _upload(services, sync, changed, "changed.csv.gz"),
                    PayloadOnly(spec))  # fmt: skip
        if "fake" in modes:
            # The fake server runs in its own process (started by `devhost.services
            # --fakes`), so its million profiles do not count in this process's memory.
            generate(base, rows)
            endpoint = os.environ["SWITCHBOARD_BRAZE_REST_ENDPOINT"]
            configure = urllib.request.Request(
                f"{endpoint}/_fake/config", data=b'{"record_objects": false}', method="POST"
            )
            urllib.request.urlopen(configure, timeout=10).close()
            fake_sync = parse_document(
                {"version": 1, "syncs": [{**SYNC, "id": sync_id + "-fake", "mode": "upsert"}]}
            ).syncs[0]
            blob = _upload(services, fake_sync, base, "base.csv.gz")
            client = BrazeDestination(
                endpoint, os.environ["SWITCHBOARD_BRAZE_API_KEY"], requests_per_second=10_000
            )
            measure("fake", 2, fake_sync, blob, client)
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return figures


def _worker_process(rows: int, sync_id: str, mode: str) -> dict[str, Any]:
    print(f"   {rows:,} rows: {mode} ...", flush=True)
    return in_process("bench.segment_sync", str(rows), sync_id, mode)


def run() -> dict[str, Any]:
    runs: dict[tuple[int, str], dict[str, Any]] = {}
    for rows in (*SIZES, EXTRA_ROWS) if EXTRA_ROWS else SIZES:
        sync_id = f"bench-{rows // 1000}k-{os.getpid()}"
        for mode in ("payloads", "changed"):  # the second run reads the first one's state
            runs[rows, mode] = _worker_process(rows, sync_id, mode)
    small, large = runs[SIZES[0], "payloads"], runs[SIZES[1], "payloads"]
    small_changed, large_changed = runs[SIZES[0], "changed"], runs[SIZES[1], "changed"]
    fake = _worker_process(SIZES[0], f"bench-fake-{os.getpid()}", "fake")
    rows = small["rows"]
    print(f"   {rows:,} rows: paced, 1 worker ...", flush=True)
    paced_one = run_paced(rows, 1, SYNC, generate)
    print(f"   {rows:,} rows: paced, 4 workers ...", flush=True)
    paced_four = run_paced(rows, 4, SYNC, generate)

    def growth(at_1m: float, at_5m: float) -> float:
        return round(at_5m / at_1m - 1, 3)

    figures = {
        "rows": rows,
        "parse_only_rows_per_s": round(rows / small["parse_seconds"]),
        "reference_reader_rows_per_s": round(rows / small["reference_reader_seconds"]),
        "c_parse_only_rows_per_s": round(rows / small["c_parse_seconds"]),
        "payloads_over_c_parse": round(small["payloads_seconds"] / small["c_parse_seconds"], 2),
        "payloads_rows_per_s": round(rows / small["payloads_seconds"]),
        "payloads_over_parse": round(small["payloads_seconds"] / small["parse_seconds"], 2),
        "changed_1pct_rows_per_s": round(rows / small_changed["changed_seconds"]),
        "first_over_changed_speedup": round(
            small["payloads_seconds"] / small_changed["changed_seconds"], 2
        ),
        "fake_braze_rows_per_s": round(rows / fake["fake_seconds"]),
        "fake_braze_requests": fake["fake_requests"],
        "payload_bodies": small["payload_bodies"],
        "peak_rss_mb_1m": small["peak_rss_mb"],
        "peak_rss_mb_5m": large["peak_rss_mb"],
        "rss_growth_1m_to_5m": growth(small["peak_rss_mb"], large["peak_rss_mb"]),
        "changed_peak_rss_mb_1m": small_changed["peak_rss_mb"],
        "changed_peak_rss_mb_5m": large_changed["peak_rss_mb"],
        "changed_rss_growth_1m_to_5m": growth(
            small_changed["peak_rss_mb"], large_changed["peak_rss_mb"]
        ),
        "payloads_rows_per_s_5m": round(large["rows"] / large["payloads_seconds"]),
        "changed_1pct_rows_per_s_5m": round(large["rows"] / large_changed["changed_seconds"]),
        "first_over_changed_speedup_5m": round(
            large["payloads_seconds"] / large_changed["changed_seconds"], 2
        ),
        "paced_one_worker": paced_one,
        "paced_four_workers": paced_four,
        "counts_first": small["payloads_counts"],
        "counts_changed": small_changed["changed_counts"],
    }
    if EXTRA_ROWS:
        extra, extra_changed = runs[EXTRA_ROWS, "payloads"], runs[EXTRA_ROWS, "changed"]
        figures["extra"] = {
            "rows": EXTRA_ROWS,
            "payloads_rows_per_s": round(EXTRA_ROWS / extra["payloads_seconds"]),
            "changed_1pct_rows_per_s": round(EXTRA_ROWS / extra_changed["changed_seconds"]),
            "first_over_changed_speedup": round(
                extra["payloads_seconds"] / extra_changed["changed_seconds"], 2
            ),
            "peak_rss_mb": extra["peak_rss_mb"],
            "changed_peak_rss_mb": extra_changed["peak_rss_mb"],
        }
    print(f"   parse only      {figures['parse_only_rows_per_s']:>10,} rows/s  (Python's csv)")
    reader = figures["reference_reader_rows_per_s"]
    print(f"   reference reader {reader:>9,} rows/s  (RowReader: csv, bounded lines)")
    print(f"   C parse only    {figures['c_parse_only_rows_per_s']:>10,} rows/s  (the C splitter)")
    print(f"   (a) to payloads {figures['payloads_rows_per_s']:>10,} rows/s"
          f"  = {figures['payloads_over_parse']}x the csv parse-only time,"
          f" {figures['payloads_over_c_parse']}x the C parse-only time")  # fmt: skip
    print(f"   (b) fake Braze  {figures['fake_braze_rows_per_s']:>10,} rows/s"
          f"  ({figures['fake_braze_requests']:,} requests, checkpoints included)")  # fmt: skip
    print(f"   (c) 1% changed  {figures['changed_1pct_rows_per_s']:>10,} rows/s"
          f"  = {figures['first_over_changed_speedup']}x faster than the first run"
          f" (at 5M: {figures['first_over_changed_speedup_5m']}x)")  # fmt: skip
    print(f"   (d) peak RSS    first run: {figures['peak_rss_mb_1m']} MB at 1M,"
          f" {figures['peak_rss_mb_5m']} MB at 5M (+{figures['rss_growth_1m_to_5m'] * 100:.1f}%);"
          f" second run: {figures['changed_peak_rss_mb_1m']} MB at 1M,"
          f" {figures['changed_peak_rss_mb_5m']} MB at 5M"
          f" (+{figures['changed_rss_growth_1m_to_5m'] * 100:.1f}%)")  # fmt: skip
    for label, paced in (("(e) 1 worker ", paced_one), ("(f) 4 workers", paced_four)):
        print(f"   {label}   {paced['objects_per_s']:>10,} objects/s"
              f" = {paced['ratio_to_limit']:.0%} of the fake's limit (400 requests/s, 100 ms),"
              f" {paced['share_429']:.2%} answered 429, {paced['requests']:,} requests;"
              f" CPU: workers {paced['workers_cpu_seconds']} s, fake {paced['fake_cpu_seconds']} s"
              f" in {paced['seconds']} s")  # fmt: skip
    if EXTRA_ROWS:
        more = figures["extra"]
        print(f"   at {EXTRA_ROWS:,} rows: first run {more['payloads_rows_per_s']:,} rows/s,"
              f" {more['peak_rss_mb']} MB; second run {more['changed_1pct_rows_per_s']:,}"
              f" rows/s ({more['first_over_changed_speedup']}x),"
              f" {more['changed_peak_rss_mb']} MB")  # fmt: skip
    return figures


if __name__ == "__main__":
    print(json.dumps(worker(int(sys.argv[1]), sys.argv[2], sys.argv[3:])))
