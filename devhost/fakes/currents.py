"""Braze Currents Avro files as Braze writes them, for tests, the demo and the bench.

Schemas follow `../shared/reference/currents-avro-fields.md` (record name = last part of
the event type, namespace `dataexport.S3.inner.<group>`, optional fields as unions with
null); keys follow the documented layout. Files are written with fastavro into any S3
endpoint through boto3 (the local moto server here).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterable
from typing import Any

import fastavro

_OPT = ["null", "string"]
_MESSAGE_IDS = (
    "campaign_id", "campaign_name", "message_variation_id", "message_variation_name",
    "canvas_id", "canvas_name", "canvas_variation_id", "canvas_variation_name",
    "canvas_step_id", "canvas_step_name", "send_id", "dispatch_id", "app_group_id",
)  # fmt: skip
_EMAIL = ("ip_pool", "esp", "from_domain")
_AD = ("ad_id", "ad_id_type")
_TO = ("email_address",)
_INBOUND = ("campaign_id", "subscription_group_id", "message_body", "action", "app_group_id")

# Event type -> (required string fields beyond id/user_id, optional string fields, others)
_SPECS: dict[str, tuple[tuple[str, ...], tuple[str, ...], list[dict[str, Any]]]] = {
    "users.messages.email.Send": (_TO, (*_MESSAGE_IDS, *_EMAIL, "message_extras"), []),
    "users.messages.email.Delivery": (_TO, (*_MESSAGE_IDS, *_EMAIL, "sending_ip"), []),
    "users.messages.email.Open": (
        _TO,
        (*_MESSAGE_IDS, *_EMAIL, "user_agent", "machine_open", "device_class", "device_os",
         "device_model", "browser", "mailbox_provider"),
        [{"name": "is_amp", "type": ["null", "boolean"], "default": None}],
    ),
    "users.messages.email.Click": (
        _TO,
        (*_MESSAGE_IDS, *_EMAIL, "url", "user_agent", "link_id", "link_alias", "device_class",
         "mailbox_provider"),
        [
            {"name": "is_amp", "type": ["null", "boolean"], "default": None},
            {"name": "is_suspected_bot_click", "type": ["null", "boolean"], "default": None},
            {"name": "suspected_bot_click_reason",
             "type": ["null", {"type": "array", "items": "string"}], "default": None},
        ],
    ),
    "users.messages.email.Bounce": (
        ("email_address",), (*_MESSAGE_IDS, *_EMAIL, "sending_ip", "bounce_reason"),
        [{"name": "is_drop", "type": ["null", "boolean"], "default": None}],
    ),
    "users.messages.email.SoftBounce": (
        ("email_address",), (*_MESSAGE_IDS, *_EMAIL, "sending_ip", "bounce_reason"), [],
    ),
    "users.messages.email.Deferral": (_TO, (*_MESSAGE_IDS, *_EMAIL), []),
    "users.messages.email.MarkAsSpam": (_TO, (*_MESSAGE_IDS, *_EMAIL, "user_agent"), []),
    "users.messages.email.Unsubscribe": (_TO, (*_MESSAGE_IDS, "ip_pool"), []),
    "users.messages.email.Abort": (_TO, (*_MESSAGE_IDS, "abort_type", "abort_log"), []),
    "users.messages.email.Retry": (_TO, _MESSAGE_IDS, []),
    "users.messages.pushnotification.Send": (
        ("app_id", "platform"), (*_MESSAGE_IDS, "device_id", "push_token", *_AD, "locale_key"),
        [{"name": "ad_tracking_enabled", "type": ["null", "boolean"], "default": None}],
    ),
    "users.messages.pushnotification.Open": (
        ("app_id",),
        (*_MESSAGE_IDS, "platform", "os_version", "device_model", "device_id",
         "button_action_type", "button_string", *_AD),
        [],
    ),
    "users.messages.pushnotification.Bounce": (
        ("app_id",), (*_MESSAGE_IDS, "platform", "device_id", "push_token", *_AD), [],
    ),
    "users.messages.pushnotification.IosForeground": (("app_id",), (*_MESSAGE_IDS, "platform"), []),
    "users.messages.pushnotification.Abort": (("app_id",), (*_MESSAGE_IDS, "abort_type"), []),
    "users.messages.pushnotification.Retry": (("app_id",), _MESSAGE_IDS, []),
    "users.messages.sms.Send": (("to_phone_number",), (*_MESSAGE_IDS, "subscription_group_id"), []),
    "users.messages.sms.CarrierSend": (
        ("to_phone_number",), (*_MESSAGE_IDS, "from_phone_number", "subscription_group_id"), []
    ),
    "users.messages.sms.Delivery": (("to_phone_number",), (*_MESSAGE_IDS, "from_phone_number"), []),
    "users.messages.sms.DeliveryFailure": (
        ("to_phone_number",), (*_MESSAGE_IDS, "error", "provider_error_code"), []
    ),
    "users.messages.sms.Rejection": (
        ("to_phone_number",), (*_MESSAGE_IDS, "error", "provider_error_code"), []
    ),
    # Inbound: `user_phone_number` is the person who wrote, `inbound_phone_number` the
    # brand's number they wrote to; clicks carry the person's number as `user_phone_number`.
    "users.messages.sms.InboundReceive": (
        ("inbound_phone_number", "user_phone_number"), _INBOUND, []
    ),
    "users.messages.sms.ShortLinkClick": (
        ("user_phone_number",), (*_MESSAGE_IDS, "url", "short_url", "user_agent"), []
    ),
    "users.messages.sms.Abort": (("to_phone_number",), (*_MESSAGE_IDS, "abort_type"), []),
    "users.messages.sms.Retry": (("to_phone_number",), _MESSAGE_IDS, []),
    "users.messages.whatsapp.InboundReceive": (
        ("inbound_phone_number", "user_phone_number"), _INBOUND, []
    ),
    "users.messages.whatsapp.Click": (
        ("user_phone_number",), (*_MESSAGE_IDS, "url", "short_url", "user_agent"), []
    ),
    "users.messages.rcs.InboundReceive": (
        ("inbound_phone_number", "user_phone_number"), _INBOUND, []
    ),
    "users.messages.rcs.Click": (("user_phone_number",), (*_MESSAGE_IDS, "url", "button_id"), []),
    "users.messages.pushnotification.TokenStateChange": (
        ("app_id",),
        ("platform", "device_id", "push_token", "push_token_state_change_type",
         "push_token_foreground_push_disabled"),
        [{"name": "time_ms", "type": ["null", "long"], "default": None}],
    ),
    "users.behaviors.subscription.GlobalStateChange": (
        ("subscription_status",),
        ("email_address", "state_change_source", "channel", "app_id", "campaign_id",
         "canvas_id", "send_id", "channel_identifier", "app_group_id"),
        [],
    ),
    "users.behaviors.subscriptiongroup.StateChange": (
        ("subscription_group_id", "subscription_status"),
        ("email_address", "phone_number", "channel", "state_change_source", "campaign_id",
         "send_id", "channel_identifier", "app_group_id"),
        [],
    ),
    "users.behaviors.CustomEvent": (("name", "properties"), ("app_id", "device_id"), []),
    "users.behaviors.Purchase": (
        ("product_id", "currency", "properties"), ("app_id", "platform"),
        [{"name": "price", "type": "float"}],
    ),
}  # fmt: skip
EVENT_TYPES = tuple(_SPECS)
BRAND_NUMBER = "+3197010000000"
"""The brand's own number people text (a Dutch machine-to-machine range)."""


def schema_for(event_type: str, *, extra_fields: Iterable[str] = ()) -> dict[str, Any]:
    """The writer schema of an event type; `extra_fields` are later optional additions."""
    required, optional, others = _SPECS.get(event_type, ((), (), []))
    group, _, name = event_type.rpartition(".")
    fields: list[dict[str, Any]] = [
        {"name": "id", "type": "string"},
        {"name": "user_id", "type": "string"},
        {"name": "external_user_id", "type": _OPT, "default": None},
        {"name": "time", "type": "int"},
        {"name": "timezone", "type": _OPT, "default": None},
        *({"name": f, "type": "string"} for f in required),
        *({"name": f, "type": _OPT, "default": None} for f in optional),
        *others,
        *({"name": f, "type": _OPT, "default": None} for f in extra_fields),
    ]
    return {
        "type": "record",
        "name": name,
        "namespace": f"dataexport.S3.inner.{group}",
        "fields": fields,
    }


def event_id(event_type: str, number: int, salt: str = "") -> str:
    """A Currents-style event id (a UUID), the same for the same inputs."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"currents/{salt}/{event_type}/{number}"))


def record_for(
    event_type: str, number: int, moment: int, *, salt: str = "", **values: Any
) -> dict[str, Any]:
    """A plausible record: every required field filled, then `values` on top."""
    required, _, others = _SPECS.get(event_type, ((), (), []))
    record: dict[str, Any] = {
        "id": event_id(event_type, number, salt),
        "user_id": f"braze-{number % 100_000:06d}",
        "external_user_id": f"CRM-{number % 100_000:09d}",
        "time": moment,
        "timezone": "Europe/Amsterdam",
        "campaign_id": "cmp-1",
        "campaign_name": "Welcome",
        "send_id": f"send-{number % 97}",
        "dispatch_id": f"dsp-{number % 89}",
    }
    defaults = {
        "email_address": f"user{number % 100_000}@example.com",
        "app_id": "app-ios",
        "platform": "ios",
        "to_phone_number": f"+3161{number % 10_000_000:07d}",
        "user_phone_number": f"+3161{number % 10_000_000:07d}",
        "inbound_phone_number": BRAND_NUMBER,
        "subscription_status": "Unsubscribed",
        "subscription_group_id": "sg-news",
        "name": "viewed_item",
        "properties": '{"sku": "A-1"}',
        "product_id": "sku-1",
        "currency": "EUR",
    }
    for name in required:
        record[name] = defaults.get(name, f"{name}-{number}")
    if any(f["name"] == "price" for f in others):
        record["price"] = 9.5
    if any(f["name"] == "time_ms" for f in others):
        record["time_ms"] = moment * 1000 + number % 1000
    if event_type.endswith("email.Click"):
        record["url"] = "https://example.com/offer"
    if event_type.endswith(("email.Bounce", "email.SoftBounce")):
        record["bounce_reason"] = "550 5.1.1 mailbox unknown"
    record.update(values)
    return record


def avro_bytes(
    event_type: str,
    records: list[dict[str, Any]],
    *,
    extra_fields: Iterable[str] = (),
    codec: str = "null",
) -> bytes:
    buffer = io.BytesIO()
    schema = fastavro.parse_schema(schema_for(event_type, extra_fields=extra_fields))
    fastavro.writer(buffer, schema, records, codec=codec)
    return buffer.getvalue()


def currents_key(
    prefix: str,
    event_type: str,
    date: str,
    *,
    offset: int = 0,
    schema_id: int = 1,
    cluster: str = "prod-01",
    integration: str = "5f0c3a1b2c3d4e5f6a7b8c9d",
) -> str:
    """`<prefix>/dataexport.<cluster>.S3.integration.<id>/event_type=<t>/date=<d>/<schema>/<zone>/<file>`."""
    folder = f"dataexport.{cluster}.S3.integration.{integration}"
    base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    return (
        f"{base}{folder}/event_type={event_type}/date={date}/{schema_id}/0/"
        f"{folder}+0+{offset:010d}.avro"
    )


def put_file(s3: Any, bucket: str, key: str, data: bytes) -> str:
    """Upload; returns the ETag as S3 lists it (unquoted)."""
    return str(s3.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]).strip('"')
