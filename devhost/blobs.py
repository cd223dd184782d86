"""Blob triggers: container scans in Azurite with host-style receipts and poison handling.

Like the host's polling trigger, every blob matching the path pattern fires once per
name + ETag, blobs present at start included. A receipt blob in `azure-webjobs-hosts`
records each success, so a restart does not fire again. A failing blob is retried on later
scans until `poisonBlobThreshold` attempts, then a message goes to
`webjobs-blobtrigger-poison` and the blob is left alone.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import threading
from concurrent.futures import Executor
from types import SimpleNamespace
from typing import Any

import azure.functions as func
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobClient, ContainerClient, StorageStreamDownloader

from devhost.app import HostedFunction, resolve_setting_refs
from devhost.storage import HOSTS_CONTAINER, storage_for

log = logging.getLogger("devhost.blobs")
POISON_QUEUE = "webjobs-blobtrigger-poison"
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def compile_blob_path(path: str) -> tuple[str, str, re.Pattern[str]]:
    """`container/pattern` to (container, listing prefix, regex over the blob name)."""
    container, _, pattern = path.partition("/")
    prefix = pattern.split("{", 1)[0]
    regex = ""
    position = 0
    matches = list(_PARAM.finditer(pattern))
    for index, match in enumerate(matches):
        regex += re.escape(pattern[position : match.start()])
        is_last = index == len(matches) - 1 and match.end() == len(pattern)
        regex += f"(?P<{match.group(1)}>{'.+' if is_last else '[^/]+'})"
        position = match.end()
    regex += re.escape(pattern[position:])
    return container, prefix, re.compile(f"^{regex}$")


class BlobTriggerWatcher:
    def __init__(
        self,
        function: HostedFunction,
        executor: Executor,
        *,
        host_id: str,
        poison_threshold: int,
        scan_interval: float,
    ) -> None:
        self.function = function
        self.container, self.prefix, self.pattern = compile_blob_path(
            resolve_setting_refs(function.trigger["path"])
        )
        self.connection = function.trigger.get("connection")
        self.storage = storage_for(self.connection)
        self.executor = executor
        self.receipt_prefix = f"blobreceipts/{host_id}/Host.Functions.{function.name}"
        self.poison_threshold = poison_threshold
        self.scan_interval = scan_interval
        self.failures: dict[tuple[str, str], int] = {}
        self.in_flight: set[tuple[str, str]] = set()
        self.idle_scans = 0
        """Scans that found nothing to do, with nothing running: a test waits for these
        rather than for time to pass."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"blob:{function.name}", daemon=True
        )

    def start(self) -> None:
        self.storage.blobs.ensure_container(self.container)
        self.storage.blobs.ensure_container(HOSTS_CONTAINER)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _receipt(self, name: str, etag: str) -> BlobClient:
        path = f"{self.receipt_prefix}/{etag.strip(chr(34))}/{self.container}/{name}"
        return self.storage.blob_service.get_blob_client(HOSTS_CONTAINER, path)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                dispatched = self.scan()
                with self._lock:
                    if not dispatched and not self.in_flight:
                        self.idle_scans += 1
            except Exception:
                log.exception("scan of %s failed", self.container)
            self._stop.wait(self.scan_interval)

    def scan(self) -> int:
        """Dispatch every matching blob version without a receipt; returns how many."""
        dispatched = 0
        for blob in self.storage.blobs.list(self.container, self.prefix or None):
            key = (blob.name, blob.etag)
            if not self.pattern.match(blob.name):
                continue
            with self._lock:
                if key in self.in_flight:
                    continue
            if self._receipt(blob.name, blob.etag).exists():
                continue
            with self._lock:
                self.in_flight.add(key)
            self.executor.submit(self._run, blob.name, blob.etag)
            dispatched += 1
        return dispatched

    def _run(self, name: str, etag: str) -> None:
        key = (name, etag)
        try:
            self.invoke(name)
        except Exception:
            attempts = self.failures.get(key, 0) + 1
            self.failures[key] = attempts
            log.exception(
                "function %s failed on %s/%s (attempt %d of %d)",
                self.function.name,
                self.container,
                name,
                attempts,
                self.poison_threshold,
            )
            if attempts >= self.poison_threshold:
                self._poison(name, etag)
                self._write_receipt(name, etag)
        else:
            self.failures.pop(key, None)
            self._write_receipt(name, etag)
        finally:
            with self._lock:
                self.in_flight.discard(key)

    def invoke(self, name: str) -> Any:
        arguments = {self.function.trigger["name"]: self.argument(name)}
        return self.function.invoke(arguments)

    def _write_receipt(self, name: str, etag: str) -> None:
        with contextlib.suppress(ResourceExistsError):
            self._receipt(name, etag).upload_blob(b"", overwrite=False)

    def _poison(self, name: str, etag: str) -> None:
        message = json.dumps(
            {
                "Type": "BlobTrigger",
                "FunctionId": f"Host.Functions.{self.function.name}",
                "BlobType": "BlockBlob",
                "ContainerName": self.container,
                "BlobName": name,
                "ETag": etag,
            }
        )
        queue = self.storage.queue_service.get_queue_client(POISON_QUEUE)
        with contextlib.suppress(ResourceExistsError):
            queue.create_queue()
        queue.send_message(base64.b64encode(message.encode()).decode())

    def argument(self, name: str) -> Any:
        """The trigger argument, shaped by the parameter's annotation as the worker does."""
        annotation = self.function.trigger_annotation()
        if isinstance(annotation, type) and issubclass(
            annotation, (BlobClient, ContainerClient, StorageStreamDownloader)
        ):
            return self._sdk_argument(annotation, name)
        client = self.storage.blob_service.get_blob_client(self.container, name)
        try:
            props = client.get_blob_properties()
        except ResourceNotFoundError:
            raise RuntimeError(f"blob {self.container}/{name} vanished before invocation") from None
        data = client.download_blob().readall()
        stream = func.blob.InputStream(
            data=data,
            name=f"{self.container}/{name}",
            uri=client.url,
            length=props.size,
            blob_properties={"ETag": props.etag, "Length": props.size},
            metadata=dict(props.metadata or {}),
        )
        if annotation is bytes:
            return data
        if annotation is str:
            return data.decode("utf-8")
        return stream

    def _sdk_argument(self, annotation: type, name: str) -> Any:
        # The blob extension builds the client from model binding data and the connection
        # setting; handing it the same data keeps its validation and client factory in play.
        model_binding_data = SimpleNamespace(
            version="1.0",
            source="AzureStorageBlobs",
            content_type="application/json",
            content=json.dumps(
                {
                    "Connection": self.connection or "AzureWebJobsStorage",
                    "ContainerName": self.container,
                    "BlobName": name,
                }
            ),
        )
        return annotation(data=model_binding_data).get_sdk_type()
