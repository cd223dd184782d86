"""Storage account connection: connection strings, Azurite defaults, managed identity.

Parsing is ours rather than each SDK's so that all three services (blob, queue, table) get
the same endpoints, `UseDevelopmentStorage=true` works for every one of them, and a
malformed value fails early with a reason that never repeats the secret it contains.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from core.errors import ConfigError

SETTING = "AzureWebJobsStorage"
# Azurite's well-known development account (public, documented by Microsoft).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_DEV_PORTS = {"blob": 10000, "queue": 10001, "table": 10002}
_KNOWN_KEYS = {
    "defaultendpointsprotocol",
    "accountname",
    "accountkey",
    "sharedaccesssignature",
    "endpointsuffix",
    "blobendpoint",
    "queueendpoint",
    "tableendpoint",
    "fileendpoint",
    "usedevelopmentstorage",
    "developmentstorageproxyuri",
}


@dataclass(frozen=True)
class StorageAccount:
    """Where the three storage services live and how to authenticate to them."""

    account_name: str
    blob_url: str
    queue_url: str
    table_url: str
    account_key: str | None = None
    sas_token: str | None = None
    managed_identity_client_id: str | None = None
    uses_managed_identity: bool = False

    @classmethod
    def for_managed_identity(cls, account_name: str, client_id: str | None) -> StorageAccount:
        base = f"https://{account_name}"
        return cls(
            account_name=account_name,
            blob_url=f"{base}.blob.core.windows.net",
            queue_url=f"{base}.queue.core.windows.net",
            table_url=f"{base}.table.core.windows.net",
            managed_identity_client_id=client_id,
            uses_managed_identity=True,
        )

    @property
    def is_emulator(self) -> bool:
        return self.account_name == DEV_ACCOUNT

    def credential(self, service: str) -> Any:
        """A credential object accepted by the given service's SDK client."""
        if self.uses_managed_identity:
            from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

            if self.managed_identity_client_id:
                return ManagedIdentityCredential(client_id=self.managed_identity_client_id)
            return DefaultAzureCredential()
        if self.account_key is not None:
            from azure.core.credentials import AzureNamedKeyCredential

            return AzureNamedKeyCredential(self.account_name, self.account_key)
        if self.sas_token is not None:
            from azure.core.credentials import AzureSasCredential

            return AzureSasCredential(self.sas_token)
        return None


def _fail(reason: str) -> ConfigError:
    return ConfigError(f"{SETTING} is malformed: {reason}")


def _split_pairs(value: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for part in value.strip().split(";"):
        if not part.strip():
            continue
        key, sep, item = part.partition("=")
        if not sep or not key.strip():
            raise _fail("expected 'Key=Value' pairs separated by ';'")
        lowered = key.strip().lower()
        if lowered not in _KNOWN_KEYS:
            raise _fail(f"unknown key {key.strip()!r}")
        pairs[lowered] = item.strip()
    if not pairs:
        raise _fail("it is empty")
    return pairs


def _development_account(pairs: dict[str, str]) -> StorageAccount:
    if pairs["usedevelopmentstorage"].lower() != "true":
        raise _fail("UseDevelopmentStorage only accepts 'true'")
    proxy = pairs.get("developmentstorageproxyuri", "http://127.0.0.1").rstrip("/")
    urls = {name: f"{proxy}:{port}/{DEV_ACCOUNT}" for name, port in _DEV_PORTS.items()}
    return StorageAccount(
        account_name=DEV_ACCOUNT,
        blob_url=urls["blob"],
        queue_url=urls["queue"],
        table_url=urls["table"],
        account_key=DEV_KEY,
    )


def parse_connection_string(value: str) -> StorageAccount:
    """Parse an Azure Storage connection string; raise ConfigError saying what is wrong."""
    pairs = _split_pairs(value)
    if "usedevelopmentstorage" in pairs:
        return _development_account(pairs)
    name = pairs.get("accountname")
    if not name:
        raise _fail("AccountName is missing")
    key = pairs.get("accountkey")
    sas = pairs.get("sharedaccesssignature")
    if not key and not sas:
        raise _fail("expected AccountKey or SharedAccessSignature")
    if key:
        try:
            base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            raise _fail("AccountKey is not valid base64") from None
    protocol = pairs.get("defaultendpointsprotocol", "https").lower()
    if protocol not in {"http", "https"}:
        raise _fail("DefaultEndpointsProtocol must be http or https")
    suffix = pairs.get("endpointsuffix", "core.windows.net")
    urls = {}
    for service in ("blob", "queue", "table"):
        explicit = pairs.get(f"{service}endpoint")
        if explicit is not None and not explicit.startswith(("http://", "https://")):
            raise _fail(f"{service.capitalize()}Endpoint must be an http(s) URL")
        urls[service] = (explicit or f"{protocol}://{name}.{service}.{suffix}").rstrip("/")
    return StorageAccount(
        account_name=name,
        blob_url=urls["blob"],
        queue_url=urls["queue"],
        table_url=urls["table"],
        account_key=key or None,
        sas_token=sas or None,
    )


def azurite_connection_string(host: str, blob_port: int, queue_port: int, table_port: int) -> str:
    """Full connection string for an Azurite instance on non-default ports."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
        f"BlobEndpoint=http://{host}:{blob_port}/{DEV_ACCOUNT};"
        f"QueueEndpoint=http://{host}:{queue_port}/{DEV_ACCOUNT};"
        f"TableEndpoint=http://{host}:{table_port}/{DEV_ACCOUNT};"
    )
