"""What `GET /api/health` reports: whether the app can reach its storage."""

from __future__ import annotations

from typing import Any

from core import __version__
from core.services import Services


def health_report(services: Services) -> tuple[int, dict[str, Any]]:
    """HTTP status and body: 200 when every storage service answers, else 503."""
    checks = services.storage.ping()
    healthy = all(check.ok for check in checks.values())
    body: dict[str, Any] = {
        "status": "ok" if healthy else "degraded",
        "version": __version__,
        "storage": {
            "account": services.storage.account.account_name,
            "emulator": services.storage.account.is_emulator,
            **{name: check.as_dict() for name, check in checks.items()},
        },
    }
    return (200 if healthy else 503), body
