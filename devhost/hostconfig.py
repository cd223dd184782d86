"""The parts of host.json the local host honours, with the Functions host's defaults."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
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


OVERRIDE_PREFIX = "AzureFunctionsJobHost__"


def _apply_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """App settings `AzureFunctionsJobHost__a__b` override host.json's `a.b`, as on Azure
    (names matched without regard to case)."""
    for name, value in environ.items():
        if not name.startswith(OVERRIDE_PREFIX):
            continue
        *parents, leaf = name[len(OVERRIDE_PREFIX) :].split("__")
        node = data
        for part in parents:
            key = next((k for k in node if k.lower() == part.lower()), part)
            node = node.setdefault(key, {})
        key = next((k for k in node if k.lower() == leaf.lower()), leaf)
        node[key] = value


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
    def load(cls, path: Path, environ: Mapping[str, str] | None = None) -> HostConfig:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        _apply_overrides(data, os.environ if environ is None else environ)
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
