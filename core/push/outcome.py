"""What one push attempt came to, the same for every platform's sender."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SendOutcome:
    status: str
    """`sent`, `dead_token` (the caller deactivates it) or `failed`."""
    reason: str = ""
    """The provider's error (`UNREGISTERED`, `BadDeviceToken`, ...) when not sent."""
    message_id: str = ""
    """FCM's message name or the `apns-id`."""
    retries: int = 0
    rate_limited_waits: int = 0
    unregistered_at_ms: int | None = None
    """APNs 410: when the token stopped being valid (a token registered later stays)."""
