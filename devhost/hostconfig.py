"""The parts of host.json the local host honours, with the Functions host's defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def parse_timespan(text: str) -> float:
    """`hh:mm:ss[.fff]` or `d.hh:mm:ss` to seconds."""
    days = 0
    if text.count(":") == 2 and "." in text.split(":")[0]:
        day_text, _, text = text.partition(".")
        days = int(day_text)
    hours, minutes, seconds = text.split(":")
    return days * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


@dataclass(frozen=True)
class HostConfig:
    route_prefix: str = "api"
    function_timeout: float = 600.0
    blob_parallelism: int = 8
    poison_blob_threshold: int = 5
    queue_batch_size: int = 16
    queue_new_batch_threshold: int = 8
    max_dequeue_count: int = 5
    visibility_timeout: float = 0.0
    max_polling_interval: float = 60.0
    message_encoding: str = "base64"

    @classmethod
    def load(cls, path: Path) -> HostConfig:
        if not path.exists():
            return cls()
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        extensions = data.get("extensions", {})
        http = extensions.get("http", {})
        blobs = extensions.get("blobs", {})
        queues = extensions.get("queues", {})
        batch_size = int(queues.get("batchSize", 16))
        return cls(
            route_prefix=str(http.get("routePrefix", "api")).strip("/"),
            function_timeout=parse_timespan(data.get("functionTimeout", "00:10:00")),
            blob_parallelism=int(blobs.get("maxDegreeOfParallelism", 8)),
            poison_blob_threshold=max(1, int(blobs.get("poisonBlobThreshold", 5))),
            queue_batch_size=batch_size,
            queue_new_batch_threshold=int(queues.get("newBatchThreshold", batch_size // 2)),
            max_dequeue_count=int(queues.get("maxDequeueCount", 5)),
            visibility_timeout=parse_timespan(queues.get("visibilityTimeout", "00:00:00")),
            max_polling_interval=parse_timespan(queues.get("maxPollingInterval", "00:01:00")),
            message_encoding=str(queues.get("messageEncoding", "base64")).lower(),
        )
