"""The push token registry: which device tokens belong to which profile, per app.

Two tables, written together on every registration:

- `pushdevices`: one row per profile (PartitionKey: two hex digits of the profile id's
  hash, spreading load over 256 partitions; RowKey: the profile id) listing its devices
  for every app. A dispatch reads one row per targeted profile, with point reads.
- `pushtokens`: one row per token (PartitionKey app id, RowKey sha256 of the token) naming
  its profile, so a token re-registered under another profile moves off the old one.

Tokens are stored (dispatch needs them) but never logged or echoed: answers show a masked
form. A profile keeps its `MAX_DEVICES_PER_APP` most recently registered tokens per app.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.push.apps import APP_ID_PATTERN, PushApp
from core.storage import Storage
from core.storage.tables import EntityTable, TableEntity, safe_key

_APNS_TOKEN = re.compile(r"^[0-9a-fA-F]{64,200}$")
_FCM_TOKEN = re.compile(r"^[A-Za-z0-9_:\-]{100,4096}$")
MAX_DEVICES_PER_APP = 10
SCAN_FROM_PROFILES = 16
"""A dispatch reads a partition with a range query once it needs this many of its rows."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def mask_token(token: str) -> str:
    """`a1b2…e9f0`: enough to tell tokens apart in an answer, not to push to one."""
    return f"{token[:4]}…{token[-4:]}"


def profile_partition(profile_id: str) -> str:
    return hashlib.sha256(profile_id.encode()).hexdigest()[:2]


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


class Device(BaseModel):
    """One registered token of a profile."""

    model_config = ConfigDict(extra="ignore")

    app_id: str
    token: str
    token_hash: str
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


class DeviceList(BaseModel):
    items: list[Device] = Field(default_factory=list)


class ProfileDevices(TableEntity):
    table_name: ClassVar[str] = "pushdevices"

    profile_id: str
    devices: DeviceList = Field(default_factory=DeviceList)

    def for_app(self, app_id: str) -> list[Device]:
        return [d for d in self.devices.items if d.app_id == app_id]


class PushToken(TableEntity):
    """Table `pushtokens`: which profile a token currently belongs to."""

    table_name: ClassVar[str] = "pushtokens"

    profile_id: str
    registered_at: datetime


class AppMismatch(ValueError):
    """The registration does not fit the declared app (platform or environment)."""


class TokenRegistry:
    def __init__(self, storage: Storage) -> None:
        self.tokens: EntityTable[PushToken] = storage.tables.get(PushToken)
        self.profiles: EntityTable[ProfileDevices] = storage.tables.get(ProfileDevices)

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
                self._change_devices(old, lambda devices: _without(devices, request.app_id, key))
        device = Device(
            app_id=request.app_id, token=request.token, token_hash=key,
            platform=request.platform, environment=request.environment,
            locale=request.locale, time_zone=request.time_zone,
            push_opt_in=request.push_opt_in, registered_at=moment,
        )  # fmt: skip
        self._change_devices(request.profile_id, lambda devices: _with(devices, device))
        self.tokens.upsert(
            PushToken(
                partition_key=request.app_id,
                row_key=key,
                profile_id=request.profile_id,
                registered_at=moment,
            )
        )
        return {
            "app_id": request.app_id,
            "token": mask_token(request.token),
            "profile_id": request.profile_id,
            "status": status,
            "active": True,
            "push_opt_in": request.push_opt_in,
        }

    def deactivate(
        self, app_id: str, token_key: str, reason: str, *, unregistered_at: datetime | None = None,
        now: datetime | None = None,
    ) -> bool:  # fmt: skip
        """Switch a dead token off. With `unregistered_at` (APNs 410), only if the token was
        registered before that moment: a later registration is a new, live token."""
        pointer = self.tokens.get(app_id, token_key)
        if pointer is None:
            return False
        moment = now or datetime.now(UTC)
        changed = False

        def switch_off(devices: list[Device]) -> list[Device] | None:
            nonlocal changed
            updated, changed = [], False
            for device in devices:
                same = device.app_id == app_id and device.token_hash == token_key
                stale = unregistered_at is None or device.registered_at < unregistered_at
                if same and device.active and stale:
                    off = {"active": False, "deactivated_at": moment, "deactivation_reason": reason}
                    device = device.model_copy(update=off)
                    changed = True
                updated.append(device)
            return updated if changed else None

        self._change_devices(pointer.entity.profile_id, switch_off)
        return changed

    def devices_of(self, profile_ids: list[str], *, parallel: int = 8) -> dict[str, list[Device]]:
        """Every registered device of each profile (active or not); absent: none.

        Profiles are grouped by partition. A partition with many of them is read with one
        range query over their row keys (a page per 1,000 rows, where point reads cost a
        request each); a partition with few gets point reads."""
        by_partition: dict[str, list[str]] = {}
        for profile in profile_ids:
            by_partition.setdefault(profile_partition(profile), []).append(safe_key(profile))
        points: list[tuple[str, str]] = []
        scans: list[tuple[str, set[str]]] = []
        for partition, keys in by_partition.items():
            if len(keys) >= SCAN_FROM_PROFILES:
                scans.append((partition, set(keys)))
            else:
                points.extend((partition, key) for key in keys)
        found: dict[str, list[Device]] = {}

        def scan(partition: str, keys: set[str]) -> list[ProfileDevices]:
            rows = self.profiles.query_partition(partition, row_from=min(keys), row_to=max(keys))
            return [row for row in rows if row.row_key in keys]

        with ThreadPoolExecutor(parallel) as pool:
            for rows in pool.map(lambda job: scan(*job), scans):
                found.update((row.profile_id, row.devices.items) for row in rows)
        for versioned in self.profiles.get_points(points, parallel=parallel).values():
            found[versioned.entity.profile_id] = versioned.entity.devices.items
        return found

    def devices(self, app_id: str, profile_id: str) -> list[Device]:
        """The profile's registered tokens for one app (active or not)."""
        return [d for d in self.devices_of([profile_id]).get(profile_id, []) if d.app_id == app_id]

    def _change_devices(
        self, profile_id: str, change: Callable[[list[Device]], list[Device] | None]
    ) -> None:
        def apply(current: ProfileDevices | None) -> ProfileDevices | None:
            devices = current.devices.items if current else []
            updated = change(list(devices))
            if updated is None:
                return None
            return ProfileDevices(
                partition_key=profile_partition(profile_id), row_key=safe_key(profile_id),
                profile_id=profile_id, devices=DeviceList(items=updated),
            )  # fmt: skip

        self.profiles.mutate(profile_partition(profile_id), safe_key(profile_id), apply)


def _without(devices: list[Device], app_id: str, key: str) -> list[Device] | None:
    kept = [d for d in devices if not (d.app_id == app_id and d.token_hash == key)]
    return kept if len(kept) != len(devices) else None


def _with(devices: list[Device], device: Device) -> list[Device]:
    others = [
        d for d in devices if not (d.app_id == device.app_id and d.token_hash == device.token_hash)
    ]
    newest_first = sorted(
        (d for d in others if d.app_id == device.app_id),
        key=lambda d: d.registered_at,
        reverse=True,
    )
    same_app = newest_first[: MAX_DEVICES_PER_APP - 1]
    return [d for d in others if d.app_id != device.app_id] + same_app + [device]
