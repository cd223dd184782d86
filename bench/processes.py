"""Benchmark steps in processes of their own, so each one's peak RSS is its own."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def in_process(module: str, *arguments: str) -> dict[str, Any]:
    """Run `python -m <module> <arguments>`; its last stdout line is a JSON object."""
    output = subprocess.run(
        [sys.executable, "-m", module, *arguments], check=True, capture_output=True, text=True
    ).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))
