"""Queue messages for fan-out: small JSON references, never payloads.

Messages are base64-encoded text, the Functions host's default `messageEncoding`, so the
queue trigger decodes them exactly as sent. A message over 64 KB (after encoding) is
refused here rather than by the service, with a message that says what to do instead.
"""

from __future__ import annotations

import base64
import contextlib
from typing import Any

from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import QueueServiceClient, TextBase64DecodePolicy, TextBase64EncodePolicy
from pydantic import BaseModel

from core.errors import MessageTooLarge

MAX_MESSAGE_BYTES = 64 * 1024


def encoded_size(text: str) -> int:
    return len(base64.b64encode(text.encode("utf-8")))


class QueueSender:
    """Sends typed messages to named queues on one storage account."""

    def __init__(self, service: QueueServiceClient) -> None:
        self.service = service
        self._ensured: set[str] = set()

    def _client(self, queue: str) -> Any:
        client = self.service.get_queue_client(
            queue,
            message_encode_policy=TextBase64EncodePolicy(),
            message_decode_policy=TextBase64DecodePolicy(),
        )
        if queue not in self._ensured:
            with contextlib.suppress(ResourceExistsError):
                client.create_queue()
            self._ensured.add(queue)
        return client

    def send(self, queue: str, message: BaseModel, *, delay_seconds: int | None = None) -> str:
        """Enqueue `message` as JSON; returns the message id."""
        text = message.model_dump_json()
        size = encoded_size(text)
        if size > MAX_MESSAGE_BYTES:
            raise MessageTooLarge(
                f"queue {queue}: message of {size} bytes exceeds 64 KB; "
                "put the data in a blob and send its name instead"
            )
        sent = self._client(queue).send_message(text, visibility_timeout=delay_seconds)
        return str(sent.id)

    def depth(self, queue: str) -> int:
        props = self._client(queue).get_queue_properties()
        return int(props.approximate_message_count or 0)
