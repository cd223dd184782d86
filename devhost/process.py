"""`python -m devhost serve` as a child process, for the demo and end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent


class HostProcess:
    def __init__(
        self, env: dict[str, str], port: int, log_path: Path, *, blob_scan_interval: float = 0.2,
        app: Path | None = None,
    ) -> None:  # fmt: skip
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        app_args = ["--app", str(app)] if app is not None else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devhost", "serve", "--port", str(port),
             "--blob-scan-interval", str(blob_scan_interval), *app_args],
            cwd=ROOT, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("devhost exited:\n" + self.log_path.read_text())
            try:
                with urllib.request.urlopen(f"{self.base_url}/api/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"devhost did not become healthy within {timeout}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()

    def __enter__(self) -> HostProcess:
        self.wait_ready()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
