"""Runs benchmarks against the services `python -m devhost.services` started.

Each benchmark prints its figures and ratios, measured side by side in one run, and writes
them to bench/results/<name>.json together with the date and machine.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import currents, log_export, push, segment_sync, storage, webhooks

RESULTS = Path(__file__).parent / "results"
BENCHMARKS: dict[str, Callable[[], dict[str, Any]]] = {
    "storage": storage.run,
    "segment_sync": segment_sync.run,
    "currents": currents.run,
    "log_export": log_export.run,
    "push": push.run,
    "webhooks": webhooks.run,
}
# Named by the contract; each arrives with its feature.
PLANNED: tuple[str, ...] = ()


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        planned = [n for n in unknown if n in PLANNED]
        print(f"bench: unknown {unknown}; available: {sorted(BENCHMARKS)}", file=sys.stderr)
        if planned:
            print(f"bench: {planned} arrive with their features", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        print(f"== {name}")
        figures = BENCHMARKS[name]()
        record = {
            "benchmark": name,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "figures": figures,
        }
        (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"   -> bench/results/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
