"""How runs end when their own trigger cannot say: poison queues, the sweeper, retries.

One queue trigger per poison queue the host fills (`<queue>-poison`, and
`webjobs-blobtrigger-poison` for blobs), the run sweeper's timer (which also drops audit
months past their retention), and the worker of operator retries (`run-retries`). The
logic is `core/verdicts.py`, `core/retries.py` and `core/audit.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import azure.functions as func

from core.audit import AuditLog
from core.retries import RETRY_QUEUE, RetryMessage, run_retry
from core.verdicts import poison_queue_names, poisoned, sweep, verdict_on_failure
from core.webhooks.deliveries import purge_processed
from core.webhooks.processing import run_batches
from functions._wiring import SETTINGS, services, webhook_providers

bp = func.Blueprint()


def _poison_handler(queue: str) -> Callable[[func.QueueMessage], None]:
    def handle(message: func.QueueMessage) -> None:
        poisoned(services(), queue, message.get_body())

    return handle


for _queue in poison_queue_names():
    _name = "poison_" + _queue.removesuffix("-poison").replace("-", "_")
    bp.function_name(name=_name)(
        bp.queue_trigger(arg_name="message", queue_name=_queue, connection="AzureWebJobsStorage")(
            _poison_handler(_queue)
        )
    )


@bp.timer_trigger(
    arg_name="timer", schedule=SETTINGS.run_sweep_schedule, run_on_startup=False, use_monitor=True
)
def run_sweeper(timer: func.TimerRequest) -> None:
    sweep(services())
    AuditLog(services().storage).purge(retention_days=SETTINGS.audit_retention_days)
    purge_processed(services().storage, retention_days=SETTINGS.webhook_retention_days)
    run_batches(services(), webhook_providers())  # after a batcher lost with its lease


@bp.queue_trigger(arg_name="message", queue_name=RETRY_QUEUE, connection="AzureWebJobsStorage")
def retry_run(message: func.QueueMessage) -> None:
    retry = RetryMessage.model_validate_json(message.get_body())
    with verdict_on_failure(services(), retry.run_id, final=False, attempt=message.dequeue_count):
        run_retry(services(), retry)
