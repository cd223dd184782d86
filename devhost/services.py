"""Local backing services: Azurite (blob, queue, table) and moto's S3 server.

Each runs in its own process group on free loopback ports; `LocalServices` waits until
they answer and stops exactly the processes it started (by their ids) on exit, failure,
SIGTERM or Ctrl-C.

    python -m devhost.services [--data DIR] -- COMMAND ...

runs COMMAND with `AzureWebJobsStorage` and `SWITCHBOARD_S3_ENDPOINT_URL` pointing at
them (and, with --fakes, the fake Braze, APNs and FCM servers with the settings the
sample config's apps need: endpoints, credentials, a CA bundle for the fakes) and
returns COMMAND's exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from core.storage.connection import azurite_connection_string

ROOT = Path(__file__).resolve().parent.parent
AZURITE = ROOT / "node_modules" / "azurite" / "dist" / "src" / "azurite.js"
LOOPBACK = "127.0.0.1"
_READY_TIMEOUT_SECONDS = 60


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the process that started us dies (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass  # not Linux: stop() still cleans up on every normal path


def _watch_parent(stop: threading.Event) -> None:
    """Stop this manager when whoever ran it (make, a shell) goes away without a signal."""
    parent = os.getppid()
    while not stop.wait(1.0):
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            return


class ManagedProcess:
    def __init__(self, name: str, command: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def wait_until_answers(self, url: str) -> None:
        self._wait_until(lambda: _answers(url), f"answer at {url}")

    def wait_for_file(self, path: Path) -> None:
        self._wait_until(path.exists, f"write {path.name}")

    def _wait_until(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise ServiceError(f"{self.name} exited at start:\n{tail}")
            if ready():
                return
            time.sleep(0.1)
        raise ServiceError(f"{self.name} did not {what} within {_READY_TIMEOUT_SECONDS}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            # Our child leads its own process group: signal the group, nothing else.
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            except ProcessLookupError:
                pass
        self._log.close()


class LocalServices:
    """Azurite and an S3 server for one session of demo, start, tests or bench."""

    def __init__(
        self, data_dir: Path | None = None, *, with_s3: bool = True, with_fakes: bool = False
    ) -> None:
        self.data_dir = data_dir
        self.with_s3 = with_s3
        self.with_fakes = with_fakes
        self._tmp = tempfile.TemporaryDirectory(prefix="switchboard-services-")
        self.log_dir = Path(self._tmp.name)
        self.processes: list[ManagedProcess] = []
        self.env: dict[str, str] = {}
        self._azurite_ports = (0, 0, 0)

    def start(self) -> dict[str, str]:
        if not AZURITE.exists():
            raise ServiceError(f"Azurite is not installed at {AZURITE}; run `npm ci` first")
        try:
            self._start_azurite()
            if self.with_s3:
                self._start_s3()
            if self.with_fakes:
                self._start_fake_braze()
                self._start_push_fakes()
        except BaseException:
            self.stop()
            raise
        return self.env

    def restart_azurite(self) -> None:
        """Stop Azurite and start it again on the same ports (with a `data_dir`, on the same
        data), as a storage outage does; for tests of what survives one."""
        azurite = next(p for p in self.processes if p.name == "azurite")
        azurite.stop()
        self.processes.remove(azurite)
        self._start_azurite(self._azurite_ports)

    def _start_azurite(self, ports: tuple[int, int, int] | None = None) -> None:
        blob, queue, table = ports or (free_port(), free_port(), free_port())
        self._azurite_ports = (blob, queue, table)
        command = [
            "node", str(AZURITE), "--silent", "--skipApiVersionCheck", "--loose",
            "--disableTelemetry", "--blobHost", LOOPBACK, "--queueHost", LOOPBACK,
            "--tableHost", LOOPBACK, "--blobPort", str(blob), "--queuePort", str(queue),
            "--tablePort", str(table),
        ]  # fmt: skip
        if self.data_dir is None:
            command.append("--inMemoryPersistence")
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            command += ["--location", str(self.data_dir)]
        azurite = ManagedProcess("azurite", command, self.log_dir / "azurite.log")
        self.processes.append(azurite)
        for port in (blob, queue, table):
            azurite.wait_until_answers(f"http://{LOOPBACK}:{port}/devstoreaccount1")
        self.env["AzureWebJobsStorage"] = azurite_connection_string(LOOPBACK, blob, queue, table)

    def _start_s3(self) -> None:
        port = free_port()
        command = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]
        moto = ManagedProcess("s3", command, self.log_dir / "s3.log")
        self.processes.append(moto)
        moto.wait_until_answers(f"http://{LOOPBACK}:{port}/")
        self.env.update(
            {
                "SWITCHBOARD_S3_ENDPOINT_URL": f"http://{LOOPBACK}:{port}",
                "AWS_ACCESS_KEY_ID": "switchboard-local",
                "AWS_SECRET_ACCESS_KEY": "switchboard-local",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )

    def _start_fake_braze(self) -> None:
        port = free_port()
        command = [sys.executable, "-m", "devhost.fakes.braze", "--port", str(port)]
        braze = ManagedProcess("fake-braze", command, self.log_dir / "braze.log")
        self.processes.append(braze)
        braze.wait_until_answers(f"http://{LOOPBACK}:{port}/_fake/profiles")
        self.env.update(
            {
                "SWITCHBOARD_BRAZE_REST_ENDPOINT": f"http://{LOOPBACK}:{port}",
                "SWITCHBOARD_BRAZE_API_KEY": "fake-braze-key",
            }
        )

    def _start_push_fakes(self) -> None:
        """Fake APNs and FCM, and the settings of config/syncs.yaml's demo apps for them:
        their credentials, endpoints, and one CA bundle trusting both fakes' certificates."""
        from devhost.fakes.apns import signing_key_pair
        from devhost.fakes.fcm import service_account_for

        key, public = signing_key_pair()
        account, account_public = service_account_for("https://token.invalid", "example-shop")
        configs = {
            "apns": {"public_key_pem": public},
            "fcm": {"public_key_pem": account_public, "client_email": account["client_email"]},
        }
        started: dict[str, dict[str, str]] = {}
        for name, config in configs.items():
            ready = self.log_dir / f"fake-{name}.json"
            command = [sys.executable, "-m", "devhost.fakes.serve", name,
                       "--config", json.dumps(config), "--ready-file", str(ready)]  # fmt: skip
            fake = ManagedProcess(f"fake-{name}", command, self.log_dir / f"fake-{name}.log")
            self.processes.append(fake)
            fake.wait_for_file(ready)
            started[name] = json.loads(ready.read_text())
        bundle = self.log_dir / "push-ca.pem"
        bundle.write_text("".join(Path(s["cert_path"]).read_text() for s in started.values()))
        account["token_uri"] = f"{started['fcm']['url']}/token"
        self.env.update(
            {
                "SWITCHBOARD_APNS_ENDPOINT": started["apns"]["url"],
                "SWITCHBOARD_FCM_ENDPOINT": started["fcm"]["url"],
                "SWITCHBOARD_PUSH_CA_FILE": str(bundle),
                "SWITCHBOARD_APNS_KEY_DEMO_SHOP": key,
                "SWITCHBOARD_FCM_DEMO_SHOP": json.dumps(account),
            }
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
        self._tmp.cleanup()

    def __enter__(self) -> dict[str, str]:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devhost.services")
    parser.add_argument("--data", type=Path, help="persist Azurite data here (default: memory)")
    parser.add_argument("--fakes", action="store_true", help="also start the fake Braze server")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command to run after --")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    watching = threading.Event()
    threading.Thread(target=_watch_parent, args=(watching,), daemon=True).start()
    services = LocalServices(args.data, with_fakes=args.fakes)
    child: subprocess.Popen[bytes] | None = None
    try:
        env = services.start()
        started = ", ".join(p.name for p in services.processes)
        print(f"services: {started} up on loopback", flush=True)
        # The command leads a process group of its own, so that stopping it also stops
        # whatever it started (a benchmark's worker processes, say).
        child = subprocess.Popen(
            command, env={**os.environ, **env}, preexec_fn=_die_with_parent,
            start_new_session=True,
        )  # fmt: skip
        return child.wait()
    except ServiceError as exc:
        print(f"services: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        watching.set()
        if child is not None:
            _stop_group(child)
        services.stop()


def _stop_group(child: subprocess.Popen[bytes]) -> None:
    """Interrupt the command's group as Ctrl-C would, then insist."""
    for sig, grace in ((signal.SIGINT, 15), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return  # the group is gone
        try:
            child.wait(timeout=grace)
            os.killpg(child.pid, 0)  # the leader is gone: are any members left?
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


if __name__ == "__main__":
    sys.exit(main())
