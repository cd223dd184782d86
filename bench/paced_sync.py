"""Segment sync at the destination's speed: (e) and (f) of `make bench ONLY=segment_sync`.

A 1M-row first sync through the fake Braze (its own process) answering after a log-normal
100 ms (sigma 0.3) and enforcing 1,200 requests per 3 s (400/s, 30,000 objects/s: lower
than Braze's 1,000/s so that this machine's CPU is not what gets measured):
  (e) one worker: the whole run in one process, as a file under `rows_per_worker` runs;
  (f) four fan-out workers: the run split by the real arrival path, its four chunk
      messages taken off the queue and each handled by `process_chunk` in a process of
      its own, all four pacing through the one budget in Table storage.
The syncs ask for 380 requests/s, 95% of the limit: the budget's documented margin (each
worker's local burst, 5% of its share) has to fit under the limit's fixed windows.
Measured: objects/s from the upload's arrival to the run's end, the ratio to the limit,
the share of requests answered 429, and the CPU seconds of the workers and of the fake.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from azure.storage.queue import TextBase64DecodePolicy

from core.runs import RunStatus
from core.services import Services
from core.settings import load_settings
from core.sync.service import (
    SEGMENT_CHUNK_QUEUE,
    SegmentChunkMessage,
    process_chunk,
    process_segment_file,
)

LIMIT_PER_WINDOW = 1_200
WINDOW_SECONDS = 3.0
LIMIT_PER_SECOND = LIMIT_PER_WINDOW / WINDOW_SECONDS
BUDGET_PER_SECOND = 380.0
OBJECTS_PER_REQUEST = 75
LATENCY_SECONDS = 0.1
LATENCY_SIGMA = 0.3


def _fake(path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    endpoint = os.environ["SWITCHBOARD_BRAZE_REST_ENDPOINT"]
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(
        f"{endpoint}{path}", data=data, method="POST" if data else "GET"
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return dict(json.loads(answer.read()))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _syncs_file(directory: Path, base: dict[str, Any], sync_id: str, workers: int) -> Path:
    sync = {
        **base, "id": sync_id, "mode": "upsert",
        "destination": {
            "type": "braze", "requests_per_second": BUDGET_PER_SECOND,
            **json.loads(os.environ.get("BENCH_PACED_DESTINATION", "{}")),
        },
        "processing": {"rows_per_worker": 250_000 if workers > 1 else 10_000_000},
    }  # fmt: skip
    path = directory / "syncs.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "syncs": [sync]}))
    return path


def run_paced(rows: int, workers: int, base_sync: dict[str, Any], generate: Any) -> dict[str, Any]:
    """In the bench's parent: one paced run (its steps in processes of their own)."""
    _fake("/_fake/config", {
        "record_objects": False, "latency_seconds": LATENCY_SECONDS,
        "latency_sigma": LATENCY_SIGMA, "rate_limit": LIMIT_PER_WINDOW,
        "rate_window_seconds": WINDOW_SECONDS,
    })  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        sync_id = f"bench-paced{workers}-{os.getpid()}"
        syncs = _syncs_file(Path(tmp), base_sync, sync_id, workers)
        data = Path(tmp) / "export.csv.gz"
        generate(data, rows)
        before = _fake("/_fake/stats")
        command = [
            sys.executable,
            "-m",
            "bench.paced_sync",
            "run",
            str(data),
            sync_id,
            str(workers),
        ]
        env = {**os.environ, "SWITCHBOARD_SYNCS_FILE": str(syncs)}
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        figures = dict(json.loads(output.stdout.strip().splitlines()[-1]))
        after = _fake("/_fake/stats")
    _fake("/_fake/config", {"latency_seconds": 0.0, "latency_sigma": 0.0, "rate_limit": None})
    requests = after["requests"] - before["requests"]
    objects = after["accepted_objects"] - before["accepted_objects"]
    seconds = figures["seconds"]
    return {
        **figures,
        "workers": workers,
        "requests": requests,
        "objects": objects,
        "objects_per_s": round(objects / seconds),
        "ratio_to_limit": round(objects / seconds / (LIMIT_PER_SECOND * OBJECTS_PER_REQUEST), 3),
        "share_429": round((after["rate_limited"] - before["rate_limited"]) / max(1, requests), 4),
        "busiest_window": after["busiest_window"],
        "fake_cpu_seconds": round(after["cpu_seconds"] - before["cpu_seconds"], 1),
    }


def _run(data: Path, sync_id: str, workers: int) -> dict[str, Any]:
    """In a process of its own: upload, arrive, and (fanned out) hand the chunks to
    `workers` processes; from the arrival to the run's end is what is timed."""
    services = Services.from_settings(load_settings())
    name = f"{sync_id}/export.csv.gz"
    with data.open("rb") as file:
        services.storage.blobs.create(
            "segments", name, iter(lambda: file.read(4 << 20), b""), overwrite=True
        )
    blob = services.storage.blobs.ref("segments", name)
    cpu_before = _cpu_seconds()
    started, wall_start = time.perf_counter(), time.time()
    spans: list[tuple[float, float]] = []
    run = process_segment_file(services, blob)
    assert run is not None
    arrived = time.perf_counter() - started  # the whole run (one worker) or its split
    chunks = 0
    workers_cpu = 0.0
    if not run.status.ended:  # fanned out: the chunk messages are this run's workers
        queue = services.storage.queues.service.get_queue_client(
            SEGMENT_CHUNK_QUEUE, message_decode_policy=TextBase64DecodePolicy()
        )
        messages = [m for m in queue.receive_messages(max_messages=32, visibility_timeout=600)]
        procs = []
        for message in messages:
            queue.delete_message(message)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.paced_sync", "chunk", message.content],
                stdout=subprocess.PIPE, text=True,
            ))  # fmt: skip
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"a chunk worker failed ({proc.returncode})")
            report = json.loads(out.strip().splitlines()[-1])
            workers_cpu += report["cpu_seconds"]
            spans.append(
                (round(report["started"] - wall_start, 1), round(report["ended"] - wall_start, 1))
            )
        chunks = len(procs)
        run = services.runs.get(run.run_id)
        assert run is not None
    seconds = time.perf_counter() - started
    assert run.status == RunStatus.SUCCEEDED, (run.status, run.error)
    return {
        "seconds": round(seconds, 2),
        "arrival_seconds": round(arrived, 2),
        "chunks": chunks,
        "worker_spans": spans,
        "sent": run.counts.get("sent", 0),
        "workers_cpu_seconds": round(_cpu_seconds() - cpu_before + workers_cpu, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _chunk(content: str) -> dict[str, Any]:
    services = Services.from_settings(load_settings())
    started = time.time()
    process_chunk(services, SegmentChunkMessage.model_validate_json(content))
    return {"cpu_seconds": _cpu_seconds(), "started": started, "ended": time.time()}


if __name__ == "__main__":
    if sys.argv[1] == "run":
        result = _run(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        result = _chunk(sys.argv[2])
    print(json.dumps(result))
