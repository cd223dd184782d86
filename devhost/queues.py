"""Queue triggers: polling with the host's dequeue, retry and poison-queue rules.

Messages are fetched in batches of `batchSize`, and another batch once fewer than
`newBatchThreshold` of them still run (as the host does); kept invisible while the function runs,
deleted on success and made visible again after `visibilityTimeout` on failure. A message
that has failed `maxDequeueCount` times moves to `<queue>-poison`. Empty polls back off
exponentially up to `maxPollingInterval`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import threading
from concurrent.futures import Executor, Future
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage as WorkerQueueMessage
from azure.storage.queue import QueueClient, QueueMessage

from devhost.app import HostedFunction, resolve_setting_refs
from devhost.hostconfig import HostConfig
from devhost.storage import storage_for

log = logging.getLogger("devhost.queues")
_MIN_POLL_SECONDS = 0.1


class QueueTriggerWatcher:
    def __init__(self, function: HostedFunction, executor: Executor, config: HostConfig) -> None:
        self.function = function
        self.queue_name = resolve_setting_refs(function.trigger["queueName"]).lower()
        storage = storage_for(function.trigger.get("connection"))
        self.queue: QueueClient = storage.queue_service.get_queue_client(self.queue_name)
        self.poison: QueueClient = storage.queue_service.get_queue_client(
            f"{self.queue_name}-poison"
        )
        self.executor = executor
        self.config = config
        # Invisible for the whole function timeout, like the host's renewed lease.
        self.lease_seconds = int(max(30.0, config.function_timeout))
        self._stop = threading.Event()
        self._room = threading.Condition()
        self._in_flight = 0
        self._thread = threading.Thread(
            target=self._loop, name=f"queue:{function.name}", daemon=True
        )

    def start(self) -> None:
        for client in (self.queue, self.poison):
            with contextlib.suppress(ResourceExistsError):
                client.create_queue()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        delay = _MIN_POLL_SECONDS
        while not self._stop.is_set():
            with self._room:  # the host fetches more once fewer than newBatchThreshold run
                while self._in_flight > self.config.queue_new_batch_threshold:
                    self._room.wait(timeout=1)
                    if self._stop.is_set():
                        return
            try:
                handled = self.poll_once()
            except Exception:
                log.exception("polling %s failed", self.queue_name)
                handled = 0
            delay = (
                _MIN_POLL_SECONDS if handled else min(delay * 2, self.config.max_polling_interval)
            )
            if not handled:
                self._stop.wait(delay)

    def poll_once(self) -> int:
        """Fetch one batch and hand it to the executor; returns the number of messages."""
        messages = list(
            self.queue.receive_messages(
                max_messages=self.config.queue_batch_size, visibility_timeout=self.lease_seconds
            )
        )
        for message in messages:
            with self._room:
                self._in_flight += 1
            future: Future[None] = self.executor.submit(self._handle, message)
            future.add_done_callback(self._finished)
        return len(messages)

    def _finished(self, _: Future[None]) -> None:
        with self._room:
            self._in_flight -= 1
            self._room.notify_all()

    def _decode(self, content: Any) -> bytes:
        raw = content.encode() if isinstance(content, str) else bytes(content)
        if self.config.message_encoding == "base64":
            try:
                return base64.b64decode(raw, validate=True)
            except binascii.Error:
                raise ValueError(
                    "message is not valid base64 (host.json messageEncoding)"
                ) from None
        return raw

    def _handle(self, message: QueueMessage) -> None:
        try:
            body = self._decode(message.content)
            argument = WorkerQueueMessage(
                id=message.id,
                body=body,
                dequeue_count=message.dequeue_count,
                expiration_time=message.expires_on,
                insertion_time=message.inserted_on,
                time_next_visible=message.next_visible_on,
                pop_receipt=message.pop_receipt,
            )
            self.function.invoke({self.function.trigger["name"]: argument})
        except Exception:
            log.exception(
                "function %s failed on message %s (dequeue count %s)",
                self.function.name,
                message.id,
                message.dequeue_count,
            )
            self._after_failure(message)
        else:
            self._delete(message)

    def _after_failure(self, message: QueueMessage) -> None:
        if (message.dequeue_count or 0) >= self.config.max_dequeue_count:
            self.poison.send_message(message.content)
            self._delete(message)
            log.warning("message %s moved to %s-poison", message.id, self.queue_name)
            return
        # A lost pop receipt means the message reappears by itself anyway.
        with contextlib.suppress(ResourceNotFoundError):
            self.queue.update_message(
                message, visibility_timeout=int(self.config.visibility_timeout)
            )

    def _delete(self, message: QueueMessage) -> None:
        with contextlib.suppress(ResourceNotFoundError):
            self.queue.delete_message(message)
