"""The push token registry: which device token belongs to which profile, per app.

Table `pushtokens`: PartitionKey app id, RowKey sha256 of the token; the token itself is
stored (dispatch needs it) but never logged or echoed: answers show a masked form.
Table `pushprofiles`: PartitionKey `{app id}|{profile id}`, RowKey the token's hash, so a
dispatch finds a profile's devices with one partition query. Re-registering a token under
another profile moves it: the old profile's index row goes, the new one comes.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.push.apps import APP_ID_PATTERN, PushApp
from core.storage import Storage
from core.storage.tables import EntityTable, TableEntity, safe_key

_APNS_TOKEN = re.compile(r"^[0-9a-fA-F]{64,200}$")
_FCM_TOKEN = re.compile(r"^[A-Za-z0-9_:\-]{100,4096}$")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def mask_token(token: str) -> str:
    """`a1b2…e9f0`: enough to tell tokens apart in an answer, not to push to one."""
    return f"{token[:4]}…{token[-4:]}"


class TokenRegistration(BaseModel):
    """`POST /api/push/tokens`: an app's device token for one profile."""

    model_config = ConfigDict(extra="forbid")

    app_id: str = Field(pattern=APP_ID_PATTERN)
    token: str = Field(min_length=32, max_length=4096)
    profile_id: str = Field(min_length=1, max_length=256)
    platform: Literal["ios", "android"]
    environment: Literal["production", "sandbox"] = "production"
    locale: str | None = Field(default=None, pattern=r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
    time_zone: str | None = Field(default=None, max_length=64)
    push_opt_in: bool = True

    @model_validator(mode="after")
    def _token_fits_platform(self) -> Self:
        pattern = _APNS_TOKEN if self.platform == "ios" else _FCM_TOKEN
        if not pattern.match(self.token):
            kind = "an APNs device token (hex)" if self.platform == "ios" else "an FCM token"
            raise ValueError(f"token is not {kind}")
        return self


class PushToken(TableEntity):
    table_name: ClassVar[str] = "pushtokens"

    token: str
    profile_id: str
    platform: str
    environment: str
    locale: str | None = None
    time_zone: str | None = None
    push_opt_in: bool = True
    active: bool = True
    registered_at: datetime
    """When the app last registered it: APNs 410s older than this do not deactivate it."""
    deactivated_at: datetime | None = None
    deactivation_reason: str | None = None


class ProfileDevice(TableEntity):
    """Table `pushprofiles`: one row per token of a profile (PK `{app}|{profile}`)."""

    table_name: ClassVar[str] = "pushprofiles"


class AppMismatch(ValueError):
    """The registration does not fit the declared app (platform or environment)."""


class TokenRegistry:
    def __init__(self, storage: Storage) -> None:
        self.tokens: EntityTable[PushToken] = storage.tables.get(PushToken)
        self.profiles: EntityTable[ProfileDevice] = storage.tables.get(ProfileDevice)

    @staticmethod
    def profile_key(app_id: str, profile_id: str) -> str:
        return safe_key(f"{app_id}|{profile_id}")

    def register(
        self, app: PushApp, request: TokenRegistration, now: datetime | None = None
    ) -> dict[str, object]:
        """Register or refresh a token; moves it when it arrives under another profile."""
        if request.platform != app.platform:
            raise AppMismatch(f"app {app.id} is an {app.platform} app, not {request.platform}")
        if app.apns is not None and request.environment != app.apns.environment:
            raise AppMismatch(
                f"app {app.id} pushes to the APNs {app.apns.environment} environment, "
                f"not {request.environment}"
            )
        moment = now or datetime.now(UTC)
        key = token_hash(request.token)
        previous = self.tokens.get(request.app_id, key)
        status = "registered"
        if previous is not None:
            old = previous.entity.profile_id
            status = "refreshed" if old == request.profile_id else "moved"
            if status == "moved":
                self.profiles.delete(self.profile_key(request.app_id, old), key)
        self.profiles.upsert(
            ProfileDevice(
                partition_key=self.profile_key(request.app_id, request.profile_id), row_key=key
            )
        )
        self.tokens.upsert(
            PushToken(
                partition_key=request.app_id, row_key=key, token=request.token,
                profile_id=request.profile_id, platform=request.platform,
                environment=request.environment, locale=request.locale,
                time_zone=request.time_zone, push_opt_in=request.push_opt_in,
                registered_at=moment,
            )
        )  # fmt: skip
        return {
            "app_id": request.app_id,
            "token": mask_token(request.token),
            "profile_id": request.profile_id,
            "status": status,
            "active": True,
            "push_opt_in": request.push_opt_in,
        }

    def devices(self, app_id: str, profile_id: str) -> list[PushToken]:
        """The profile's registered tokens for the app (active or not)."""
        keys = [
            row.row_key
            for row in self.profiles.query_partition(self.profile_key(app_id, profile_id))
        ]
        found = self.tokens.get_many(app_id, keys) if keys else {}
        return [found[key].entity for key in keys if key in found]
