"""The long-lived objects a function invocation needs, built once per worker process."""

from __future__ import annotations

from dataclasses import dataclass

from core.runs import RunLog
from core.settings import Settings
from core.storage import Storage


@dataclass
class Services:
    settings: Settings
    storage: Storage
    runs: RunLog

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        storage = Storage(settings.storage_account())
        return cls(settings=settings, storage=storage, runs=RunLog(storage))
