"""Push dispatch's shapes: the request, the queue messages, the chunk and key rows, and
where a dispatch keeps its blobs (core/push/dispatch.py says how they are used)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.push.apps import APP_ID_PATTERN
from core.push.templates import PushTemplate
from core.storage.tables import TableEntity

PLAN_QUEUE = "push-plans"
PUSH_CHUNK_QUEUE = "push-chunks"
CONTAINER = "push-dispatches"
SOURCE = "push"
SLICE_PROFILES = 500
RETRY_ROUNDS = 3
"""Pushes still failing after a provider's retries are tried again this many times, later."""
MAX_PROFILE_IDS = 1_000_000
_APP_ID = re.compile(APP_ID_PATTERN)
GAVE_UP = "gave_up: "


class SegmentTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sync_id: str = Field(min_length=1, max_length=64)
    audience: str = Field(min_length=1, max_length=255)
    """The audience name in the sync's definition; members are those Switchboard added."""


class DispatchTargets(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile_ids: list[str] | None = Field(default=None, min_length=1, max_length=MAX_PROFILE_IDS)
    segment: SegmentTarget | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.profile_ids is None) == (self.segment is None):
            raise ValueError("give either profile_ids or segment")
        if self.profile_ids is not None and any(not p or len(p) > 256 for p in self.profile_ids):
            raise ValueError("profile ids are 1 to 256 characters")
        return self


class DispatchRequest(BaseModel):
    """`POST /api/push/send`."""

    model_config = ConfigDict(extra="forbid")

    dispatch_key: str | None = Field(default=None, min_length=8, max_length=128,
                                     pattern=r"^[A-Za-z0-9._:-]+$")  # fmt: skip
    """The caller's idempotency key: posting the same key again returns the same dispatch."""
    app_ids: list[str] | None = Field(default=None, min_length=1, max_length=20)
    """Which apps to push through (default: every declared app)."""
    campaign_id: str | None = Field(default=None, max_length=128)
    template: PushTemplate
    targets: DispatchTargets
    defaults: dict[str, Any] = Field(default_factory=dict)
    """Attributes every profile gets unless its own say otherwise."""
    attributes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per profile id: attributes for the template (first_name, push_subscribe, ...)."""

    @model_validator(mode="after")
    def _app_ids_are_ids(self) -> Self:
        if self.app_ids is not None and not all(_APP_ID.match(a) for a in self.app_ids):
            raise ValueError("app_ids: not an app id")
        return self


class DispatchMessage(BaseModel):
    """What every chunk needs of the request (`message.json`), without its targets."""

    template: PushTemplate
    campaign_id: str | None = None


class DispatchRejected(ValueError):
    """The request cannot be dispatched; `status` and `code` go to the caller."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class PlanMessage(BaseModel):
    dispatch_id: str


class PushChunkMessage(BaseModel):
    dispatch_id: str
    chunk: int
    retry_key: str | None = None
    """Set for a retry round: the pushes of one slice the provider could not take then."""
    round: int = 0

    @property
    def key(self) -> str:
        return self.retry_key or chunk_key(self.chunk)


class ChunkState(TableEntity):
    """Table `pushchunks`, PK the dispatch id: RK `chunk-00001` per chunk, `app-{id}` for
    an app stopped by a configuration error."""

    table_name: ClassVar[str] = "pushchunks"

    profiles: int = 0
    next_index: int = 0
    done: bool = False
    owner: str | None = None
    claimed_until: datetime | None = None
    counts: dict[str, int] = Field(default_factory=dict)
    error: str | None = None


class DispatchKey(TableEntity):
    """Table `pushdispatchkeys`: a caller's `dispatch_key` -> the dispatch it started."""

    table_name: ClassVar[str] = "pushdispatchkeys"

    dispatch_id: str


def chunk_key(chunk: int) -> str:
    return f"chunk-{chunk:05d}"


def blob_path(dispatch_id: str, name: str) -> str:
    return f"{dispatch_id}/{name}"
