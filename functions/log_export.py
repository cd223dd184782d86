"""Timer: the four-hourly export of delivery and tracking logs back to the CDP."""

from __future__ import annotations

import azure.functions as func

from core.runs import RunKind
from core.scheduled import record_firing
from functions._wiring import SETTINGS, services

bp = func.Blueprint()


@bp.timer_trigger(
    arg_name="timer", schedule=SETTINGS.log_export_schedule, run_on_startup=False, use_monitor=True
)
def log_export_timer(timer: func.TimerRequest) -> None:
    record_firing(
        services(),
        RunKind.LOG_EXPORT,
        schedule=SETTINGS.log_export_schedule,
        past_due=timer.past_due,
    )
