"""Push message templates: Liquid (the syntax Braze uses), rendered per profile.

Strict about what a template outputs: a variable the profile does not have skips that
profile with a reason (`missing_attribute`) unless the template gives a `default`; in a
condition, a missing variable is false.
Rendering is bounded (loop iterations, output size), and the payload built for each
platform is checked against its 4 KB limit before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
from liquid import Environment, FalsyStrictUndefined
from liquid.exceptions import (
    LiquidError,
    LoopIterationLimitError,
    OutputStreamLimitError,
    UndefinedError,
)
from pydantic import BaseModel, ConfigDict, Field

MAX_PAYLOAD_BYTES = 4096
"""APNs (4 KB for regular pushes) and FCM (4 KB of notification and data) alike."""


class _MissingAttribute(FalsyStrictUndefined):
    """Output of a missing attribute skips the profile; `default` supplies a value, and a
    condition on it is simply false (`{% if tier == 'gold' %}` for a profile without one)."""

    force_liquid_default = True


class _BoundedLiquid(Environment):
    loop_iteration_limit = 1_000
    output_stream_limit = 8_192
    context_depth_limit = 10


_LIQUID = _BoundedLiquid(undefined=_MissingAttribute)


class PushTemplate(BaseModel):
    """The message of a dispatch; text fields are Liquid templates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str = Field(min_length=1, max_length=1000)
    body: str = Field(min_length=1, max_length=4000)
    data: dict[str, str] = Field(default_factory=dict, max_length=50)
    """Custom key/values for the app; values are templates too."""
    deep_link: str | None = Field(default=None, max_length=2000)
    badge: int | None = Field(default=None, ge=0, le=99_999)
    sound: str | None = Field(default=None, max_length=256)
    collapse_id: str | None = Field(default=None, max_length=64)
    """APNs allows 64 bytes; FCM's collapse key is the same value."""
    priority: Literal["high", "normal"] = "high"
    ttl_seconds: int | None = Field(default=None, ge=0, le=28 * 24 * 3600)


class TemplateInvalid(ValueError):
    """The template does not parse: the whole dispatch is refused (a 400)."""


class ProfileSkipped(Exception):
    """This profile gets no message; `reason` is a short code for the dispatch's counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class RenderedMessage:
    title: str
    body: str
    data: dict[str, str]
    deep_link: str | None


class CompiledTemplate:
    """A PushTemplate parsed once per dispatch, rendered once per profile."""

    def __init__(self, template: PushTemplate) -> None:
        self.template = template
        try:
            self._title = _LIQUID.from_string(template.title)
            self._body = _LIQUID.from_string(template.body)
            self._data = {key: _LIQUID.from_string(value) for key, value in template.data.items()}
            self._link = _LIQUID.from_string(template.deep_link) if template.deep_link else None
        except LiquidError as exc:
            raise TemplateInvalid(f"template does not parse: {str(exc).splitlines()[0]}") from None

    def render(self, attributes: dict[str, Any]) -> RenderedMessage:
        try:
            return RenderedMessage(
                title=self._title.render(**attributes).strip(),
                body=self._body.render(**attributes).strip(),
                data={key: part.render(**attributes) for key, part in self._data.items()},
                deep_link=self._link.render(**attributes).strip() if self._link else None,
            )
        except UndefinedError as exc:
            name = str(exc).splitlines()[0].split("'")[1] if "'" in str(exc) else "?"
            raise ProfileSkipped("missing_attribute", name) from None
        except LoopIterationLimitError:
            raise ProfileSkipped("template_loop_limit") from None
        except OutputStreamLimitError:
            raise ProfileSkipped("template_output_limit") from None
        except LiquidError as exc:
            raise ProfileSkipped("template_error", type(exc).__name__) from None


def apns_payload(message: RenderedMessage, template: PushTemplate) -> bytes:
    """The APNs JSON payload (`aps` plus custom keys), at most 4 KB or ProfileSkipped."""
    aps: dict[str, Any] = {"alert": {"title": message.title, "body": message.body}}
    if template.badge is not None:
        aps["badge"] = template.badge
    if template.sound:
        aps["sound"] = template.sound
    payload: dict[str, Any] = {"aps": aps, **message.data}
    if message.deep_link:
        payload["deep_link"] = message.deep_link
    return _within_limit(orjson.dumps(payload))


def fcm_message(message: RenderedMessage, template: PushTemplate, token: str) -> bytes:
    """The FCM HTTP v1 `messages:send` body for one token, its content at most 4 KB."""
    data = dict(message.data)
    if message.deep_link:
        data["deep_link"] = message.deep_link
    content: dict[str, Any] = {"notification": {"title": message.title, "body": message.body}}
    if data:
        content["data"] = data
    _within_limit(orjson.dumps(content))
    android: dict[str, Any] = {"priority": "HIGH" if template.priority == "high" else "NORMAL"}
    if template.ttl_seconds is not None:
        android["ttl"] = f"{template.ttl_seconds}s"
    if template.collapse_id:
        android["collapse_key"] = template.collapse_id
    notification: dict[str, Any] = {}
    if template.sound:
        notification["sound"] = template.sound
    if notification:
        android["notification"] = notification
    return orjson.dumps({"message": {"token": token, **content, "android": android}})


def _within_limit(payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProfileSkipped("payload_too_large", f"{len(payload)} bytes")
    return payload
