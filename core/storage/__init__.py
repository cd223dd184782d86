"""Azure Storage (blob, table, queue) behind one object, the same against Azurite and Azure."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
import requests.adapters
from azure.core.exceptions import AzureError
from azure.data.tables import TableServiceClient
from azure.storage.blob import BlobServiceClient
from azure.storage.queue import QueueServiceClient

from core.storage.blobs import CHUNK_BYTES, BlobRef, BlobStore
from core.storage.connection import StorageAccount
from core.storage.queues import QueueSender
from core.storage.retry import sdk_retry_options
from core.storage.tables import Tables

__all__ = ["BlobRef", "ServiceHealth", "Storage"]

# Health pings must answer quickly or report the service as down.
if TYPE_CHECKING:
    from requests.sessions import _Settings

_PING_TIMEOUT_SECONDS = 5
POOL_CONNECTIONS = 32


@dataclass(frozen=True)
class ServiceHealth:
    ok: bool
    latency_ms: float
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"ok": self.ok, "latency_ms": round(self.latency_ms, 1)}
        if self.error:
            result["error"] = self.error
        return result


class _EnvironmentOnceSession(requests.Session):
    """requests reads every proxy variable of the environment on each request (about a
    fifth of a millisecond; a segment sync makes thousands of storage calls): read them
    once per origin. Explicit proxies, and sessions that ignore the environment, are
    unaffected."""

    def __init__(self) -> None:
        super().__init__()
        self._environment: dict[tuple[Any, ...], _Settings] = {}

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> _Settings:
        if proxies or not self.trust_env:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        key = (urlsplit(url)[:2], stream, verify, cert)
        settings = self._environment.get(key)
        if settings is None:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            self._environment[key] = settings
        return {**settings, "proxies": dict(settings["proxies"])}  # a caller may change it


def _pooled_session() -> requests.Session:
    """A session keeping as many connections as parallel point reads use (urllib3's
    default of 10 made the rest reconnect on every request)."""
    session = _EnvironmentOnceSession()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_CONNECTIONS)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class Storage:
    """Blob, table and queue clients for one account."""

    def __init__(self, account: StorageAccount) -> None:
        self.account = account
        retries = sdk_retry_options()
        self.blob_service = BlobServiceClient(
            account.blob_url,
            credential=account.credential("blob"),
            max_single_get_size=CHUNK_BYTES,
            max_chunk_get_size=CHUNK_BYTES,
            session=_pooled_session(),
            **retries["blob"],
        )
        self.table_service = TableServiceClient(
            account.table_url,
            credential=account.credential("table"),
            session=_pooled_session(),
            **retries["table"],
        )
        self.queue_service = QueueServiceClient(
            account.queue_url,
            credential=account.credential("queue"),
            session=_pooled_session(),
            **retries["queue"],
        )
        self.blobs = BlobStore(self.blob_service)
        self.tables = Tables(self.table_service)
        self.queues = QueueSender(self.queue_service)

    def ping(self) -> dict[str, ServiceHealth]:
        """Round-trip each service once, without retries; used by the health route."""
        fast: dict[str, Any] = {
            "retry_total": 0,
            "connection_timeout": _PING_TIMEOUT_SECONDS,
            "read_timeout": _PING_TIMEOUT_SECONDS,
        }
        account = self.account
        probes: dict[str, Callable[[], Iterable[Any]]] = {
            "blob": lambda: BlobServiceClient(
                account.blob_url, credential=account.credential("blob"), **fast
            ).list_containers(results_per_page=1),
            "table": lambda: TableServiceClient(
                account.table_url, credential=account.credential("table"), **fast
            ).list_tables(results_per_page=1),
            "queue": lambda: QueueServiceClient(
                account.queue_url, credential=account.credential("queue"), **fast
            ).list_queues(results_per_page=1),
        }
        results = {}
        for name, listing in probes.items():
            started = time.perf_counter()
            try:
                next(iter(listing()), None)
                results[name] = ServiceHealth(True, (time.perf_counter() - started) * 1000)
            except AzureError as exc:
                elapsed = (time.perf_counter() - started) * 1000
                results[name] = ServiceHealth(False, elapsed, type(exc).__name__)
        return results
