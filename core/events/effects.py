"""What engagement events change on the suppression list.

    email hard bounce                   -> suppress (hard_bounce)
    email unsubscribe                   -> suppress (unsubscribe)
    email spam complaint                -> suppress (spam_complaint)
    SMS / WhatsApp / RCS unsubscribe    -> suppress (unsubscribe) the number (a provider's
                                           opt-out error, e.g. Twilio 21610)
    global subscription: Unsubscribed   -> suppress (unsubscribe) on that channel's address
    global subscription: Subscribed /
                         Opted In       -> lift the unsubscribe (never a hard bounce)
    SMS / WhatsApp inbound message whose keyword Braze acted on (`action`):
                         unsubscribed   -> suppress (unsubscribe) the sender's number
                         subscribed     -> lift that unsubscribe

Every change carries the event's own time: the suppression list keeps the latest change
per address and reason, so the order of events decides, not the order they arrive in;
of two changes at the same time the suppression wins, in whichever order they arrive.
Subscription-group changes are per group, not global, and change nothing here; an
opt-out keyword is the person's own word and suppresses the number on every list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.events.model import EventChannel, EventType, from_epoch_millis
from core.suppression import Channel, Reason, SuppressionList, SuppressionUpdate
from core.sync.mapping import RowRejected, normalise_email, normalise_phone

_DIRECT = {
    EventType.BOUNCED_HARD: Reason.HARD_BOUNCE,
    EventType.UNSUBSCRIBED: Reason.UNSUBSCRIBE,
    EventType.SPAM_COMPLAINT: Reason.SPAM_COMPLAINT,
}
_UNSUBSCRIBED = frozenset({"unsubscribed"})
_SUBSCRIBED = frozenset({"subscribed", "opted in", "opted_in", "optedin"})
_PHONE_CHANNELS = (EventChannel.SMS, EventChannel.WHATSAPP, EventChannel.RCS)
# Braze's `action` on an inbound message: what its keyword did (`none`: no keyword).
_KEYWORD_ACTIONS = {"unsubscribed": True, "subscribed": False}


def _address(event: dict[str, object]) -> tuple[Channel, str] | None:
    """The channel address an event is about, normalised; None if it has none or it is bad."""
    channel = event.get("channel")
    try:
        if channel == EventChannel.EMAIL and isinstance(event.get("email"), str):
            return Channel.EMAIL, normalise_email(str(event["email"]))
        if channel in _PHONE_CHANNELS and isinstance(event.get("phone"), str):
            return Channel.PHONE, normalise_phone(str(event["phone"]))
    except RowRejected:
        return None
    return None


def suppression_change(event: dict[str, object]) -> SuppressionUpdate | None:
    """The change one event (stored form) makes, if any."""
    kind = event.get("type")
    if kind in _DIRECT:
        channel = event.get("channel")
        if channel != EventChannel.EMAIL and not (
            kind == EventType.UNSUBSCRIBED and channel in _PHONE_CHANNELS
        ):
            return None
        reason, active = _DIRECT[EventType(str(kind))], True
    elif kind == EventType.SUBSCRIPTION_CHANGED:
        status = str(event.get("subscription_status", "")).strip().lower()
        if status in _UNSUBSCRIBED:
            active = True
        elif status in _SUBSCRIBED:
            active = False
        else:
            return None
        reason = Reason.UNSUBSCRIBE
    elif kind == EventType.INBOUND_RECEIVED:
        raw = event.get("raw")
        action = raw.get("action") if isinstance(raw, dict) else None
        keyword = _KEYWORD_ACTIONS.get(str(action).strip().lower())
        if keyword is None:
            return None
        reason, active = Reason.UNSUBSCRIBE, keyword
    else:
        return None
    target = _address(event)
    if target is None:
        return None
    occurred = event.get("occurred_at")
    if not isinstance(occurred, int):
        return None
    source = f"{event.get('source')}: {event.get('source_type')}"
    return SuppressionUpdate(
        target[0], target[1], reason, active, from_epoch_millis(occurred), source
    )


@dataclass
class SuppressionBatch:
    """Changes of one unit of work, collapsed to the latest per address and reason."""

    latest: dict[tuple[Channel, str, Reason], SuppressionUpdate] = field(default_factory=dict)
    offered: int = 0

    def offer(self, event: dict[str, object]) -> None:
        change = suppression_change(event)
        if change is None:
            return
        self.offered += 1
        key = (change.channel, change.address, change.reason)
        current = self.latest.get(key)
        if current is None or change.supersedes(current.at, current.active):
            self.latest[key] = change

    def apply(self, suppressions: SuppressionList) -> int:
        """Write the updates; returns how many changed suppression state."""
        return suppressions.apply_many(list(self.latest.values()))
