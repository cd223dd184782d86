"""broadLog and trackingLog records written straight to JSON text.

The export writes about a million of these per window; building nested dicts and then
serialising them costs twice what assembling the text from pre-encoded pieces does. The
dict builders in `core.export.xdm` stay the specification: `tests/test_log_export.py`
checks that every line here is byte for byte `orjson.dumps` of the matching record.
"""

from __future__ import annotations

from typing import Any

import orjson

from core.events.model import EventType
from core.export.xdm import (
    BROADLOG,
    CHANNEL_URIS,
    DELIVERY_OUTCOMES,
    EMAIL_DELIVERY_TYPES,
    EMAIL_TRACKING_TYPES,
    INTERACTIONS,
    TRACKINGLOG,
    XdmOptions,
    failure_code,
    is_bot,
    iso,
    record_id,
)

_ASYNC_FAILURES = (EventType.BOUNCED_SOFT, EventType.BOUNCED_HARD)


def js(text: str) -> str:
    """A JSON string literal: plain text wrapped in quotes, anything else through orjson."""
    if '"' not in text and "\\" not in text and text.isprintable():
        return f'"{text}"'
    return orjson.dumps(text).decode()


def _identity_map(event: dict[str, Any], options: XdmOptions) -> str:
    parts = []
    primary = "true"
    external_id = event.get("external_id")
    if external_id:
        parts.append(f'{js(options.profile_namespace)}:[{{"id":{js(external_id)},"primary":true}}]')
        primary = "false"
    for namespace, field in (('"Email"', "email"), ('"Phone"', "phone")):
        value = event.get(field)
        if value:
            parts.append(f'{namespace}:[{{"id":{js(value)},"primary":{primary}}}]')
            primary = "false"
    return "{" + ",".join(parts) + "}"


def _campaign_fields(event: dict[str, Any]) -> list[str]:
    fields = []
    for name, value in (
        ("deliveryID", event.get("dispatch_id") or event.get("send_id")),
        ("campaignID", event.get("campaign_id") or event.get("canvas_id")),
        ("campaignName", event.get("campaign_name") or event.get("canvas_name")),
        ("externalID", event.get("external_id")),
    ):
        if value is not None:
            fields.append(f'"{name}":{js(value)}')
    fields.append(f'"channel":{js(event["channel"])}')
    return fields


def _envelope(
    log: str, event: dict[str, Any], event_type: str, journey: str, campaign: list[str],
    ingested_at: str, options: XdmOptions,
) -> str:  # fmt: skip
    channel = event["channel"]
    hub = (
        f'{{"sourceSystem":{js(event["source"])},"sourceEventId":{js(event["event_id"])},'
        f'"sourceType":{js(event["source_type"])},"ingestedAt":"{ingested_at}"}}'
    )
    return (
        f'{{"_id":"{record_id(log, event["event_id"])}","timestamp":"{iso(event["occurred_at"])}",'
        f'"eventType":"{event_type}","identityMap":{_identity_map(event, options)},'
        f'"_experience":{{"customerJourneyManagement":{{{journey},"messageProfile":'
        f'{{"channel":{{"_id":{js(CHANNEL_URIS.get(channel, channel))}}}}}}},'
        f'"campaign":{{{",".join(campaign)}}}}},'
        f'"_{options.tenant}":{{"hub":{hub}}}}}'
    )


def broadlog_line(event: dict[str, Any], ingested_at: str, options: XdmOptions) -> str:
    """`orjson.dumps(broadlog_record(...))`, as text."""
    kind = event["type"]
    status, failure = DELIVERY_OUTCOMES[kind]
    campaign = _campaign_fields(event)
    campaign.append(f'"broadlogID":{js(event["event_id"])}')
    campaign.append(f'"status":"{status}"')
    feedback = f'"feedbackStatus":"{status}"'
    if failure is not None:
        reason = event.get("bounce_reason") or str(event.get("raw", {}).get("error") or "") or None
        category = "async" if kind in _ASYNC_FAILURES else "sync"
        failure_parts = [f'"type":"{failure}"', f'"category":"{category}"']
        if reason:
            failure_parts.append(f'"reason":{js(reason[:500])}')
            campaign.append(f'"reasonMessage":{js(reason[:500])}')
        code = failure_code(reason)
        if code:
            failure_parts.append(f'"code":"{code}"')
        feedback += ',"messageFailure":{' + ",".join(failure_parts) + "}"
        campaign.append(f'"quarantine":{"true" if failure == "hard" else "false"}')
    event_type = (
        EMAIL_DELIVERY_TYPES.get(kind, "message.feedback")
        if event["channel"] == "email"
        else "message.feedback"
    )
    journey = '"messageDeliveryfeedback":{' + feedback + "}"
    return _envelope(BROADLOG, event, event_type, journey, campaign, ingested_at, options)


def trackinglog_line(event: dict[str, Any], ingested_at: str, options: XdmOptions) -> str:
    """`orjson.dumps(trackinglog_record(...))`, as text."""
    interaction = INTERACTIONS[event["type"]]
    bot = is_bot(event)
    if bot and interaction in ("open", "click"):
        interaction = f"bot_{interaction}"
    channel = event["channel"]
    details = f'"interactionType":"{interaction}","isBot":{"true" if bot else "false"}'
    campaign = _campaign_fields(event)
    campaign.append(f'"trackinglogID":{js(event["event_id"])}')
    url = event.get("url")
    if url:
        details += f',"url":{js(url)}'
        campaign.append(f'"url":{js(url)}')
        campaign.append(f'"urlCategory":{js(channel)}')
    if channel == "email":
        event_type = EMAIL_TRACKING_TYPES.get(interaction, "message.tracking")
    elif channel == "push" and interaction == "open":
        event_type = "pushTracking.applicationOpened"
    else:
        event_type = "message.tracking"
    journey = '"messageInteraction":{' + details + "}"
    return _envelope(TRACKINGLOG, event, event_type, journey, campaign, ingested_at, options)
