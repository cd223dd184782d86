"""Provider webhooks through the local host: 10,000 signed deliveries at concurrency 50.

Deliveries are mixed as real traffic is (SendGrid batches of 1-5 events, Mailgun, Twilio
status callbacks and STOP replies, SES bounces through SNS, Standard Webhooks), signed for
real by devhost/fakes/webhook_senders.py before the clock starts; 5% of them are sent a
second time afterwards, as providers retry. Measured: deliveries per second, p50 / p99 /
max latency of the answers, and afterwards, once the worker has processed every kept
delivery, that each expected event is in the event store exactly once (0 lost, 0
duplicated). The host's Azurite is the one `python -m devhost.services` started.

Side by side, in the same run: GET /api/health at the same concurrency; the answer path's
two storage calls (create-only blob, queue message) made straight from this process at the
same concurrency with no host in between, which is the floor any host on this machine
starts from; and a light load (concurrency 4) through the host.

Target: p99 under 200 ms and 0 lost.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import requests

from core.events.store import EventStore
from core.settings import load_settings
from core.storage import Storage
from core.webhooks.deliveries import DELIVERY_QUEUE, DeliveryMessage
from core.webhooks.hook import digest
from core.webhooks.processing import PendingDelivery
from devhost.fakes.webhook_senders import (
    MailgunSender,
    SendGridSender,
    SnsSender,
    StandardSender,
    TwilioSender,
)
from devhost.process import HostProcess
from devhost.services import free_port

DELIVERIES = int(os.environ.get("BENCH_WEBHOOK_DELIVERIES", "10000"))
CONCURRENCY = 50
LIGHT = (4, 600)
"""Concurrency and deliveries of the light-load run."""
RETRIED_SHARE = 0.05
TWILIO_URL = "https://switchboard.example.com/api/webhooks/twilio"
Delivery = tuple[str, dict[str, str], bytes, list[str]]
"""(provider, headers, body, the event ids it carries)."""


class Senders:
    def __init__(self) -> None:
        self.standard, self.sendgrid, self.mailgun = (
            StandardSender(),
            SendGridSender(),
            MailgunSender(),
        )
        self.twilio, self.sns = TwilioSender(TWILIO_URL), SnsSender().start()

    def env(self) -> dict[str, str]:
        return {
            "SWITCHBOARD_WEBHOOK_STANDARD_SECRETS": self.standard.secret,
            "SWITCHBOARD_WEBHOOK_SENDGRID_PUBLIC_KEYS": self.sendgrid.public_key,
            "SWITCHBOARD_WEBHOOK_MAILGUN_SIGNING_KEYS": self.mailgun.key,
            "SWITCHBOARD_WEBHOOK_TWILIO_AUTH_TOKENS": self.twilio.token,
            "SWITCHBOARD_WEBHOOK_TWILIO_URL": TWILIO_URL,
            "SWITCHBOARD_WEBHOOK_SNS_TOPIC_ARNS": self.sns.topic_arn,
            "SWITCHBOARD_WEBHOOK_SNS_CERT_URL_PATTERN": self.sns.CERT_URL_PATTERN,
        }

    def delivery(self, n: int, rng: random.Random) -> Delivery:
        kind = ("sendgrid", "sendgrid", "mailgun", "twilio", "ses", "standard")[n % 6]
        email = f"person{n}@bench.example.com"
        if kind == "sendgrid":
            kinds = [rng.choice(("delivered", "open", "click", "bounce")) for _ in range(5)]
            events = [SendGridSender.event(k, f"{i}.{email}")
                      for i, k in enumerate(kinds[: rng.randint(1, 5)])]  # fmt: skip
            headers, body = self.sendgrid.request(events)
            return kind, headers, body, [f"sendgrid:{e['sg_event_id']}" for e in events]
        if kind == "mailgun":
            event = MailgunSender.event(rng.choice(("delivered", "opened", "complained")), email)
            headers, body = self.mailgun.request(event)
            day = time.strftime("%Y%m%d", time.gmtime(event["timestamp"]))
            return kind, headers, body, [f"mailgun:{day}:{event['id']}"]
        if kind == "twilio":
            params = TwilioSender.status(f"+3161{n:07d}", rng.choice(("sent", "delivered")))
            headers, body = self.twilio.request(params)
            return kind, headers, body, [f"twilio:{params['MessageSid']}:{params['MessageStatus']}"]
        if kind == "ses":
            envelope = self.sns.envelope(SnsSender.bounce([email], permanent=n % 12 == 4))
            headers, body = self.sns.request(envelope)
            return kind, headers, body, [f"ses:{envelope['MessageId']}:0:{digest(email)[:12]}"]
        event_id = f"bench-{n}-{rng.getrandbits(32):08x}"
        event = StandardSender.event("email.delivered", {"id": event_id, "email": email})
        headers, body = self.standard.request(event)
        return kind, headers, body, [f"standard:{event_id}"]


def _send(
    base: str, deliveries: list[Delivery], concurrency: int = CONCURRENCY
) -> tuple[list[float], Counter[int]]:
    local = threading.local()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def post(delivery: Delivery) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        provider, headers, body, _ = delivery
        started = time.perf_counter()
        if provider == "health":  # the baseline: a route with three storage calls
            answer = session.get(f"{base}/api/health", timeout=30)
        else:
            url = f"{base}/api/webhooks/{provider}"
            answer = session.post(url, data=body, headers=headers, timeout=30)
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)
            statuses[answer.status_code] += 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, deliveries))
    return latencies, statuses


def _storage_floor(storage: Storage, deliveries: list[Delivery]) -> list[float]:
    """The answer path's two storage calls per delivery, from here, at CONCURRENCY."""
    latencies: list[float] = []
    lock = threading.Lock()
    run = f"floor-{time.time_ns()}"

    def keep(numbered: tuple[int, Delivery]) -> None:
        n, (provider, _, body, _) = numbered
        started = time.perf_counter()
        name = f"{run}/{provider}/{n}"
        storage.blobs.create("bench-floor", name, body, metadata={"body_sha256": digest(body)})
        storage.queues.send("bench-floor", DeliveryMessage(
            provider=provider, digest=digest(name), blob=name, run_id=run))  # fmt: skip
        with lock:
            latencies.append(time.perf_counter() - started)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(keep, enumerate(deliveries)))
    storage.blob_service.delete_container("bench-floor")
    storage.queue_service.delete_queue("bench-floor")
    return latencies


def _summary(latencies: list[float], seconds: float) -> dict[str, float]:
    return {
        "requests": len(latencies),
        "per_second": round(len(latencies) / seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
    }


def _timed(work: Any) -> tuple[list[float], float]:
    started = time.perf_counter()
    latencies = work()
    return latencies, time.perf_counter() - started


def _stored_ids(storage: Storage) -> Counter[str]:
    store, found = EventStore(storage), Counter[str]()
    for ref in storage.blobs.list("events", "segments/webhooks/"):
        entry = store.placed(
            ref.name.rsplit("/", 1)[1].removesuffix(".jsonl.gz").removesuffix(".kept")
        )
        if entry is not None:
            found.update(str(e["event_id"]) for e in store.read_segment_stored(entry))
    return found


def _pending_ids(storage: Storage) -> set[str]:
    """Event ids of deliveries still waiting for a batch (their events kept in the row)."""
    found: set[str] = set()
    for row in storage.tables.get(PendingDelivery).query_partition("pending"):
        for line in (row.events or "").splitlines():
            found.add(str(orjson.loads(line)["event_id"]))
    return found


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _drained(storage: Storage, deadline: float) -> bool:
    """Wait until the worker and the batcher are done: cheap looks, a queue's depth and a
    small partition."""
    pending = storage.tables.get(PendingDelivery)
    while time.monotonic() < deadline:
        if (
            storage.queues.depth(DELIVERY_QUEUE) == 0
            and next(iter(pending.query_partition("pending")), None) is None
        ):
            return True
        time.sleep(1)
    return False


def run() -> dict[str, Any]:
    storage = Storage(load_settings().storage_account())
    senders = Senders()
    rng = random.Random(7)
    light = [senders.delivery(n, rng) for n in range(DELIVERIES, DELIVERIES + LIGHT[1])]
    log = Path(tempfile.mkdtemp(prefix="bench-webhooks-")) / "devhost.log"
    host = HostProcess({**os.environ, **senders.env(), "SWITCHBOARD_LOG_LEVEL": "WARNING"},
                       free_port(), log)  # fmt: skip
    try:
        host.wait_ready()
        health: list[Delivery] = [("health", {}, b"", [])] * min(DELIVERIES, 1000)
        base = _summary(*_timed(lambda: _send(host.base_url, health)[0]))
        floor = _summary(*_timed(lambda: _storage_floor(storage, light)))
        calm = _summary(*_timed(lambda: _send(host.base_url, light, LIGHT[0])[0]))
        _drained(storage, time.monotonic() + 300)
        # Signed now, so that none is older than the providers' tolerance when it is sent
        # (at 25/s, 10,000 take longer than SendGrid's and Mailgun's five minutes).
        print(f"   signing {DELIVERIES:,} deliveries ...")
        deliveries = [senders.delivery(n, rng) for n in range(DELIVERIES)]
        retries = rng.sample(deliveries, int(DELIVERIES * RETRIED_SHARE))
        expected = [i for d in light + deliveries for i in d[3]]
        started = time.perf_counter()
        latencies, statuses = _send(host.base_url, deliveries)
        seconds = time.perf_counter() - started
        _, retry_statuses = _send(host.base_url, retries)
        _drained(storage, time.monotonic() + 900)
        processed_seconds = time.perf_counter() - started
    finally:
        host.stop()
        senders.sns.stop()
    stored = _stored_ids(storage)
    waiting = _pending_ids(storage)  # kept and applied, events not in a batch yet: late
    late = sum(1 for i in expected if stored[i] == 0 and i in waiting)
    lost = sum(1 for i in expected if stored[i] == 0 and i not in waiting)
    duplicated = sum(1 for i in expected if stored[i] > 1)
    figures: dict[str, Any] = {
        "deliveries": DELIVERIES, "events": len(expected), "concurrency": CONCURRENCY,
        "retried": len(retries), "per_second": round(DELIVERIES / seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "statuses": {str(k): v for k, v in statuses.items()},
        "retry_statuses": {str(k): v for k, v in retry_statuses.items()},
        "processed_within_seconds": round(processed_seconds, 1),
        "processed_per_second": round(DELIVERIES / processed_seconds, 1),
        "lost": lost, "late": late, "duplicated": duplicated,
        "baseline_health": base, "storage_floor": floor,
        "light_load": {"concurrency": LIGHT[0], **calm},
    }  # fmt: skip
    figures["p99_vs_health_p99"] = round(figures["p99_ms"] / base["p99_ms"], 2)
    figures["p99_vs_storage_floor_p99"] = round(figures["p99_ms"] / floor["p99_ms"], 2)
    print(f"   {figures['per_second']:,.0f} deliveries/s at concurrency {CONCURRENCY}: "
          f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms (target < 200), max "
          f"{figures['max_ms']} ms; answers {figures['statuses']}, retries answered "
          f"{figures['retry_statuses']}")  # fmt: skip
    print(
        f"   side by side at concurrency {CONCURRENCY}: GET /api/health {base['per_second']:,.0f}"
        f"/s, p99 {base['p99_ms']} ms; the two storage calls alone (no host) "
        f"{floor['per_second']:,.0f}/s, p50 {floor['p50_ms']} ms, p99 {floor['p99_ms']} ms; "
        f"webhook p99 / floor p99 = {figures['p99_vs_storage_floor_p99']}"
    )
    print(
        f"   light load (concurrency {LIGHT[0]}, {LIGHT[1]} deliveries): "
        f"{calm['per_second']:,.0f}/s, p50 {calm['p50_ms']} ms, p99 {calm['p99_ms']} ms"
    )
    print(
        f"   all processed within {figures['processed_within_seconds']} s "
        f"({figures['processed_per_second']}/s): {len(expected):,} events expected, "
        f"{lost} lost, {late} still pending, {duplicated} duplicated"
    )
    return figures
