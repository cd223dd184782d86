"""The answering side of `POST /api/webhooks/{provider}`: verify, keep, queue, answer.

    unknown or unconfigured provider -> 404      body over the provider's limit -> 413
    signature missing / wrong, stale -> 401      body its provider cannot read  -> 400
    verified -> body kept create-only (blob named by the delivery's id) -> queued -> 200
    the same delivery again          -> 200 (`duplicate`), queued again if not yet processed
    the same one-time token, other bytes (Mailgun) -> 401 (a replayed signature)
    keeping or queueing failed       -> the provider's retry status (it sends again)

Nothing is parsed before the signature is checked over the exact bytes, and nothing but the
provider, a refusal code and a digest is logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from core.errors import BlobAlreadyExists
from core.runs import new_run_id
from core.storage import Storage
from core.webhooks.deliveries import (
    DELIVERY_QUEUE,
    WEBHOOKS_CONTAINER,
    DeliveryMessage,
    DeliveryRecord,
    blob_name,
    body_sha256,
    metadata_for,
)
from core.webhooks.hook import (
    Forged,
    InboundRequest,
    Refused,
    StoredDelivery,
    TooLarge,
    Verified,
    WebhookProvider,
    digest,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _error(status: int, code: str, message: str) -> Answer:
    return Answer(status, {"error": {"code": code, "message": message}})


class WebhookReceiver:
    """One per worker process; `refusals` counts what was turned away, by provider and code."""

    def __init__(
        self,
        storage: Storage,
        providers: Mapping[str, WebhookProvider],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.storage = storage
        self.providers = providers
        self.clock = clock
        self.refusals: Counter[str] = Counter()

    def receive(self, name: str, request: InboundRequest) -> Answer:
        provider = self.providers.get(name)
        if provider is None:
            return _error(404, "unknown_provider", "no webhook provider is configured by that name")
        now = self.clock()
        try:
            declared = int(request.header("content-length") or 0)
            if max(declared, len(request.body)) > provider.max_body_bytes:
                raise TooLarge(f"the body is over {provider.max_body_bytes} bytes")
            verified = provider.verify(request, now)
            if verified.reply is not None:
                return Answer(200, verified.reply)
            kept = {h: v for h in provider.kept_headers if (v := request.header(h)) is not None}
            delivery = StoredDelivery(
                name, verified.delivery_id, now, request.url, kept, request.body
            )
            provider.events(delivery)  # a body it cannot read is refused, never kept
        except Refused as exc:
            self.refusals[f"{name}.{exc.code}"] += 1
            log.warning("webhook refused", extra={"provider": name, "refusal": exc.code})
            return _error(exc.status, exc.code, str(exc))
        except ValueError:  # content-length that is not a number
            self.refusals[f"{name}.bad_request"] += 1
            return _error(400, "bad_request", "the Content-Length header is not a number")
        except OSError:  # a fetch of the provider's own (a certificate, a confirmation) failed
            log.warning("webhook verification could not fetch", extra={"provider": name})
            return self._retry(provider, "provider_unreachable", "could not verify; send again")
        return self._keep(provider, verified, delivery)

    def _keep(
        self, provider: WebhookProvider, verified: Verified, delivery: StoredDelivery
    ) -> Answer:
        name = provider.name
        key = digest(name, verified.delivery_id)
        blob = blob_name(name, key)
        run_id = new_run_id(delivery.received_at, seed=f"webhook:{key}")
        message = DeliveryMessage(provider=name, digest=key, blob=blob, run_id=run_id)
        metadata = metadata_for(
            verified.delivery_id, delivery.received_at, delivery.url, dict(delivery.headers),
            delivery.body,
        )  # fmt: skip
        try:
            try:
                self.storage.blobs.create(
                    WEBHOOKS_CONTAINER, blob, delivery.body, metadata=metadata
                )
            except BlobAlreadyExists:
                return self._again(provider, verified, delivery, key, message)
            self.storage.queues.send(DELIVERY_QUEUE, message)
        except Exception:
            log.exception("webhook delivery not kept", extra={"provider": name, "digest": key})
            return self._retry(provider, "storage_unavailable", "not kept; send it again")
        log.info("webhook delivery kept", extra={"provider": name, "digest": key})
        return Answer(200, {"status": "accepted", "delivery": key[:16]})

    def _again(
        self,
        provider: WebhookProvider,
        verified: Verified,
        delivery: StoredDelivery,
        key: str,
        message: DeliveryMessage,
    ) -> Answer:
        """The same delivery id again: the provider's retry, or (same token, other bytes)
        a replayed signature."""
        found = self.storage.blobs.read_with_metadata(WEBHOOKS_CONTAINER, message.blob)
        other = found is not None and found[2].get("body_sha256") != body_sha256(delivery.body)
        if other and verified.replay_guarded:
            self.refusals[f"{provider.name}.replayed"] += 1
            log.warning("webhook refused", extra={"provider": provider.name, "refusal": "replayed"})
            return _error(401, Forged.code, "this signature was already used for another body")
        if self.storage.tables.get(DeliveryRecord).get(provider.name, key) is None:
            self.storage.queues.send(DELIVERY_QUEUE, message)  # perhaps never queued
        return Answer(200, {"status": "duplicate", "delivery": key[:16]})

    def _retry(self, provider: WebhookProvider, code: str, message: str) -> Answer:
        answer = _error(provider.retry_status, code, message)
        return Answer(answer.status, answer.body, {"Retry-After": "5"})
