"""Destination instances for a sync: an explicit table, no naming conventions."""

from __future__ import annotations

from collections.abc import Callable

from core.destinations.base import Destination
from core.destinations.braze import BrazeDestination
from core.errors import ConfigError
from core.settings import Settings
from core.sync.definitions import BrazeDestinationSpec as BrazeSpec
from core.sync.definitions import SyncDefinition


def _braze(spec: BrazeSpec, settings: Settings) -> Destination:
    if not settings.braze_rest_endpoint or settings.braze_api_key is None:
        raise ConfigError(
            "Braze destination needs SWITCHBOARD_BRAZE_REST_ENDPOINT and SWITCHBOARD_BRAZE_API_KEY"
        )
    return BrazeDestination(
        settings.braze_rest_endpoint,
        settings.braze_api_key.get_secret_value(),
        batch_size=spec.batch_size,
        max_body_bytes=spec.max_body_bytes,
        requests_per_second=spec.requests_per_second,
        max_attempts=spec.max_attempts,
        timeout_seconds=spec.timeout_seconds,
    )


_BUILDERS: dict[str, Callable[[BrazeSpec, Settings], Destination]] = {"braze": _braze}


def destination_for(sync: SyncDefinition, settings: Settings) -> Destination:
    return _BUILDERS[sync.destination.type](sync.destination, settings)
