"""A fake AEP streaming inlet (`POST /collection/batch/{connection id}`) for tests and demo.

Speaks the envelope the HTTP API source documents: an array of messages, each with a
`header` (schemaRef, imsOrgId, datasetId, source) and a `body` (xdmMeta, xdmEntity with
`_id`). It checks `x-gw-ims-org-id` and, when given a token, `Authorization: Bearer`
(401/403), refuses malformed envelopes (400) and records over 1 MB (413), answers 429 with
`Retry-After` every `limit_every`-th request and 503 every `fail_every`-th, and keeps what
it accepted (`GET /_fake/received`: entities per dataset, keyed by `_id`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from devhost.fakes.base import JsonFake, Reply

MAX_RECORD_BYTES = 1024 * 1024


@dataclass
class FakeAepState:
    org_id: str = "EXAMPLE0123456789@AdobeOrg"
    token: str | None = None
    limit_every: int = 0
    fail_every: int = 0
    requests: int = 0
    rate_limited: int = 0
    failed: int = 0
    received: dict[str, dict[str, Any]] = field(default_factory=dict)
    """dataset id -> `_id` -> the last xdmEntity received with it."""
    messages: int = 0


class FakeAep(JsonFake):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        super().__init__(host, port, FakeAepState(**config))

    def inlet_url(self, connection_id: str = "0123456789abcdef") -> str:
        return f"{self.url}/collection/batch/{connection_id}"

    def _get(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path == "/_fake/received":
            with self.lock:
                return 200, {"received": self.state.received, "messages": self.state.messages}, {}
        return 404, {"message": "not found"}, {}

    def _post(self, path: str, headers: dict[str, str], body: bytes) -> Reply:
        if path == "/_fake/config":
            self.configure(**json.loads(body or b"{}"))
            return 200, {"ok": True}, {}
        if path.startswith("/collection/batch/"):
            return self._collect(path.rsplit("/", 1)[-1], headers, body)
        return 404, {"message": "not found"}, {}

    def _collect(self, inlet: str, headers: dict[str, str], body: bytes) -> Reply:
        lowered = {k.lower(): v for k, v in headers.items()}
        with self.lock:
            state = self.state
            state.requests += 1
            if state.limit_every and state.requests % state.limit_every == 0:
                state.rate_limited += 1
                return 429, {"message": "too many requests"}, {"Retry-After": "0.05"}
            if state.fail_every and state.requests % state.fail_every == 0:
                state.failed += 1
                return 503, {"message": "service unavailable"}, {}
            if state.token is not None and lowered.get("authorization") != f"Bearer {state.token}":
                return 401, {"message": "missing or invalid token"}, {}
            if lowered.get("x-gw-ims-org-id") != state.org_id:
                return 403, {"message": "unknown IMS org"}, {}
            try:
                messages = json.loads(body)
                entities = [self._entity(m, state.org_id) for m in messages]
            except (ValueError, KeyError, TypeError) as exc:
                return 400, {"message": f"invalid envelope: {exc}"}, {}
            if any(size > MAX_RECORD_BYTES for _, _, size in entities):
                return 413, {"message": "record over 1 MB"}, {}
            for dataset, entity, _ in entities:
                state.received.setdefault(dataset, {})[entity["_id"]] = entity
            state.messages += len(entities)
        receipt = {
            "inletId": inlet,
            "batchId": uuid.uuid4().hex,
            "receivedTimeMs": int(time.time() * 1000),
        }
        return 200, receipt, {}

    @staticmethod
    def _entity(message: dict[str, Any], org_id: str) -> tuple[str, dict[str, Any], int]:
        header, payload = message["header"], message["body"]
        if header["imsOrgId"] != org_id or not header["schemaRef"]["id"]:
            raise ValueError("header does not match the inlet")
        if payload["xdmMeta"]["schemaRef"]["id"] != header["schemaRef"]["id"]:
            raise ValueError("xdmMeta.schemaRef differs from the header's")
        entity = payload["xdmEntity"]
        if not isinstance(entity, dict) or not entity.get("_id"):
            raise ValueError("xdmEntity has no _id")
        return str(header["datasetId"]), entity, len(json.dumps(entity))
