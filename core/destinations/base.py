"""What every destination offers the sync engine: what it is, its objects, one batch call.

The engine (split, delta state, suppression, consent, checkpoints, fan-out, run report)
serves every destination alike; what a destination accepts, how a profile's change looks
on its wire and how it acknowledges are the destination's, declared here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from core.sync.definitions import SyncDefinition
    from core.sync.state import Change


@dataclass(frozen=True)
class Capabilities:
    """What a destination is, for the engine and the document's validation."""

    modes: frozenset[str]
    """Sync modes it takes (core.sync.definitions.SyncMode values)."""
    reports_unknown: bool
    """It says which profiles it does not know (they end `unmatched`, never created)."""
    identities: tuple[str, ...]
    """Identity keys (`identity.destination_key`) it can address a profile by."""
    grouping: Literal["requests", "files"]
    """How changes travel: request batches, or import files (one batch, one file)."""
    acknowledgement: Literal["response", "file_written"]
    """When a batch counts as applied: its response, or its file created in full."""
    native_format: str | None = None
    """The object format of the C bucket path it takes as its own wire objects
    (core/sync/native.py); None: its buckets run on the Python reference."""
    honours_quarantine: bool = False
    """Addresses the log export holds as quarantined are suppressed for it too."""
    resend_unchanged: bool = False
    """Each run sends every row whole (a full refresh), not only what changed."""


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
    capabilities: Capabilities
    max_batch_objects: int
    max_body_bytes: int
    max_in_flight: int
    """Batches sent at once by one worker; `send_batch` is called from that many threads."""

    def item(self, sync: SyncDefinition, identity: str, change: Change) -> dict[str, Any]:
        """One profile's change as this destination takes it (also what a dry run previews)."""
        ...

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
