"""The four-hourly log export: its timer, and the operator route that runs it on demand."""

from __future__ import annotations

from datetime import datetime

import azure.functions as func
from pydantic import AwareDatetime, BaseModel, ConfigDict

from core.export.service import run_log_export
from functions._wiring import (
    SETTINGS,
    error_response,
    json_errors,
    json_response,
    parse_body,
    services,
)

bp = func.Blueprint()


@bp.timer_trigger(
    arg_name="timer", schedule=SETTINGS.log_export_schedule, run_on_startup=False, use_monitor=True
)
def log_export_timer(timer: func.TimerRequest) -> None:
    source = "timer (past due)" if timer.past_due else "timer"
    run_log_export(services(), source=source)


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = False
    """Export now even though this four-hour slot had its export."""
    window_start: AwareDatetime | None = None
    """Re-export one window exported before (its files are rewritten, byte for byte)."""


@bp.route(route="log-export/run", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@json_errors
def run_log_export_now(req: func.HttpRequest) -> func.HttpResponse:
    request = parse_body(req, ExportRequest)
    if isinstance(request, func.HttpResponse):
        return request
    window: datetime | None = request.window_start
    outcome = run_log_export(
        services(),
        force=request.force or window is not None,
        window_start=window,
        source="operator",
    )
    if outcome.refused is not None:
        message = str(outcome.run.detail.get("reason") or outcome.run.error)
        return error_response(409, outcome.refused, message)
    return json_response(200, outcome.run.public())
