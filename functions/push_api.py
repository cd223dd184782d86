"""Push routes for apps: token registration and interaction events."""

from __future__ import annotations

import azure.functions as func

from core.events.store import EventStore
from core.push.interactions import AppEventBatch, record_app_events
from core.push.tokens import AppMismatch, TokenRegistration, TokenRegistry
from functions._wiring import error_response, json_errors, json_response, parse_body, services

bp = func.Blueprint()


@bp.route(route="push/tokens", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@json_errors
def register_push_token(req: func.HttpRequest) -> func.HttpResponse:
    request = parse_body(req, TokenRegistration)
    if isinstance(request, func.HttpResponse):
        return request
    app = services().syncs().push_app(request.app_id)
    if app is None:
        return error_response(
            404, "unknown_app", f"no push app is declared with id {request.app_id!r}"
        )
    try:
        result = TokenRegistry(services().storage).register(app, request)
    except AppMismatch as exc:
        return error_response(409, "app_mismatch", str(exc))
    return json_response(201 if result["status"] == "registered" else 200, result)


@bp.route(route="push/events", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@json_errors
def record_push_events(req: func.HttpRequest) -> func.HttpResponse:
    batch = parse_body(req, AppEventBatch)
    if isinstance(batch, func.HttpResponse):
        return batch
    if services().syncs().push_app(batch.app_id) is None:
        return error_response(
            404, "unknown_app", f"no push app is declared with id {batch.app_id!r}"
        )
    return json_response(202, record_app_events(EventStore(services().storage), batch))
