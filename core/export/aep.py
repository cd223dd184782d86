"""Adobe Experience Platform streaming ingestion as a log export target.

Instead of files in the landing container, each record goes to AEP's HTTP API inlet
(`POST {dcs}/collection/batch/{connection id}`) in the XDM envelope, `header` (schema,
IMS org, dataset, flow, source) and `body` (`xdmMeta`, `xdmEntity`), batched under a
message count and body size, paced, with 429 waits and 5xx retries (core/http.py). A
record over the Profile limit for ExperienceEvents (10 KB) is not sent and is counted as
rejected in the manifest. The manifest itself is still written to the export container:
it is the record of what was sent. A retried window re-sends its records with the same
`_id`s (AEP's Profile store keeps one event per `_id`; the data lake keeps what it gets).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import orjson
import requests
from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from core.errors import TerminalError
from core.http import PoliteSender

MAX_RECORD_BYTES = 10 * 1024
_TERMINAL = {400: "bad request", 401: "unauthorized", 403: "forbidden", 404: "unknown inlet"}
LogName = Literal["broadLog", "trackingLog", "nonDeliverableAddresses", "profilePreferences"]


class LogDataset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_id: HttpUrl
    """`https://ns.adobe.com/{tenant}/schemas/{id}` of the ExperienceEvent schema."""
    dataset_id: str = Field(min_length=1, max_length=64)


class AepStreamingTarget(BaseModel):
    """`SWITCHBOARD_AEP_STREAMING` (JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inlet_url: HttpUrl
    """`https://dcs.adobedc.net/collection/batch/{CONNECTION_ID}`."""
    org_id: str = Field(pattern=r"^[A-Za-z0-9]+@AdobeOrg$")
    flow_id: str | None = None
    source_name: str = "switchboard"
    logs: dict[LogName, LogDataset]
    max_batch_messages: int = Field(default=100, ge=1, le=1000)
    max_body_bytes: int = Field(default=1_000_000, ge=20_000, le=10_000_000)
    requests_per_second: float = Field(default=20.0, gt=0, le=1500)


class AepStreamingClient:
    def __init__(
        self,
        target: AepStreamingTarget,
        *,
        access_token: str | None = None,
        api_key: str | None = None,
        session: requests.Session | None = None,
        max_attempts: int = 5,
        **sender_options: Any,
    ) -> None:
        self.target = target
        headers = {"Content-Type": "application/json", "x-gw-ims-org-id": target.org_id}
        if access_token:  # authenticated inlets; unauthenticated ones take no auth headers
            headers["Authorization"] = f"Bearer {access_token}"
        if api_key:
            headers["x-api-key"] = api_key
        self._sender = PoliteSender(
            "AEP streaming", str(target.inlet_url), headers,
            requests_per_second=target.requests_per_second, max_attempts=max_attempts,
            session=session, **sender_options,
        )  # fmt: skip

    def send(self, messages: list[bytes]) -> int:
        """One batch of encoded envelopes; returns the requests it took."""
        delivered = self._sender.post(b"[" + b",".join(messages) + b"]")
        status = delivered.response.status_code
        if status >= 400:
            reason = _TERMINAL.get(status, "refused")
            raise TerminalError(
                f"AEP streaming refused a batch: {status} {reason}: "
                f"{delivered.response.text[:200]}",
                status=status,
            )
        return delivered.requests


class AepStreamingWriter:
    """The streaming counterpart of a log file: same `write` / `close` as LogFile."""

    def __init__(self, client: AepStreamingClient, log_name: LogName, schema_url: str) -> None:
        target = client.target
        dataset = target.logs[log_name]
        schema_ref = {
            "id": str(dataset.schema_id),
            "contentType": "application/vnd.adobe.xed-full+json;version=1",
        }
        header: dict[str, Any] = {
            "schemaRef": schema_ref,
            "imsOrgId": target.org_id,
            "datasetId": dataset.dataset_id,
            "source": {"name": target.source_name},
        }
        if target.flow_id:
            header["flowId"] = target.flow_id
        self._client = client
        self._target = target
        self._header = orjson.dumps(header)
        self._meta = orjson.dumps({"schemaRef": schema_ref})
        self.log_name = log_name
        self.name = f"aep:{dataset.dataset_id}"
        self._schema_url = schema_url
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._sha256 = hashlib.sha256()
        self.records = 0
        self.rejected = 0
        self.bytes = 0
        self.requests = 0

    def write(self, record: dict[str, Any]) -> None:
        self._add(orjson.dumps(record))

    def write_lines(self, lines: bytes, count: int) -> None:
        """`count` records as JSON lines, each ending in a newline."""
        entities = lines.split(b"\n")[:-1]
        assert len(entities) == count
        for entity in entities:
            self._add(entity)

    def _add(self, entity: bytes) -> None:
        if len(entity) > MAX_RECORD_BYTES:
            self.rejected += 1  # over the ExperienceEvent limit: AEP would refuse it
            return
        message = (
            b'{"header":' + self._header + b',"body":{"xdmMeta":' + self._meta
            + b',"xdmEntity":' + entity + b"}}"
        )  # fmt: skip
        if self._batch and (
            len(self._batch) >= self._target.max_batch_messages
            or self._batch_bytes + len(message) + 2 > self._target.max_body_bytes
        ):
            self._flush()
        self._batch.append(message)
        self._batch_bytes += len(message) + 1
        self.records += 1

    def _flush(self) -> None:
        if not self._batch:
            return
        self.requests += self._client.send(self._batch)
        for message in self._batch:
            self._sha256.update(message)
            self.bytes += len(message)
        self._batch, self._batch_bytes = [], 0

    def close(self) -> dict[str, Any]:
        self._flush()
        return {
            "log": self.log_name,
            "name": self.name,
            "records": self.records,
            "bytes": self.bytes,
            "sha256": self._sha256.hexdigest(),
            "schema": self._schema_url,
            "delivery": "aep_streaming",
            "rejected": self.rejected,
        }
