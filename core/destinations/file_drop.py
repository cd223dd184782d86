"""Where import files are left for a platform's file collector: create-only puts.

`BlobDrop` is an Azure Blob container (the storage account Campaign's workflow reads as an
external account). Errors are typed as delivery errors: a refused credential or a missing
permission is terminal, anything the storage layer gave up retrying is transient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from core.errors import BlobAlreadyExists, StorageError, TerminalError, TransientError
from core.storage import Storage

T = TypeVar("T")


class DropExists(Exception):
    """A file with that name is already in the drop."""


class FileDrop(Protocol):
    where: str
    """Names the drop in errors (no credentials)."""

    def put(self, name: str, data: bytes) -> None:
        """Create `name`; raises DropExists when it is there already."""
        ...

    def read(self, name: str) -> bytes | None: ...

    def exists(self, name: str) -> bool: ...


class BlobDrop:
    def __init__(self, storage: Storage, container: str) -> None:
        self.storage = storage
        self.container = container
        self.where = f"blob container {container!r}"

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except ClientAuthenticationError as exc:
            raise TerminalError(
                f"{self.where} refused our credentials ({exc.status_code}); check "
                "SWITCHBOARD_CAMPAIGN_DROP_CONNECTION",
                status=exc.status_code,
            ) from None
        except HttpResponseError as exc:
            status = exc.status_code or 0
            if status in (401, 403):
                raise TerminalError(
                    f"{self.where} refused the request: {status} {exc.reason}", status=status
                ) from None
            raise TransientError(f"{self.where}: {status} {exc.reason}", status=status) from None
        except (ServiceRequestError, ServiceResponseError, StorageError) as exc:
            if isinstance(exc, BlobAlreadyExists):
                raise
            raise TransientError(f"{self.where}: {type(exc).__name__}") from None

    def put(self, name: str, data: bytes) -> None:
        try:
            self._call(lambda: self.storage.blobs.create(self.container, name, data))
        except BlobAlreadyExists:
            raise DropExists(name) from None

    def read(self, name: str) -> bytes | None:
        found = self._call(lambda: self.storage.blobs.read_versioned(self.container, name))
        return None if found is None else found[0]

    def exists(self, name: str) -> bool:
        return self._call(lambda: self.storage.blobs.exists(self.container, name))
