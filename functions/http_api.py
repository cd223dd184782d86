"""Operator HTTP routes: health and run reports."""

from __future__ import annotations

import azure.functions as func

from core.health import health_report
from core.retries import RetryRefused, request_retry
from core.runs import RunKind, RunStatus
from functions._wiring import error_response, json_errors, json_response, services

bp = func.Blueprint()

_MAX_LIMIT = 500


@bp.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
@json_errors
def health(req: func.HttpRequest) -> func.HttpResponse:
    status, body = health_report(services())
    return json_response(status, body)


@bp.route(route="runs", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
@json_errors
def list_runs(req: func.HttpRequest) -> func.HttpResponse:
    try:
        limit = int(req.params.get("limit", "50"))
        kind = RunKind(req.params["kind"]) if "kind" in req.params else None
        status = RunStatus(req.params["status"]) if "status" in req.params else None
    except ValueError as exc:
        return error_response(400, "bad_query", f"invalid query parameter: {exc}")
    if not 1 <= limit <= _MAX_LIMIT:
        return error_response(400, "bad_query", f"limit must be between 1 and {_MAX_LIMIT}")
    runs = services().runs.recent(
        limit=limit, kind=kind, status=status, sync_id=req.params.get("sync_id")
    )
    return json_response(200, {"runs": [run.public() for run in runs]})


@bp.route(route="runs/{run_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
@json_errors
def get_run(req: func.HttpRequest) -> func.HttpResponse:
    run_id = req.route_params["run_id"]
    run = services().runs.get(run_id)
    if run is None:
        return error_response(404, "run_not_found", f"no run with id {run_id!r}")
    return json_response(200, run.public())


@bp.route(route="runs/{run_id}/retry", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@json_errors
def retry_failed_run(req: func.HttpRequest) -> func.HttpResponse:
    """Start a failed run again under its id (core/retries.py): 202, the reopened run."""
    try:
        run = request_retry(services(), req.route_params["run_id"])
    except RetryRefused as exc:
        return error_response(exc.status, exc.code, str(exc))
    return json_response(202, run.public())
