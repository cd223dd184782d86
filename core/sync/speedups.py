"""The native speed-ups (native/switchboard_sync.c), loaded once, and glibc's allocator
tuned for them at import. None when the extension was not built: every caller then uses
its Python reference (core/sync/native.py says when each is used)."""

from __future__ import annotations

import importlib
from typing import Any


def _load_speedups() -> Any:
    try:
        return importlib.import_module("switchboard_sync")
    except ImportError:  # not built (no compiler where it was installed): the reference
        return None


SPEEDUPS = _load_speedups()
"""native/switchboard_sync.c, or None; core/sync/native.py says when it is used."""
_MMAP_THRESHOLD = 2 << 20
_TRIM_THRESHOLD = 16 << 20
ALLOCATOR_TUNED = SPEEDUPS is not None and SPEEDUPS.tune_allocator(_MMAP_THRESHOLD, _TRIM_THRESHOLD)
"""Whether glibc's allocator thresholds are pinned (docs/decisions.md, "A first run's
memory"): blocks of 2 MB or more are mapped and given back when freed, whatever the
largest block freed so far; the environment's MALLOC_*_THRESHOLD_ take precedence."""
