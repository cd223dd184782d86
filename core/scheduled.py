"""Timer firings recorded as runs, so operators see every scheduled job in `GET /runs`."""

from __future__ import annotations

from datetime import datetime

from core.runs import RunKind, RunRecord, RunStatus
from core.services import Services


def record_firing(
    services: Services,
    kind: RunKind,
    *,
    schedule: str,
    past_due: bool,
    now: datetime | None = None,
) -> RunRecord:
    """Record that a timer fired (and whether it fired late)."""
    run = services.runs.start(
        kind, source=f"timer {schedule}", detail={"past_due": past_due}, now=now
    )
    return services.runs.finish(run.run_id, RunStatus.SUCCEEDED, counts={}, now=now)
