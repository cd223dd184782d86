"""Push senders against the official clients: 20,000 messages each, same machine, same run.

The fake APNs and fake FCM (devhost/fakes, h2 on asyncio over TLS with a self-signed
certificate every client trusts) run in processes of their own with a fixed 20 ms answer
latency, so a client never shares a GIL with its server. Each client runs in a process
of its own too, and its CPU seconds and the server's are reported beside its rate: a
server near one full core per second of wall time would mean the server was the limit.

  FCM   ours: FcmProvider (HTTP/2, SWITCHBOARD_PUSH_CONCURRENCY streams in flight)
        firebase-admin messaging.send_each (batches of 500, HTTP/1.1, a thread per
        message, its 100-connection pool mounted on the fake's origin as the SDK mounts it
        on fcm.googleapis.com) and send_each_async (httpx, HTTP/2)
  APNs  ours: ApnsProvider (HTTP/2, same concurrency)
        aioapns 4.0 with its defaults: one APNs client, its connection pool
Targets: ours at least 3x send_each and at least 1.2x aioapns.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

from bench.processes import in_process

MESSAGES = int(os.environ.get("BENCH_PUSH_MESSAGES", "20000"))
LATENCY_SECONDS = 0.02
CONCURRENCY = 200  # SWITCHBOARD_PUSH_CONCURRENCY's default
PROJECT = "example-shop"
TOPIC = "com.example.shop"
TEAM_ID, KEY_ID = "ABCDE12345", "KEY1234567"


class FakeProcess:
    """`python -m devhost.fakes.serve <name>`, stopped by its own process id."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "devhost.fakes.serve", name, "--config", json.dumps(config)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        started = json.loads(self.process.stdout.readline())
        self.url, self.cert_path = started["url"], started["cert_path"]

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _message() -> Any:
    from core.push.templates import RenderedMessage

    return RenderedMessage(title="Hi Ana", body="You have 120 points", data={"tier": "gold"},
                           deep_link=None)  # fmt: skip


def _device(token: str, platform: str) -> Any:
    from core.push.tokens import Device

    return Device(app_id="bench", token=token, token_hash="-", platform=platform,
                  environment="production", registered_at=datetime.now(UTC))  # fmt: skip


async def _send_all(provider: Any, devices: list[Any]) -> int:
    limit = asyncio.Semaphore(CONCURRENCY)
    message = _message()

    async def one(device: Any) -> bool:
        async with limit:
            outcome = await provider.send(device, provider.encode(message, device))
            return bool(outcome.status == "sent")

    await provider.validate()
    try:
        return sum(await asyncio.gather(*(one(d) for d in devices)))
    finally:
        await provider.aclose()


# -- one client per process ---------------------------------------------------------


def client(kind: str, url: str, cert_path: str, secret_path: str, count: int) -> dict[str, Any]:
    """Send `count` messages with one client; run inside its own process."""
    with open(secret_path) as handle:
        secret = handle.read()
    # The official clients take the CA from the environment (requests, httpx).
    os.environ["REQUESTS_CA_BUNDLE"] = os.environ["SSL_CERT_FILE"] = cert_path
    cpu, started = _own_cpu(), time.perf_counter()
    sent = _CLIENTS[kind](url, cert_path, secret, count)
    elapsed = time.perf_counter() - started
    return {"messages": count, "sent": sent, "seconds": round(elapsed, 3),
            "per_second": round(count / elapsed, 1),
            "client_cpu_seconds": round(_own_cpu() - cpu, 2)}  # fmt: skip


def _ours_fcm(url: str, cert_path: str, secret: str, count: int) -> int:
    import requests

    from core.push.fcm import FcmCredentials, FcmProvider
    from core.push.h2client import H2Client
    from core.push.templates import PushTemplate

    session = requests.Session()
    session.verify, session.trust_env = cert_path, False
    provider = FcmProvider(
        PROJECT, FcmCredentials.from_json(secret, session), PushTemplate(title="-", body="-"),
        client=H2Client(url, ssl_context=ssl.create_default_context(cafile=cert_path)),
    )  # fmt: skip
    devices = [_device(_fcm_token(), "android") for _ in range(count)]
    return asyncio.run(_send_all(provider, devices))


def _firebase_app(url: str, secret: str) -> Any:
    import firebase_admin
    import requests.adapters
    from firebase_admin import _http_client, credentials, messaging

    messaging._MessagingService.FCM_URL = url + "/v1/projects/{0}/messages:send"
    app = firebase_admin.initialize_app(
        credentials.Certificate(json.loads(secret)), options={"projectId": PROJECT}
    )
    service = messaging._get_messaging_service(app)
    adapter = requests.adapters.HTTPAdapter(
        pool_connections=100, pool_maxsize=100, max_retries=_http_client.DEFAULT_RETRY_CONFIG
    )
    service._client.session.mount(url, adapter)
    return app


def _firebase_messages(count: int) -> list[Any]:
    from firebase_admin import messaging

    return [
        messaging.Message(
            token=_fcm_token(), data={"tier": "gold"},
            notification=messaging.Notification(title="Hi Ana", body="You have 120 points"),
        )
        for _ in range(count)
    ]  # fmt: skip


def _send_each(url: str, cert_path: str, secret: str, count: int) -> int:
    from firebase_admin import messaging

    app, messages = _firebase_app(url, secret), _firebase_messages(count)
    return sum(
        messaging.send_each(messages[i : i + 500], app=app).success_count
        for i in range(0, count, 500)
    )


def _send_each_async(url: str, cert_path: str, secret: str, count: int) -> int:
    from firebase_admin import messaging

    app, messages = _firebase_app(url, secret), _firebase_messages(count)

    async def go() -> int:
        sent = 0
        for i in range(0, count, 500):
            batch = await messaging.send_each_async(messages[i : i + 500], dry_run=False, app=app)
            sent += batch.success_count
        return sent

    return asyncio.run(go())


def _ours_apns(url: str, cert_path: str, secret: str, count: int) -> int:
    from core.push.apns import ApnsProvider, ProviderToken
    from core.push.h2client import H2Client
    from core.push.templates import PushTemplate

    provider = ApnsProvider(
        TOPIC, ProviderToken(TEAM_ID, KEY_ID, secret), PushTemplate(title="-", body="-"),
        client=H2Client(url, ssl_context=ssl.create_default_context(cafile=cert_path)),
    )  # fmt: skip
    devices = [_device(secrets.token_hex(32), "ios") for _ in range(count)]
    return asyncio.run(_send_all(provider, devices))


def _aioapns(url: str, cert_path: str, secret: str, count: int) -> int:
    import aioapns.connection
    from aioapns import APNs, NotificationRequest

    # aioapns has no endpoint option: point its production host at the fake.
    host, port = url.removeprefix("https://").rsplit(":", 1)
    aioapns.connection.APNsProductionClientProtocol.APNS_SERVER = host
    aioapns.connection.APNsProductionClientProtocol.APNS_PORT = int(port)
    payload = {"aps": {"alert": {"title": "Hi Ana", "body": "You have 120 points"}}, "tier": "gold"}

    async def go() -> int:
        apns = APNs(key=secret, key_id=KEY_ID, team_id=TEAM_ID, topic=TOPIC,
                    ssl_context=ssl.create_default_context(cafile=cert_path))  # fmt: skip
        requests = [NotificationRequest(device_token=secrets.token_hex(32), message=payload)
                    for _ in range(count)]  # fmt: skip
        results = await asyncio.gather(*(apns.send_notification(r) for r in requests))
        return sum(r.is_successful for r in results)

    return asyncio.run(go())


def _fcm_token() -> str:
    return "b" + secrets.token_urlsafe(130).replace("-", "_")


_CLIENTS = {
    "ours_fcm": _ours_fcm,
    "send_each": _send_each,
    "send_each_async": _send_each_async,
    "ours_apns": _ours_apns,
    "aioapns": _aioapns,
}


# -- the benchmark ------------------------------------------------------------------


def _measure(fake: FakeProcess, kind: str, secret_path: str) -> dict[str, Any]:
    server_cpu = fake.cpu_seconds()
    figures = in_process("bench.push", kind, fake.url, fake.cert_path, secret_path, str(MESSAGES))
    figures["server_cpu_seconds"] = round(fake.cpu_seconds() - server_cpu, 2)
    print(f"   {kind:16} {figures['per_second']:>9,.0f} msg/s   {figures['sent']:>6} sent   "
          f"client cpu {figures['client_cpu_seconds']:5.1f} s   server cpu "
          f"{figures['server_cpu_seconds']:5.1f} s   wall {figures['seconds']:5.1f} s")  # fmt: skip
    return figures


def run() -> dict[str, Any]:
    import tempfile

    from devhost.fakes.apns import signing_key_pair
    from devhost.fakes.fcm import service_account_for

    results: dict[str, Any] = {"messages": MESSAGES, "latency_ms": LATENCY_SECONDS * 1000,
                               "concurrency": CONCURRENCY}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-push-") as directory:
        key, public = signing_key_pair()
        apns_key = os.path.join(directory, "apns.p8")
        with open(apns_key, "w") as handle:
            handle.write(key)
        apns = FakeProcess("apns", {"latency_seconds": LATENCY_SECONDS, "public_key_pem": public,
                                    "record_deliveries": False})  # fmt: skip
        try:
            for kind in ("aioapns", "ours_apns"):
                results[kind] = _measure(apns, kind, apns_key)
        finally:
            apns.stop()
        account, account_public = service_account_for("https://token.invalid", PROJECT)
        fcm = FakeProcess("fcm", {"latency_seconds": LATENCY_SECONDS, "record_deliveries": False,
                                  "public_key_pem": account_public,
                                  "client_email": account["client_email"]})  # fmt: skip
        try:
            fcm_secret = os.path.join(directory, "fcm.json")
            with open(fcm_secret, "w") as handle:
                json.dump({**account, "token_uri": f"{fcm.url}/token"}, handle)
            for kind in ("send_each", "send_each_async", "ours_fcm"):
                results[kind] = _measure(fcm, kind, fcm_secret)
        finally:
            fcm.stop()
    ratios = {
        "fcm_vs_send_each": results["ours_fcm"]["per_second"] / results["send_each"]["per_second"],
        "fcm_vs_send_each_async": results["ours_fcm"]["per_second"]
        / results["send_each_async"]["per_second"],
        "apns_vs_aioapns": results["ours_apns"]["per_second"] / results["aioapns"]["per_second"],
    }
    results["ratios"] = {name: round(value, 2) for name, value in ratios.items()}
    print(f"   ours FCM / send_each       {ratios['fcm_vs_send_each']:.2f}x (target >= 3)")
    print(f"   ours FCM / send_each_async {ratios['fcm_vs_send_each_async']:.2f}x")
    print(f"   ours APNs / aioapns        {ratios['apns_vs_aioapns']:.2f}x (target >= 1.2)")
    return results


if __name__ == "__main__":
    kind, url, cert_path, secret_path, count = sys.argv[1:6]
    print(json.dumps(client(kind, url, cert_path, secret_path, int(count))))
