"""Push dispatch: the send and status routes, and the queue workers that do the sending."""

from __future__ import annotations

import azure.functions as func

from core.push.chunk_runner import run_chunk
from core.push.dispatch import accept, plan
from core.push.dispatch_model import (
    PLAN_QUEUE,
    PUSH_CHUNK_QUEUE,
    DispatchRejected,
    DispatchRequest,
    PlanMessage,
    PushChunkMessage,
)
from core.push.dispatch_status import status
from core.push.templates import TemplateInvalid
from core.verdicts import verdict_on_failure
from functions._wiring import error_response, json_errors, json_response, parse_body, services

bp = func.Blueprint()


@bp.route(route="push/send", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@json_errors
def send_push(req: func.HttpRequest) -> func.HttpResponse:
    request = parse_body(req, DispatchRequest)
    if isinstance(request, func.HttpResponse):
        return request
    try:
        run, created = accept(services(), request)
    except DispatchRejected as exc:
        return error_response(exc.status, exc.code, str(exc))
    except TemplateInvalid as exc:
        return error_response(400, "template_invalid", str(exc))
    body = {
        "dispatch_id": run.run_id,
        "status": run.status.value,
        "status_url": f"/api/push/dispatches/{run.run_id}",
    }
    return json_response(202 if created else 200, body)


@bp.route(
    route="push/dispatches/{dispatch_id}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION
)
@json_errors
def get_push_dispatch(req: func.HttpRequest) -> func.HttpResponse:
    dispatch_id = req.route_params.get("dispatch_id", "")
    found = status(services(), dispatch_id)
    if found is None:
        return error_response(404, "not_found", f"no push dispatch {dispatch_id!r}")
    return json_response(200, found)


@bp.queue_trigger(arg_name="message", queue_name=PLAN_QUEUE, connection="AzureWebJobsStorage")
def plan_push_dispatch(message: func.QueueMessage) -> None:
    planned = PlanMessage.model_validate_json(message.get_body())
    with verdict_on_failure(
        services(), planned.dispatch_id, final=False, attempt=message.dequeue_count
    ):
        plan(services(), planned)


@bp.queue_trigger(arg_name="message", queue_name=PUSH_CHUNK_QUEUE, connection="AzureWebJobsStorage")
def send_push_chunk(message: func.QueueMessage) -> None:
    chunk = PushChunkMessage.model_validate_json(message.get_body())
    with verdict_on_failure(
        services(), chunk.dispatch_id, final=False, attempt=message.dequeue_count
    ):
        run_chunk(services(), chunk)
