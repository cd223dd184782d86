"""Runs the sample flows through the local host and prints what happened.

Expects the environment `python -m devhost.services` provides (Azurite, S3). Starts the
function app with `python -m devhost serve`, talks to it over HTTP like an operator would,
lands a segment export in Blob storage like a CDP would, and fires the export timer through
the host's admin API. Exits non-zero if any step does not do what it should.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import requests

from core.containers import SEGMENTS
from core.currents.s3 import s3_client
from core.errors import ConfigError
from core.events.store import EventStore
from core.export.service import Window, run_log_export, window_floor
from core.services import Services
from core.settings import load_settings
from core.storage import Storage
from devhost.fakes.currents import avro_bytes, currents_key, put_file, record_for
from devhost.fakes.webhook_senders import SendGridSender, TwilioSender
from devhost.process import HostProcess
from devhost.services import free_port

DATA = Path(__file__).parent / "data"
SYNC_ID = "demo-vip-audience"
CURRENTS_BUCKET = "demo-braze-currents"
CURRENTS_PREFIX = "currents"


class DemoFailed(RuntimeError):
    pass


def call(method: str, url: str, body: Any = None, *, trust: str | None = None) -> tuple[int, Any]:
    """One JSON request; `trust`: a CA bundle for https (the push fakes' certificates)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    context = ssl.create_default_context(cafile=trust) if trust else None
    if context is not None:
        context.set_alpn_protocols(["http/1.1"])  # the fake APNs speaks HTTP/1.1 only if asked
    with urllib.request.urlopen(request, timeout=10, context=context) as answer:
        raw = answer.read()
        return answer.status, json.loads(raw) if raw else None


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise DemoFailed(f"timed out waiting for {what}")


def heading(text: str) -> None:
    print(f"\n== {text}")


def main() -> int:
    try:
        storage = Storage(load_settings().storage_account())
    except ConfigError as exc:
        print(f"demo: {exc} (run me through `make demo`)", file=sys.stderr)
        return 2
    log_path = Path(tempfile.mkdtemp(prefix="switchboard-demo-")) / "devhost.log"
    s3_client(os.environ.get("SWITCHBOARD_S3_ENDPOINT_URL"), "us-east-1").create_bucket(
        Bucket=CURRENTS_BUCKET
    )
    env = {
        **os.environ,
        **SENDERS.env(),
        "SWITCHBOARD_CURRENTS_BUCKET": CURRENTS_BUCKET,
        "SWITCHBOARD_CURRENTS_PREFIX": CURRENTS_PREFIX,
        "SWITCHBOARD_CURRENTS_INLINE_FILES": "10",  # the demo's six files in the timer itself
    }
    host = HostProcess(env, free_port(), log_path)
    try:
        host.wait_ready()
        return run(host, storage)
    except DemoFailed as exc:
        print(f"\ndemo FAILED: {exc}\n--- host log ---\n{log_path.read_text()}", file=sys.stderr)
        return 1
    finally:
        host.stop()


def land(api: str, storage: Storage, blob_name: str, sample: str) -> dict[str, Any]:
    storage.blobs.create(SEGMENTS, blob_name, (DATA / sample).read_bytes())
    print(f"uploaded {SEGMENTS}/{blob_name}")

    def finished() -> dict[str, Any] | None:
        _, body = call("GET", f"{api}/runs?kind=segment_sync&sync_id={SYNC_ID}")
        for run in body["runs"]:
            if run["source"].endswith(blob_name) and run["status"] in ("succeeded", "failed"):
                return dict(run)
        return None

    run = wait_for(f"the run of {blob_name}", finished)
    if run["status"] != "succeeded":
        raise DemoFailed(f"run {run['run_id']} failed: {run['error']}")
    return run


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def show(title: str, lines: list[str]) -> None:
    print(title)
    for line in lines:
        print(f"  {line}")


def expect(run: dict[str, Any], **counts: int) -> None:
    """Fail the demo unless the run counted exactly these outcomes."""
    wrong = {k: run["counts"].get(k) for k, v in counts.items() if run["counts"].get(k) != v}
    if wrong:
        raise DemoFailed(f"run {run['run_id']}: expected {counts}, got {wrong}")


def brief(run: dict[str, Any]) -> str:
    counts = run["counts"]
    names = ("sent", "unchanged", "rejected", "unmatched", "suppressed", "failed")
    return ", ".join(f"{counts.get(n, 0)} {n}" for n in names)


def report(run: dict[str, Any]) -> None:
    print(f"run {run['run_id']} {run['status']}: {brief(run)}")
    reasons = {k: v for k, v in run["counts"].items() if "." in k}
    if reasons:
        print(f"  reasons: {json.dumps(reasons)}")


def fire_timer(host: HostProcess, function: str, kind: str) -> dict[str, Any]:
    """Fire a timer through the host's admin API; the run it recorded, once finished."""
    api = f"{host.base_url}/api"
    _, before = call("GET", f"{api}/runs?kind={kind}")
    status, _ = call("POST", f"{host.base_url}/admin/functions/{function}", {})
    if status != 202:
        raise DemoFailed(f"admin API answered {status}")
    known = {r["run_id"] for r in before["runs"]}

    def new_run() -> dict[str, Any] | None:
        _, body = call("GET", f"{api}/runs?kind={kind}")
        new = (r for r in body["runs"] if r["run_id"] not in known)
        return next((r for r in new if r["status"] in ("succeeded", "failed")), None)

    return dict(wait_for(f"{function} to record a run", new_run))


def currents(host: HostProcess, storage: Storage) -> list[str]:
    """Braze Currents files in S3 become events and suppressions, each event once."""
    heading("4. Timer: Braze Currents Avro files in S3 become engagement events")
    s3 = s3_client(os.environ.get("SWITCHBOARD_S3_ENDPOINT_URL"), "us-east-1")
    hour = datetime.now(UTC).strftime("%Y-%m-%d-%H")
    moment = int(time.time()) - 300
    plan = [  # event type, event numbers, seconds after `moment`
        ("email.Send", range(3), 0), ("email.Open", range(2), 60), ("email.Bounce", [2], 5),
        ("email.Unsubscribe", [1], 90), ("pushnotification.Send", [7], 0),
    ]  # fmt: skip
    batches = {
        f"users.messages.{kind}": [
            record_for(f"users.messages.{kind}", n, moment + at) for n in numbers
        ]
        for kind, numbers, at in plan
    }
    # Braze delivers at least once: the opens arrive a second time in another file.
    files = [*batches.items(), ("users.messages.email.Open", batches["users.messages.email.Open"])]
    for offset, (event_type, records) in enumerate(files):
        key = currents_key(CURRENTS_PREFIX, event_type, hour, offset=offset)
        put_file(s3, CURRENTS_BUCKET, key, avro_bytes(event_type, records))
        print(f"s3://{CURRENTS_BUCKET}/{key} ({len(records)} events)")
    run = fire_timer(host, "currents_timer", "currents")
    counts = run["counts"]
    print(f"run {run['run_id']} {run['status']}: {json.dumps(counts)}")
    if counts.get("events.stored") != 8 or counts.get("events.duplicates.in_store") != 2:
        raise DemoFailed(f"expected 8 stored events and 2 duplicates, got {counts}")
    now = datetime.now(UTC)
    events = list(
        EventStore(storage).read_window(
            now.replace(minute=0, second=0, microsecond=0), now + timedelta(hours=1)
        )
    )
    show("some stored events (addresses stay in the store, never in logs):", [
        f"{e.occurred_at:%H:%M:%S} {e.channel.value:5} {e.type.value:13} {e.event_id[:20]}…"
        for e in sorted(events, key=lambda e: e.occurred_at)[-8:]
    ])  # fmt: skip
    lookups = []
    for address in ("user2@example.com", "user1@example.com"):
        _, found = call(
            "POST",
            f"{host.base_url}/api/suppressions/lookup",
            {"channel": "email", "address": address},
        )
        lookups.append(f"{found['address']}: {', '.join(found['reasons']) or 'not suppressed'}")
    show("suppression list, updated from the bounce and the unsubscribe:", lookups)
    heading("5. Timer: Currents again; every file is finished, nothing is read twice")
    again = fire_timer(host, "currents_timer", "currents")
    print(f"run {again['run_id']}: {json.dumps(again['counts'])}")
    if again["counts"].get("files.new") != 0:
        raise DemoFailed("the second Currents run found new files")
    return [
        f"TIMER  currents_timer -> run {run['run_id']}: {counts['files.ingested']} files, "
        f"{counts['events.stored']} events stored, "
        f"{counts['events.duplicates.in_store']} duplicates dropped",
        f"TIMER  currents_timer -> run {again['run_id']}: nothing new",
    ]


class _Senders:
    """A SendGrid and a Twilio account of the demo's own: their keys go into the app's
    settings, and they sign what they send (devhost/fakes/webhook_senders.py)."""

    TWILIO_URL = "https://switchboard.example.com/api/webhooks/twilio"

    def __init__(self) -> None:
        self.sendgrid = SendGridSender()
        self.twilio = TwilioSender(self.TWILIO_URL)

    def env(self) -> dict[str, str]:
        return {
            "SWITCHBOARD_WEBHOOK_SENDGRID_PUBLIC_KEYS": self.sendgrid.public_key,
            "SWITCHBOARD_WEBHOOK_TWILIO_AUTH_TOKENS": self.twilio.token,
            "SWITCHBOARD_WEBHOOK_TWILIO_URL": self.TWILIO_URL,
        }


SENDERS = _Senders()


def webhooks(host: HostProcess, storage: Storage) -> list[str]:
    """A signed SendGrid bounce and a Twilio STOP become events and suppression entries."""
    heading("6. HTTP: provider webhooks (a SendGrid bounce, a Twilio STOP reply)")
    url = f"{host.base_url}/api/webhooks"
    bounce = SendGridSender.event("bounce", "hard.bounce@example.com", type="bounce",
                                  reason="550 5.1.1 The email account does not exist")  # fmt: skip
    headers, body = SENDERS.sendgrid.request([bounce])
    answer = requests.post(f"{url}/sendgrid", data=body, headers=headers, timeout=30)
    print(f"POST /api/webhooks/sendgrid (signed, 1 event) -> {answer.status_code} {answer.text}")
    forged = requests.post(f"{url}/sendgrid", data=body.replace(b"550", b"250"), headers=headers,
                           timeout=30)  # fmt: skip
    print(f"the same with one byte changed -> {forged.status_code} {forged.text}")
    headers, body = SENDERS.twilio.request(TwilioSender.inbound("+31612345678", "STOP"))
    stop = requests.post(f"{url}/twilio", data=body, headers=headers, timeout=30)
    print(f"POST /api/webhooks/twilio (an incoming STOP) -> {stop.status_code} {stop.text}")
    if (answer.status_code, forged.status_code, stop.status_code) != (200, 401, 200):
        raise DemoFailed("the webhooks were not answered 200, 401, 200")
    lookups = []
    for channel, address in (("email", "hard.bounce@example.com"), ("phone", "+31612345678")):

        def suppressed(c: str = channel, a: str = address) -> dict[str, Any] | None:
            _, found = call("POST", f"{host.base_url}/api/suppressions/lookup",
                            {"channel": c, "address": a})  # fmt: skip
            return found if found["reasons"] else None

        found = wait_for(f"the {channel} suppression", suppressed)
        lookups.append(f"{found['address']}: {', '.join(found['reasons'])}")
    show("suppression list, updated from the webhooks:", lookups)

    def webhook_events() -> list[Any]:  # the batcher moves them into the store every 5 s
        now = datetime.now(UTC)
        return [
            e for e in EventStore(storage).read_window(
                now.replace(minute=0, second=0, microsecond=0), now + timedelta(hours=1))
            if e.source.startswith("webhook:")
        ]  # fmt: skip

    events = wait_for("the webhook events", lambda: len(webhook_events()) >= 2 and webhook_events())
    show("their events in the event store:", [
        f"{e.source:16} {e.channel.value:5} {e.type.value:16} {e.event_id[:28]}…" for e in events
    ])  # fmt: skip
    if len(events) != 2:
        raise DemoFailed(f"expected 2 webhook events, found {len(events)}")
    return ["HTTP   POST /api/webhooks/sendgrid, /twilio -> a hard bounce and a STOP suppressed, "
            "2 events stored; a forged request refused (401)"]  # fmt: skip


def push(host: HostProcess, storage: Storage) -> list[str]:
    """Tokens registered, one personalised dispatch to APNs and FCM, a dead token off."""
    api, trust = f"{host.base_url}/api", os.environ["SWITCHBOARD_PUSH_CA_FILE"]
    apns, fcm = os.environ["SWITCHBOARD_APNS_ENDPOINT"], os.environ["SWITCHBOARD_FCM_ENDPOINT"]
    heading("7. HTTP: apps register push tokens (POST /api/push/tokens)")
    devices = [
        ("demo-shop-ios", "ios", "CRM-0001", secrets.token_hex(32)),
        ("demo-shop-android", "android", "CRM-0001", "d" + secrets.token_urlsafe(120)),
        ("demo-shop-ios", "ios", "CRM-0002", secrets.token_hex(32)),
        ("demo-shop-android", "android", "CRM-0003", "e" + secrets.token_urlsafe(120)),
    ]
    for app_id, platform, profile, token in devices:
        body = {"app_id": app_id, "platform": platform, "profile_id": profile, "token": token}
        status, answer = call("POST", f"{api}/push/tokens", body)
        print(f"{status} {json.dumps(answer)}")
    dead = devices[2][3]
    gone_at = int((time.time() + 60) * 1000)  # APNs saw it die after it was registered
    call("POST", f"{apns}/_fake/config", {"unregistered": {dead: gone_at}}, trust=trust)
    print(f"(fake) APNs now answers 410 Unregistered for CRM-0002's token {dead[:4]}…{dead[-4:]}")

    heading("8. HTTP: a journey posts one personalised dispatch (POST /api/push/send)")
    request = {
        "campaign_id": "demo-points-reminder",
        "template": {"title": "Hi {{ first_name }}",
                     "body": "You have {{ points | default: 0 }} points waiting",
                     "deep_link": "shop://points"},
        "targets": {"profile_ids": ["CRM-0001", "CRM-0002", "CRM-0003", "CRM-0004"]},
        "attributes": {"CRM-0001": {"first_name": "Ana", "points": 120},
                       "CRM-0002": {"first_name": "Bo"}, "CRM-0003": {"first_name": "Cy"},
                       "CRM-0004": {"first_name": "Dee"}},
    }  # fmt: skip
    status, accepted = call("POST", f"{api}/push/send", request)
    print(f"{status} {json.dumps(accepted)}")
    dispatch_id = accepted["dispatch_id"]

    def finished() -> dict[str, Any] | None:
        _, state = call("GET", f"{api}/push/dispatches/{dispatch_id}")
        return state if state["status"] in ("succeeded", "failed") else None

    result = wait_for(f"dispatch {dispatch_id}", finished, timeout=60)
    show(f"dispatch {dispatch_id}: {result['status']}", [
        f"{name}: {count}" for name, count in sorted(result["counts"].items())
    ])  # fmt: skip
    _, apns_state = call("GET", f"{apns}/_fake/state", trust=trust)
    _, fcm_state = call("GET", f"{fcm}/_fake/state", trust=trust)
    show("(fake) APNs delivered:", [
        f"{d['token'][:4]}…: {json.dumps(d['payload'])}" for d in apns_state["delivered"]
    ])  # fmt: skip
    show("(fake) FCM delivered:", [
        f"{m['message']['token'][:4]}…: {json.dumps(m['message']['notification'])}"
        for m in fcm_state["sent"]
    ])  # fmt: skip
    from core.push.tokens import TokenRegistry

    registry = TokenRegistry(storage)
    states = [f"{d.app_id} {d.token[:4]}…{d.token[-4:]}: active={d.active}"
              + (f" ({d.deactivation_reason})" if d.deactivation_reason else "")
              for d in registry.devices("demo-shop-ios", "CRM-0002")]  # fmt: skip
    show("CRM-0002's devices after the dispatch:", states)
    counts = result["counts"]
    if counts.get("messages.sent") != 3 or counts.get("devices.deactivated") != 1:
        raise DemoFailed(f"expected 3 pushes sent and one dead token switched off, got {counts}")

    heading("9. HTTP: the app reports the push was opened (POST /api/push/events)")
    opened = {"app_id": "demo-shop-ios", "platform": "ios", "events": [{
        "id": f"open-{dispatch_id}", "type": "open", "profile_id": "CRM-0001",
        "occurred_at": datetime.now(UTC).isoformat(), "dispatch_id": dispatch_id,
    }]}  # fmt: skip
    status, answer = call("POST", f"{api}/push/events", opened)
    print(f"{status} {json.dumps(answer)}")
    return [
        f"HTTP   push/tokens x{len(devices)}; push/send -> dispatch {dispatch_id}: "
        f"{counts.get('messages.sent', 0)} sent, {counts.get('messages.dead_token', 0)} dead "
        f"token switched off, {counts.get('profiles.skipped.no_active_device', 0)} profile "
        "without devices",
        f"HTTP   push/events -> {answer}",
    ]


def log_export(host: HostProcess, storage: Storage) -> list[str]:
    """The export timer through the host, then the window holding the Currents events."""
    heading("10. Timer: the four-hourly log export fires (through the host's admin API)")
    fired = fire_timer(host, "log_export_timer", "log_export")
    print(f"run {fired['run_id']}: {json.dumps(fired['counts'])} {json.dumps(fired['detail'])}")
    print("(the current four-hour window is not complete yet, so it is not exported now)")

    services = Services.from_settings(load_settings())
    window = Window(window_floor(datetime.now(UTC)))
    heading(f"10. The export at {window.end:%H:%M} UTC, when window {window.label} is complete")
    print(f"(run here with that time as `now`; the timer does the same at {window.end:%H:%M})")
    outcome = run_log_export(services, now=window.end, source="demo", force=True)
    if outcome.refused is not None or outcome.run.status != "succeeded":
        raise DemoFailed(f"log export did not run: {outcome.refused or outcome.run.error}")
    container = services.settings.export_container
    manifest = json.loads(read_all(storage, container, window.manifest_name))
    print(f"{container}/{window.manifest_name}:")
    for entry in manifest["files"]:
        print(f"  {entry['name']}: {entry['records']} records, sha256 {entry['sha256'][:16]}…")
    for entry in manifest["files"]:
        lines = gzip.decompress(read_all(storage, container, entry["name"])).decode().splitlines()
        show(f"{entry['log']} (first of {len(lines)} records):", lines[:1] or ["(none)"])
    records = {entry["log"]: entry["records"] for entry in manifest["files"]}
    if records.get("broadLog", 0) < 5 or records.get("trackingLog", 0) < 3:
        raise DemoFailed(f"expected the Currents events in the window's files, got {records}")
    return [
        f"TIMER  log_export_timer -> run {fired['run_id']} (window not complete yet)",
        f"EXPORT window {window.label}: " + ", ".join(f"{n} {k}" for k, n in records.items()),
    ]


def read_all(storage: Storage, container: str, name: str) -> bytes:
    return b"".join(storage.blobs.iter_chunks(storage.blobs.ref(container, name)))


def run(host: HostProcess, storage: Storage) -> int:
    api = f"{host.base_url}/api"
    summary: list[str] = []

    heading("1. HTTP: GET /api/health")
    status, health = call("GET", f"{api}/health")
    print(json.dumps(health, indent=2))
    if status != 200 or health["status"] != "ok":
        raise DemoFailed("health check did not report ok")
    summary.append(f"HTTP   GET /api/health -> {status}, storage blob/table/queue reachable")

    braze = os.environ.get("SWITCHBOARD_BRAZE_REST_ENDPOINT", "")
    known = ["CRM-0001", "CRM-0002", "CRM-0003"]
    call("POST", f"{braze}/_fake/config", {"known_profiles": known})
    print(f"(fake) Braze at {braze} knows profiles {', '.join(known)}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")

    heading("2. Blob: the CDP drops a segment export into segments/ (first sync)")
    first = land(api, storage, f"{SYNC_ID}/{stamp}/export_1.csv", "aep_audience_export.csv")
    report(first)
    _, profiles = call("GET", f"{braze}/_fake/profiles")
    show("Braze profiles now:", [f"{i}: {dumps(a)}" for i, a in sorted(profiles.items())])
    expect(first, sent=3, unmatched=1)
    summary.append(f"BLOB   export 1 -> run {first['run_id']}: {brief(first)}")

    heading("3. Blob: the next export, with a few changes (only those are sent)")
    _, before = call("GET", f"{braze}/_fake/received")
    second = land(api, storage, f"{SYNC_ID}/{stamp}/export_2.csv", "aep_audience_export_2.csv")
    report(second)
    _, after = call("GET", f"{braze}/_fake/received")
    show("objects Braze received for this export:", [dumps(o) for o in after[len(before) :]])
    rejects = second["detail"].get("rejects")
    if rejects:
        container, _, name = rejects.partition("/")
        text = b"".join(storage.blobs.iter_chunks(storage.blobs.ref(container, name))).decode()
        show(f"rejects file {rejects}:", text.splitlines())
    expect(second, sent=3, rejected=1)
    summary.append(f"BLOB   export 2 -> run {second['run_id']}: {brief(second)}")

    summary += currents(host, storage)

    summary += webhooks(host, storage)

    summary += push(host, storage)

    summary += log_export(host, storage)

    heading("Summary")
    for line in summary:
        print(f"  {line}")
    print("\ndemo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
