"""Operator routes for privacy: the exclusion audit trail (`core/audit.py`) and erasure
requests (`core/privacy/erasure.py`)."""

from __future__ import annotations

import azure.functions as func

from core.audit import AuditQuery, lookup_answer
from core.privacy.erasure import ErasureRequest, request_erasure
from functions._wiring import (
    SETTINGS,
    error_response,
    json_errors,
    json_response,
    parse_body,
    services,
)

bp = func.Blueprint()


@bp.route(route="audit/lookup", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@json_errors
def audit_lookup(req: func.HttpRequest) -> func.HttpResponse:
    """Why a person was kept out of sends: `{"email"|"phone"|"profile_id": ...}` (a body,
    so the address is in no URL or access log); the answer names them by hash only."""
    query = parse_body(req, AuditQuery)
    if isinstance(query, func.HttpResponse):
        return query
    try:
        answer = lookup_answer(services().storage, query, SETTINGS.audit_retention_days)
    except ValueError as exc:
        return error_response(400, "bad_subject", str(exc))
    return json_response(200, answer)


@bp.route(route="privacy/erasure", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@json_errors
def erasure(req: func.HttpRequest) -> func.HttpResponse:
    """A person's data out of every store: `{"profile_ids", "emails", "phones", "reference"}`
    -> 202 with the run (identifiers by hash only) and where to follow it."""
    request = parse_body(req, ErasureRequest)
    if isinstance(request, func.HttpResponse):
        return request
    try:
        run = request_erasure(services(), request)
    except ValueError as exc:
        return error_response(400, "bad_subject", str(exc))
    return json_response(202, {**run.public(), "status_url": f"/api/runs/{run.run_id}"})
