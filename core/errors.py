"""Switchboard's error tree.

SwitchboardError
 +-- ConfigError                 a setting or a declared document is wrong; fix it and restart
 +-- StorageError                Azure Storage refused or failed an operation
 |    +-- EntityExists            create-only insert found the row already there
 |    +-- ConcurrencyConflict     an ETag-guarded write lost the race (after its retries)
 |    +-- BlobAlreadyExists       create-only write found the blob already there
 |    +-- LeaseUnavailable        another writer holds the lease
 |    +-- MessageTooLarge         a queue message would exceed 64 KB
 |    +-- CorruptState            stored sync state that cannot be read back
 +-- DeliveryError               an outbound call to a destination or provider failed
      +-- TransientError          retry later with backoff (5xx, timeouts, connection resets)
      |    +-- RateLimitedError    retry after the server's wait; never burns a retry attempt
      +-- TerminalError           retrying cannot help (401/403, 400 for the whole request)
"""

from __future__ import annotations


class SwitchboardError(Exception):
    """Base of every error Switchboard raises on purpose."""


class ConfigError(SwitchboardError):
    """A setting or configuration document is missing or malformed."""


class StorageError(SwitchboardError):
    """An Azure Storage operation failed."""


class EntityExists(StorageError):
    """A create-only table insert found an entity with the same keys."""


class ConcurrencyConflict(StorageError):
    """An ETag-guarded update kept losing to concurrent writers."""


class BlobAlreadyExists(StorageError):
    """A create-only blob write found a blob with the same name."""


class LeaseUnavailable(StorageError):
    """A blob lease is held by another writer."""


class MessageTooLarge(StorageError):
    """A queue message would exceed the 64 KB Azure Storage limit."""


class CorruptState(StorageError):
    """Stored sync state that cannot be read back (damaged, cut short, or not ours): the
    run stops before anything is sent for that bucket; a resync starts it over."""

    code = "corrupt_state"


class DeliveryError(SwitchboardError):
    """An outbound request to a destination or provider failed."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientError(DeliveryError):
    """Worth retrying with backoff; `retry_after` (seconds) is a server hint when given."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class RateLimitedError(TransientError):
    """The server asked us to slow down; waiting for it does not count as a failed attempt."""


class TerminalError(DeliveryError):
    """Retrying cannot succeed; stop and report."""
