"""Provider webhooks: `POST /api/webhooks/{provider}` (core/webhooks/receive.py), the
worker that applies each kept delivery and the batcher that moves their events into the
event store (core/webhooks/processing.py).

Anonymous: providers cannot send function keys, which is why every provider's signature
is mandatory and an unconfigured provider answers 404.
"""

from __future__ import annotations

import functools
import json

import azure.functions as func

from core.webhooks.deliveries import DELIVERY_QUEUE, DeliveryMessage
from core.webhooks.hook import InboundRequest
from core.webhooks.processing import process_delivery, run_batches
from core.webhooks.receive import WebhookReceiver
from functions._wiring import SETTINGS, services, webhook_providers

bp = func.Blueprint()


@functools.cache
def receiver() -> WebhookReceiver:
    return WebhookReceiver(services().storage, webhook_providers())


@bp.route(route="webhooks/{provider}", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
def webhook(req: func.HttpRequest) -> func.HttpResponse:
    request = InboundRequest(
        method=req.method,
        url=req.url,
        headers={k.lower(): v for k, v in req.headers.items()},
        body=req.get_body() or b"",
        query=dict(req.params),
    )
    answer = receiver().receive(req.route_params.get("provider", ""), request)
    return func.HttpResponse(
        json.dumps(answer.body), status_code=answer.status, mimetype="application/json",
        headers=answer.headers,
    )  # fmt: skip


@bp.queue_trigger(arg_name="message", queue_name=DELIVERY_QUEUE, connection="AzureWebJobsStorage")
def webhook_delivery(message: func.QueueMessage) -> None:
    delivery = DeliveryMessage.model_validate_json(message.get_body())
    process_delivery(services(), webhook_providers(), delivery)


# Timer triggers run on one instance at a time; sub-minute schedules need no monitor.
@bp.timer_trigger(
    arg_name="timer", schedule=SETTINGS.webhook_batch_schedule, run_on_startup=False,
    use_monitor=False,
)  # fmt: skip
def webhook_batches(timer: func.TimerRequest) -> None:
    run_batches(services(), webhook_providers())
