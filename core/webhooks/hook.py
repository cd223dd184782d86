"""What every webhook provider module implements, and the refusals they raise.

A provider is one module (`core/webhooks/<name>.py`) with one class, listed by hand in
`core/webhooks/providers.py`. It does three things, nothing else:

    verify(request, now)   -> Verified        the raw bytes as received, before any parsing;
                                              raises Refused (401 forged/stale, 400 malformed)
    events(delivery)       -> [stored event]  a verified delivery as canonical events
                                              (core/events/model.py), in the stored form
    class attributes       -> its body limit, the status that makes it send again, the
                              status a duplicate gets

What the events change on the suppression list is decided by the same rules as Currents
(core/events/effects.py): a provider says what happened, never what to suppress.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Protocol

import orjson
from pydantic import ValidationError

from core.events.model import EngagementEvent


class Refused(Exception):
    """A request that is not a delivery to accept: its status and a code for the answer.
    The message is safe to show and log (it never quotes the request)."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"


class Forged(Refused):
    status = 401
    code = "bad_signature"


class Stale(Refused):
    status = 401
    code = "stale_timestamp"


class Malformed(Refused):
    status = 400
    code = "malformed_body"


class TooLarge(Refused):
    status = 413
    code = "body_too_large"


@dataclass(frozen=True)
class InboundRequest:
    """One HTTP request as it arrived: the body's exact bytes, header names lower-cased."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    query: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class Verified:
    """A delivery that passed its provider's checks."""

    delivery_id: str
    """The provider's own id of the delivery (the same on every retry): the idempotency key."""
    replay_guarded: bool = False
    """True when the id is a signed one-time token and the body is not signed (Mailgun):
    the same id with other bytes is a replay of a captured signature, not a retry."""
    reply: dict[str, Any] | None = None
    """A control message to answer, not a delivery (an SNS subscription confirmation)."""


@dataclass(frozen=True)
class StoredDelivery:
    """What the receiving side kept, as the worker reads it back."""

    provider: str
    delivery_id: str
    received_at: datetime
    url: str
    headers: Mapping[str, str]
    body: bytes


class WebhookProvider(Protocol):
    """See the module docstring."""

    name: ClassVar[str]
    max_body_bytes: ClassVar[int]
    """Bodies over this are refused (413) before anything else (documented per provider)."""
    retry_status: ClassVar[int]
    """The answer that makes the provider send again when we could not keep the delivery."""
    kept_headers: ClassVar[tuple[str, ...]]
    """Headers the worker needs again (stored with the body)."""

    def verify(self, request: InboundRequest, now: datetime) -> Verified: ...

    def events(self, delivery: StoredDelivery) -> Parsed:
        """Raises Malformed when the body as a whole cannot be read (the receiving side
        calls this too, so such a body is answered 400 and never kept)."""
        ...


@dataclass
class Parsed:
    """A delivery's events (stored form), and the items in it that could not be events
    (counted by reason; one bad item in a batch does not refuse the others)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    invalid: Counter[str] = field(default_factory=Counter)

    def add(self, **fields: Any) -> None:
        """One canonical event from its fields (None values left out)."""
        try:
            event = EngagementEvent(**{k: v for k, v in fields.items() if v is not None})
        except ValidationError as exc:
            where = ".".join(str(p) for p in exc.errors()[0]["loc"]) or "event"
            self.invalid[f"invalid_{where}"] += 1
            return
        self.events.append(event.stored())

    def skip(self, reason: str) -> None:
        self.invalid[reason] += 1


# -- helpers the providers share ---------------------------------------------------------


class ProviderDefaults:
    """What most providers answer and keep (a provider class sets only what differs)."""

    retry_status: ClassVar[int] = 503
    """Every provider here retries a 5xx (SNS: only a 5xx)."""
    kept_headers: ClassVar[tuple[str, ...]] = ()


def json_body(data: bytes | str, what: str = "the body") -> Any:
    """Parsed JSON, or Malformed."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise Malformed(f"{what} is not JSON") from None


def keys_of(value: str | None) -> list[str]:
    """A setting holding several keys (two during a rotation): split on spaces or commas."""
    if not value:
        return []
    return [k for k in value.replace(",", " ").split() if k]


def any_digest_matches(expected: list[bytes], given: bytes) -> bool:
    """Constant-time comparison against every valid digest (no early exit between keys)."""
    found = False
    for candidate in expected:
        found |= hmac.compare_digest(candidate, given)
    return found


def within(moment: datetime, now: datetime, tolerance: timedelta) -> None:
    if moment < now - tolerance:
        raise Stale(f"the request is older than {int(tolerance.total_seconds())} s")
    if moment > now + tolerance:
        raise Stale(f"the request is dated more than {int(tolerance.total_seconds())} s ahead")


def digest(*parts: str | bytes) -> str:
    """A stable hex name for identifiers (never stored or logged as themselves)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return h.hexdigest()


def epoch_seconds(value: Any) -> datetime | None:
    """A Unix time in seconds (int, float or their text), or None if it is not one."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not 0 < number < 32503680000:  # before year 3000
        return None
    return datetime.fromtimestamp(number, UTC)


def text(value: Any, most: int = 500) -> str | None:
    """A string field as text, or None (numbers are taken as their text)."""
    if isinstance(value, str):
        return value[:most] if value else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None
