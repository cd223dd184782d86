"""The optional fourth file: profile preferences (consent per channel) from the window.

For every profile whose subscription state changed in the window (global subscription
changes, unsubscribe links, subscription groups), one XDM Profile record with its latest
state per channel in `consents.marketing.<channel>` (`val` y/n and `time`, the XDM consent
datatype) and its subscription groups under the tenant block. Records are ordered by
identity, so the same window gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.events.model import EventType
from core.export.xdm import XdmOptions, identity_map, iso

PREFERENCES = "profilePreferences"
_CHANNEL_KEYS = {"email": "email", "sms": "sms", "push": "push", "whatsapp": "whatsApp"}
_SUBSCRIBED = frozenset({"subscribed", "opted in", "opted_in", "optedin"})
_UNSUBSCRIBED = frozenset({"unsubscribed"})
PREFERENCE_EVENT_TYPES = frozenset(
    {EventType.SUBSCRIPTION_CHANGED, EventType.SUBSCRIPTION_GROUP_CHANGED, EventType.UNSUBSCRIBED}
)
"""The event types `note_preference` reads."""


@dataclass
class ProfilePreferences:
    identity: dict[str, Any]
    """The event fields identity_map reads (external_id, email, phone)."""
    channels: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    """XDM channel key -> (event time ms, event id, y/n), the latest wins."""
    groups: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    """subscription group id -> (event time ms, event id, subscribed/unsubscribed)."""


def _choice(event: dict[str, Any]) -> str | None:
    if event["type"] == EventType.UNSUBSCRIBED:
        return "n"
    status = str(event.get("subscription_status", "")).strip().lower()
    return "y" if status in _SUBSCRIBED else "n" if status in _UNSUBSCRIBED else None


def _later(current: tuple[int, str, str] | None, candidate: tuple[int, str, str]) -> bool:
    return current is None or candidate[:2] > current[:2]


def note_preference(event: dict[str, Any], profiles: dict[str, ProfilePreferences]) -> None:
    """Keep what a subscription-changing event says about its profile."""
    kind = event["type"]
    if kind not in PREFERENCE_EVENT_TYPES:
        return
    choice = _choice(event)
    key = event.get("external_id") or event.get("email") or event.get("phone")
    if choice is None or not key:
        return
    profile = profiles.get(key)
    if profile is None:
        fields = ("external_id", "email", "phone")
        profile = profiles[key] = ProfilePreferences({f: event.get(f) for f in fields})
    stamp = (int(event["occurred_at"]), str(event["event_id"]), choice)
    if kind == EventType.SUBSCRIPTION_GROUP_CHANGED:
        group = event.get("subscription_group_id")
        if group and _later(profile.groups.get(group), stamp):
            profile.groups[group] = stamp
        return
    channel = _CHANNEL_KEYS.get(event["channel"])
    if channel and _later(profile.channels.get(channel), stamp):
        profile.channels[channel] = stamp


def preference_records(
    profiles: dict[str, ProfilePreferences], options: XdmOptions
) -> list[dict[str, Any]]:
    records = []
    for key in sorted(profiles):
        profile = profiles[key]
        marketing = {
            channel: {"val": val, "time": iso(at)}
            for channel, (at, _, val) in sorted(profile.channels.items())
        }
        groups = [
            {"id": group, "status": "subscribed" if val == "y" else "unsubscribed", "time": iso(at)}
            for group, (at, _, val) in sorted(profile.groups.items())
        ]
        record: dict[str, Any] = {"identityMap": identity_map(profile.identity, options)}
        if marketing:
            record["consents"] = {"marketing": marketing}
        if groups:
            record[options.tenant_key] = {"subscriptionGroups": groups}
        records.append(record)
    return records
