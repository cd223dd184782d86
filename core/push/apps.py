"""Mobile apps Switchboard pushes to, declared in the configuration document (`push_apps`).

Credentials are never in the document: it names the app settings that hold them
(`key_setting`, `service_account_setting`).
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

APP_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
SETTING_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApnsApp(_Strict):
    bundle_id: str = Field(min_length=3, max_length=155)
    """The `apns-topic`."""
    team_id: str = Field(pattern=r"^[A-Z0-9]{10}$")
    key_id: str = Field(pattern=r"^[A-Z0-9]{10}$")
    key_setting: str = Field(pattern=SETTING_PATTERN)
    """Name of the app setting holding the .p8 signing key (PEM)."""
    environment: Literal["production", "sandbox"] = "production"


class FcmApp(_Strict):
    project_id: str = Field(pattern=r"^[a-z][a-z0-9-]{4,29}$")
    service_account_setting: str = Field(pattern=SETTING_PATTERN)
    """Name of the app setting holding the service account JSON."""


class PushApp(_Strict):
    id: str = Field(pattern=APP_ID_PATTERN)
    platform: Literal["ios", "android"]
    apns: ApnsApp | None = None
    fcm: FcmApp | None = None

    @model_validator(mode="after")
    def _credentials_match_platform(self) -> Self:
        if self.platform == "ios" and self.apns is None:
            raise ValueError("an ios app needs an `apns` section")
        if self.platform == "android" and self.fcm is None:
            raise ValueError("an android app needs an `fcm` section")
        return self
