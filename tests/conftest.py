"""Session fixtures: Azurite and the S3 server start once; app settings point at them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devhost.process import HostProcess
from devhost.services import LocalServices, free_port

ROOT = Path(__file__).resolve().parent.parent
# Import-time settings validation needs a value before any app module is imported; the
# session fixture replaces it with the real Azurite endpoints.
os.environ.setdefault("AzureWebJobsStorage", "UseDevelopmentStorage=true")


@pytest.fixture(scope="session")
def local_services() -> Iterator[dict[str, str]]:
    services = LocalServices()
    env = services.start()
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        services.stop()


@pytest.fixture(scope="session")
def storage(local_services: dict[str, str]):  # type: ignore[no-untyped-def]
    from core.storage import Storage
    from core.storage.connection import parse_connection_string

    return Storage(parse_connection_string(local_services["AzureWebJobsStorage"]))


@pytest.fixture
def unique() -> str:
    """A short unique name for containers, tables and queues within one test."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def running_app(local_services: dict[str, str], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    app = HostProcess(local_services, free_port(), tmp_path_factory.mktemp("devhost") / "log")
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()
