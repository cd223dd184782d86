"""Session fixtures: Azurite and the S3 server start once; app settings point at them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

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


class RunningApp:
    """`python -m devhost serve` in a child process, hosting the real function_app.py."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        import subprocess
        import sys

        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devhost", "serve", "--port", str(port),
             "--blob-scan-interval", "0.2"],
            cwd=ROOT, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self) -> None:
        import requests

        from tests.helpers import eventually

        def healthy() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError("devhost exited:\n" + self.log_path.read_text())
            try:
                return requests.get(f"{self.base_url}/api/health", timeout=2).ok
            except requests.ConnectionError:
                return False

        eventually(healthy, timeout=30)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=15)
        self._log.close()


@pytest.fixture(scope="session")
def running_app(local_services: dict[str, str], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    app = RunningApp(local_services, free_port(), tmp_path_factory.mktemp("devhost") / "log")
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()
