"""Destination instances for a sync: an explicit table, no naming conventions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.destinations.base import Destination
from core.destinations.braze import BrazeDestination
from core.destinations.campaign import CampaignDestination, CampaignDestinationSpec
from core.destinations.file_drop import BlobDrop
from core.destinations.known_profiles import KnownProfiles
from core.errors import ConfigError
from core.ratebudget import RateBudgetRow, SharedBudget, budget_key
from core.settings import Settings
from core.storage import Storage
from core.storage.connection import parse_connection_string
from core.sync.definitions import BrazeDestinationSpec, SyncDefinition
from core.sync.native import NATIVE_OBJECT_FORMAT

CAMPAIGN_DROP_CONTAINER = "campaign-imports"


def _braze_settings(settings: Settings) -> tuple[str, str]:
    if not settings.braze_rest_endpoint or settings.braze_api_key is None:
        raise ConfigError(
            "Braze destination needs SWITCHBOARD_BRAZE_REST_ENDPOINT and SWITCHBOARD_BRAZE_API_KEY"
        )
    return settings.braze_rest_endpoint, settings.braze_api_key.get_secret_value()


def _braze(
    sync: SyncDefinition, settings: Settings, storage: Storage | None, run_id: str
) -> Destination:
    spec = sync.destination
    assert isinstance(spec, BrazeDestinationSpec)
    endpoint, api_key = _braze_settings(settings)
    pacer = None
    if spec.shared_budget and storage is not None:
        pacer = SharedBudget(
            storage.tables.get(RateBudgetRow), budget_key(endpoint, api_key),
            spec.requests_per_second,
        )  # fmt: skip
    return BrazeDestination(
        endpoint,
        api_key,
        batch_size=spec.batch_size,
        max_body_bytes=spec.max_body_bytes,
        requests_per_second=spec.requests_per_second,
        max_attempts=spec.max_attempts,
        timeout_seconds=spec.timeout_seconds,
        max_in_flight=spec.in_flight,
        pacer=pacer,
    )


def campaign_drop_storage(settings: Settings, storage: Storage | None) -> Storage | None:
    """The account Campaign's workflow reads: its own connection string, or ours."""
    connection = settings.campaign_drop_connection
    if connection is None or not connection.get_secret_value().strip():
        return storage
    try:
        account = parse_connection_string(connection.get_secret_value())
    except ConfigError as exc:
        raise ConfigError(f"SWITCHBOARD_CAMPAIGN_DROP_CONNECTION: {exc}") from None
    return Storage(account)


def _campaign(
    sync: SyncDefinition, settings: Settings, storage: Storage | None, run_id: str
) -> Destination:
    spec = sync.destination
    assert isinstance(spec, CampaignDestinationSpec)
    if storage is None:
        raise ConfigError("the Adobe Campaign destination needs storage for its ledger")
    drop = BlobDrop(campaign_drop_storage(settings, storage) or storage, CAMPAIGN_DROP_CONTAINER)
    known = KnownProfiles(storage, spec.known_profiles) if spec.known_profiles else None
    return CampaignDestination(spec, sync, drop, run_id=run_id, ledger=storage.blobs, known=known)


def _campaign_settings(settings: Settings) -> None:
    campaign_drop_storage(settings, None)  # a malformed connection string: ConfigError


@dataclass(frozen=True)
class _Kind:
    name: str
    """The destination's name (its delta state is kept under it)."""
    native_format: str | None
    build: Callable[[SyncDefinition, Settings, Storage | None, str], Destination]
    check: Callable[[Settings], object]


_KINDS: dict[str, _Kind] = {
    "braze": _Kind(BrazeDestination.name, NATIVE_OBJECT_FORMAT, _braze, _braze_settings),
    "adobe_campaign": _Kind(CampaignDestination.name, None, _campaign, _campaign_settings),
}


def destination_name(sync: SyncDefinition) -> str:
    return _KINDS[sync.destination.type].name


def takes_native_objects(sync: SyncDefinition) -> bool:
    """Whether the sync's destination takes the C bucket path's objects as they are."""
    return _KINDS[sync.destination.type].native_format == NATIVE_OBJECT_FORMAT


def check_configured(sync: SyncDefinition, settings: Settings) -> None:
    """Raise ConfigError when the settings the sync's destination needs are missing."""
    _KINDS[sync.destination.type].check(settings)


def destination_for(
    sync: SyncDefinition, settings: Settings, storage: Storage | None = None, *, run_id: str = ""
) -> Destination:
    """`storage`: where budgets shared across workers and file ledgers live (None: each
    paces alone); `run_id`: the run it sends for (file names carry it)."""
    return _KINDS[sync.destination.type].build(sync, settings, storage, run_id)
