"""Destination instances for a sync: an explicit table, no naming conventions."""

from __future__ import annotations

from collections.abc import Callable

from core.destinations.base import Destination
from core.destinations.braze import BrazeDestination
from core.errors import ConfigError
from core.ratebudget import RateBudgetRow, SharedBudget, budget_key
from core.settings import Settings
from core.storage import Storage
from core.sync.definitions import BrazeDestinationSpec as BrazeSpec
from core.sync.definitions import SyncDefinition


def _braze(spec: BrazeSpec, settings: Settings, storage: Storage | None) -> Destination:
    if not settings.braze_rest_endpoint or settings.braze_api_key is None:
        raise ConfigError(
            "Braze destination needs SWITCHBOARD_BRAZE_REST_ENDPOINT and SWITCHBOARD_BRAZE_API_KEY"
        )
    endpoint, api_key = settings.braze_rest_endpoint, settings.braze_api_key.get_secret_value()
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


_BUILDERS: dict[str, Callable[[BrazeSpec, Settings, Storage | None], Destination]] = {
    "braze": _braze
}


def destination_for(
    sync: SyncDefinition, settings: Settings, storage: Storage | None = None
) -> Destination:
    """`storage`: where budgets shared across workers live (None: each paces alone)."""
    return _BUILDERS[sync.destination.type](sync.destination, settings, storage)
