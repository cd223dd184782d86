"""What every destination offers the sync engine: batch limits and one batch call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ItemFailure:
    """One object of a batch that the destination did not apply."""

    index: int
    unmatched: bool
    """True when the destination does not know the profile (never created by us)."""
    reason: str


@dataclass(frozen=True)
class BatchResult:
    failures: dict[int, ItemFailure] = field(default_factory=dict)
    requests: int = 1
    rate_limited_waits: int = 0
    retries: int = 0
    paced_seconds: float = 0.0
    """Waited for our own pacer: more batches in flight than the budget lets go."""


class Destination(Protocol):
    """A profile destination: builds one object per profile, sends batches of them."""

    name: str
    max_batch_objects: int
    max_body_bytes: int
    max_in_flight: int
    """Batches sent at once by one worker; `send_batch` is called from that many threads."""

    def encode(self, item: dict[str, Any]) -> bytes:
        """One object as it goes on the wire; its length counts against `max_body_bytes`."""
        ...

    def close(self) -> None:
        """The run is done with it: give back what it holds (a budget share, connections)."""
        ...

    def send_batch(self, items: list[bytes]) -> BatchResult:
        """Send all of `items` (encoded); failures are per item, by index. Raises
        TerminalError, or TransientError after its own retries, when the whole batch failed."""
        ...
