"""Storage clients for a binding's `connection` setting, as the host resolves them."""

from __future__ import annotations

import functools
import os

from core.storage import Storage
from core.storage.connection import parse_connection_string
from devhost.app import HostError

HOSTS_CONTAINER = "azure-webjobs-hosts"


@functools.cache
def storage_for(connection: str | None) -> Storage:
    setting = connection or "AzureWebJobsStorage"
    value = os.environ.get(setting)
    if not value:
        raise HostError(f"connection setting {setting!r} is not set")
    return Storage(parse_connection_string(value))
