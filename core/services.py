"""The long-lived objects a function invocation needs, built once per worker process."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from core.runs import RunLog
from core.settings import Settings
from core.storage import Storage
from core.sync.definitions import SyncDocument, load_document

APP_ROOT = Path(__file__).resolve().parent.parent


@dataclass(eq=False)
class Services:
    settings: Settings
    storage: Storage
    runs: RunLog

    @functools.cache  # noqa: B019 - one Services per worker process
    def syncs(self) -> SyncDocument:
        path = Path(self.settings.syncs_file)
        return load_document(path if path.is_absolute() else APP_ROOT / path)

    @classmethod
    def from_settings(cls, settings: Settings) -> Services:
        storage = Storage(settings.storage_account())
        return cls(settings=settings, storage=storage, runs=RunLog(storage))
