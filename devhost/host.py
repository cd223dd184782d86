"""The local Functions host: HTTP, blob, queue and timer triggers for one function app.

A development tool only. Production runs on the Azure Functions host; this hosts the same
`function_app.py`, unchanged, from the bindings the `azure-functions` library declares.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from azure.functions.queue import QueueMessage as WorkerQueueMessage

from devhost.app import HostedFunction, HostError, load_functions
from devhost.blobs import BlobTriggerWatcher
from devhost.hostconfig import HostConfig
from devhost.http import HttpFrontEnd
from devhost.queues import QueueTriggerWatcher
from devhost.timers import TimerTriggerWatcher

log = logging.getLogger("devhost")


class Watcher(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


class DevHost:
    def __init__(
        self,
        app_file: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 7071,
        blob_scan_interval: float = 1.0,
        host_id: str = "devhost",
    ) -> None:
        self.app_file = app_file
        self.config = HostConfig.load(app_file.parent / "host.json")
        self.module, self.functions = load_functions(app_file)
        supported = {"httpTrigger", "blobTrigger", "queueTrigger", "timerTrigger"}
        for function in self.functions:
            if function.trigger_type not in supported:
                raise HostError(f"{function.name}: {function.trigger_type} is not hosted locally")
        self.executor = ThreadPoolExecutor(
            max_workers=self.config.blob_parallelism
            + self.config.queue_batch_size
            + self.config.queue_new_batch_threshold,
            thread_name_prefix="invoke",
        )
        self.blob_watchers: dict[str, BlobTriggerWatcher] = {}
        self.queue_watchers: dict[str, QueueTriggerWatcher] = {}
        self.timer_watchers: dict[str, TimerTriggerWatcher] = {}
        for function in self.functions:
            if function.trigger_type == "blobTrigger":
                self.blob_watchers[function.name] = BlobTriggerWatcher(
                    function,
                    self.executor,
                    host_id=host_id,
                    poison_threshold=self.config.poison_blob_threshold,
                    scan_interval=blob_scan_interval,
                )
            elif function.trigger_type == "queueTrigger":
                self.queue_watchers[function.name] = QueueTriggerWatcher(
                    function, self.executor, self.config
                )
            elif function.trigger_type == "timerTrigger":
                self.timer_watchers[function.name] = TimerTriggerWatcher(function, host_id=host_id)
        self.http = HttpFrontEnd(
            self.functions,
            host=host,
            port=port,
            route_prefix=self.config.route_prefix,
            invoke_admin=self.invoke_admin,
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.http.host}:{self.http.port}"

    def _watchers(self) -> list[Watcher]:
        return [
            *self.blob_watchers.values(),
            *self.queue_watchers.values(),
            *self.timer_watchers.values(),
        ]

    def start(self) -> None:
        for watcher in self._watchers():
            watcher.start()
        self.http.start()

    def stop(self) -> None:
        self.http.stop()
        for watcher in self._watchers():
            watcher.stop()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> list[str]:
        lines = []
        for function in self.functions:
            trigger = function.trigger
            if function.trigger_type == "httpTrigger":
                methods = ",".join(trigger.get("methods") or ["*"])
                route = trigger.get("route") or function.name
                detail = f"[{methods}] {self.base_url}/{self.config.route_prefix}/{route}"
            elif function.trigger_type == "blobTrigger":
                detail = f"blob {trigger['path']}"
            elif function.trigger_type == "queueTrigger":
                detail = f"queue {trigger['queueName']}"
            else:
                detail = f"timer {trigger['schedule']}"
            lines.append(f"{function.name}: {detail}")
        return lines

    def invoke_admin(self, function: HostedFunction, payload: dict[str, Any]) -> None:
        """Run a non-HTTP function now, in the background (admin API semantics)."""
        self.executor.submit(self._invoke_admin, function, str(payload.get("input", "")))

    def _invoke_admin(self, function: HostedFunction, value: str) -> None:
        try:
            if function.trigger_type == "timerTrigger":
                self.timer_watchers[function.name].fire(datetime.now(UTC), past_due=False)
            elif function.trigger_type == "blobTrigger":
                watcher = self.blob_watchers[function.name]
                watcher.invoke(value.partition("/")[2] if "/" in value else value)
            elif function.trigger_type == "queueTrigger":
                message = WorkerQueueMessage(
                    id=str(uuid.uuid4()), body=value.encode(), dequeue_count=1
                )
                function.invoke({function.trigger["name"]: message})
        except Exception:
            log.exception("admin invocation of %s failed", function.name)
