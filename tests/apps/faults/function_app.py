"""Switchboard's own app with faults a test turns on (tests only).

The real `function_app` is hosted as it is; before it is imported, a few steps of its
flows are wrapped so that they raise when the file named by `SWITCHBOARD_FAULTS_FILE`
lists their fault (read on every call, so a test turns faults on and off while the host
runs). Each fault stands for what a bug or a dying dependency does to a run: an
exception escaping it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import core.currents.discovery
import core.export.service
import core.push.chunk_runner
import core.push.dispatch
import core.sync.service
import core.webhooks.processing


class InjectedFault(RuntimeError):
    pass


def _active() -> dict[str, Any]:
    path = os.environ.get("SWITCHBOARD_FAULTS_FILE")
    if not path or not Path(path).exists():
        return {}
    return dict(json.loads(Path(path).read_text() or "{}"))


def _faulty(module: Any, name: str, fault: str, applies: Callable[..., bool]) -> None:
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        wanted = _active().get(fault)
        if wanted is not None and applies(wanted, *args, **kwargs):
            raise InjectedFault(f"injected fault {fault}")
        return original(*args, **kwargs)

    setattr(module, name, wrapped)


def _names_blob(marker: str, storage: Any, sync: Any, blobs: list[Any], **_: Any) -> bool:
    return any(marker in blob.name for blob in blobs)


def _plan_names(marker: str, services: Any, sync: Any, plan: Any, *_: Any, **__: Any) -> bool:
    return marker in plan.blob_name


def _file_named(marker: str, context: Any, obj: Any) -> bool:
    return marker in obj.key


def _always(wanted: Any, *_: Any, **__: Any) -> bool:
    return bool(wanted)


def _provider_named(name: str, services: Any, providers: Any, message: Any) -> bool:
    return bool(message.provider == name)


def _chunk_numbered(number: int, runner: Any) -> bool:
    return bool(runner.chunk_key == f"chunk-{number:05d}")


_faulty(core.sync.service, "split_file", "segment-split", _names_blob)
_faulty(core.sync.service, "process_buckets", "segment-buckets", _plan_names)
_faulty(core.currents.discovery, "ingest_file", "currents-file", _file_named)
_faulty(core.currents.discovery, "discover", "currents-timer", _always)
_faulty(core.export.service, "_due_windows", "export", _always)
_faulty(core.push.dispatch, "_frozen_targets", "push-plan", _always)
_faulty(core.push.chunk_runner.PushChunkRunner, "run", "push-chunk", _chunk_numbered)
_faulty(core.webhooks.processing, "process_delivery", "webhook-delivery", _provider_named)

# The real app, loaded by path after the faults are in place (the host loaded this file
# under the name `function_app`).
_spec = importlib.util.spec_from_file_location(
    "switchboard_function_app", Path(__file__).resolve().parents[3] / "function_app.py"
)
assert _spec is not None and _spec.loader is not None
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)
app = _real.app
