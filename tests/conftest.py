"""Session fixtures: Azurite and the S3 server start once; app settings point at them."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from devhost.fakes.braze import FakeBraze
from devhost.process import HostProcess
from devhost.services import LocalServices, free_port
from tests.helpers import assert_no_personal_data, eventually
from tests.scenarios import Scenario

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
    """The session's Azurite. At the end of the session no run may be left open: every
    run the tests started must have ended (succeeded, partially failed or failed)."""
    from core.storage import Storage
    from core.storage.connection import parse_connection_string

    session_storage = Storage(parse_connection_string(local_services["AzureWebJobsStorage"]))
    yield session_storage
    assert_no_run_left_open(session_storage)


def assert_no_run_left_open(storage: Any, timeout: float = 120) -> None:
    """Runs still going (a host finishing a last file) get `timeout` seconds to end."""
    from core.runs import RunLog

    def open_runs() -> list[tuple[str, str, str, str | None]]:
        found = RunLog(storage).open_runs()
        return [(r.run_id, r.kind.value, r.status.value, r.source) for r in found]

    try:
        eventually(lambda: not open_runs(), timeout=timeout, interval=1)
    except AssertionError:
        raise AssertionError(f"runs left open at the end of the session: {open_runs()}") from None


@pytest.fixture
def unique() -> str:
    """A short unique name for containers, tables and queues within one test."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def port() -> int:
    return free_port()


SCENARIOS = (
    "identical", "changes", "exited", "suppressed", "rejects", "not-utf8", "clean",
    "storm-429", "storm-5xx", "crash", "terminal", "gzip", "jsonl", "consent", "upsert",
    "fanout", "dryrun", "mirror", "manifest", "push", "lookup-budget", "early-manifest",
    "manifest-deadline", "header-only", "long-line", "gov-blocked", "gov-drop",
    "gov-dataset", "consent-aep", "consent-withdrawn", "erasure", "campaign",
)  # fmt: skip


def _labelled(fields: list[dict[str, Any]], labels: dict[str, list[str]]) -> list[dict[str, Any]]:
    return [{**f, "labels": labels[f["target"]]} if f["target"] in labels else f for f in fields]


# Scenario syncs under the governance of tests/data/syncs.yaml, as a user would label them.
GOVERNED: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    # Loyalty points are a partner's data that may not go to a third party.
    "gov-blocked": lambda s: {**s, "fields": _labelled(s["fields"], {"loyalty_points": ["C2"]})},
    # The country is a broad location: dropped for targeting; `tier` carries one of the two
    # labels a match-all policy needs, so it still goes.
    "gov-drop": lambda s: {
        **s, "fields": _labelled(s["fields"], {"country": ["S2"], "tier": ["crm-internal"]}),
    },
    # The whole export (as a dataset) may not go to a third party.
    "gov-dataset": lambda s: {**s, "labels": ["C2"]},
    # AEP's consent field, one permission.
    "consent-aep": lambda s: {
        **s, "consent": {"channel": "email", "column": "consents.marketing.email.val"},
    },
    "consent-withdrawn": lambda s: {
        **s, "consent": {"channel": "email", "column": "consents.marketing.email.val"},
    },
}  # fmt: skip


def scenario_syncs(path: Path) -> Path:
    """tests/data/syncs.yaml plus a copy of its `vip` sync per scenario (`vip-<name>`),
    so that every end-to-end test has its own delta state."""
    import yaml

    document = yaml.safe_load((ROOT / "tests/data/syncs.yaml").read_text())
    base = next(s for s in document["syncs"] if s["id"] == "vip")
    for name in SCENARIOS:
        copy = {**base, "id": f"vip-{name}"}
        if name in ("upsert", "mirror"):
            copy["mode"] = name
        if name in ("manifest", "early-manifest"):
            copy["input"] = {"wait_for_manifest": True}
        if name == "manifest-deadline":  # parts are awaited for three seconds
            copy["input"] = {"wait_for_manifest": True, "parts_deadline_minutes": 0.05}
        if name == "fanout":
            copy["processing"] = {"rows_per_worker": 1000, "in_memory_max_rows": 100}
        if name == "lookup-budget":  # room for about half of 3,000 profiles' look-ups
            copy["processing"] = {"in_memory_max_rows": 100, "unchanged_lookup_mb": 0.07}
        if name == "storm-5xx":
            copy["destination"] = {"type": "braze", "max_attempts": 8}
        if name == "campaign":  # Adobe Campaign import files; its registry is its own
            copy["destination"] = {"type": "adobe_campaign", "known_profiles": "campaign-e2e"}
        if name in GOVERNED:
            copy = GOVERNED[name](copy)
        document["syncs"].append(copy)
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="session")
def fake_braze():  # type: ignore[no-untyped-def]
    from devhost.fakes.braze import FakeBraze

    fake = FakeBraze().start()
    yield fake
    fake.stop()


@dataclass
class PushFakes:
    apns: Any
    fcm: Any
    env: dict[str, str]


@pytest.fixture(scope="module")
def braze() -> Iterator[FakeBraze]:
    """A fake Braze of the module's own, which its tests reset at will."""
    fake = FakeBraze().start()
    yield fake
    fake.stop()


@dataclass
class WebhookSenders:
    """Senders signing with the keys the app's settings hold (devhost/fakes/webhook_senders.py)."""

    standard: Any
    sendgrid: Any
    mailgun: Any
    twilio: Any
    sns: Any
    env: dict[str, str]
    retired: dict[str, Any]
    """A second key per provider that takes keys, also configured (a rotation under way)."""


@pytest.fixture(scope="session")
def webhook_senders() -> Iterator[WebhookSenders]:
    from devhost.fakes.webhook_senders import (
        MailgunSender,
        SendGridSender,
        SnsSender,
        StandardSender,
        TwilioSender,
    )

    twilio_url = "https://switchboard.example.com/api/webhooks/twilio"
    senders = WebhookSenders(
        StandardSender(), SendGridSender(), MailgunSender(), TwilioSender(twilio_url),
        SnsSender().start(), {},
        {"standard": StandardSender(), "sendgrid": SendGridSender(), "mailgun": MailgunSender(),
         "twilio": TwilioSender(twilio_url)},
    )  # fmt: skip
    old = senders.retired
    senders.env.update({
        "SWITCHBOARD_WEBHOOK_STANDARD_SECRETS":
            f"{old['standard'].secret} {senders.standard.secret}",
        "SWITCHBOARD_WEBHOOK_SENDGRID_PUBLIC_KEYS":
            f"{old['sendgrid'].public_key} {senders.sendgrid.public_key}",
        "SWITCHBOARD_WEBHOOK_MAILGUN_SIGNING_KEYS": f"{senders.mailgun.key},{old['mailgun'].key}",
        "SWITCHBOARD_WEBHOOK_TWILIO_AUTH_TOKENS": f"{senders.twilio.token} {old['twilio'].token}",
        "SWITCHBOARD_WEBHOOK_TWILIO_URL": twilio_url,
        "SWITCHBOARD_WEBHOOK_SNS_TOPIC_ARNS": senders.sns.topic_arn,
        "SWITCHBOARD_WEBHOOK_SNS_CERT_URL_PATTERN": senders.sns.CERT_URL_PATTERN,
    })  # fmt: skip
    yield senders
    senders.sns.stop()


@pytest.fixture(scope="session")
def push_fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PushFakes]:
    """Fake APNs and FCM over TLS, the credentials the app's settings hold for them, and
    one CA bundle (both self-signed certificates) the app trusts."""
    from devhost.fakes.apns import FakeApns, signing_key_pair
    from devhost.fakes.fcm import FakeFcm, service_account_for

    apns, fcm = FakeApns().start(), FakeFcm().start()
    key, public = signing_key_pair()
    apns.configure(public_key_pem=public)
    account, account_public = service_account_for(fcm.url, "example-shop")
    fcm.configure(public_key_pem=account_public, client_email=account["client_email"])
    other_key, _ = signing_key_pair()  # an app whose key APNs does not know
    bundle = tmp_path_factory.mktemp("push") / "push-ca.pem"
    bundle.write_text(apns.cert_path.read_text() + fcm.cert_path.read_text())
    env = {
        "SWITCHBOARD_APNS_ENDPOINT": apns.url,
        "SWITCHBOARD_FCM_ENDPOINT": fcm.url,
        "SWITCHBOARD_PUSH_CA_FILE": str(bundle),
        "SWITCHBOARD_APNS_KEY_SHOP": key,
        "SWITCHBOARD_APNS_KEY_KIOSK": other_key,
        "SWITCHBOARD_FCM_SHOP": json.dumps(account),
        "SWITCHBOARD_PUSH_TARGETS_PER_CHUNK": "2000",
        "SWITCHBOARD_PUSH_RETRY_DELAY_SECONDS": "1",
    }
    yield PushFakes(apns, fcm, env)
    apns.stop()
    fcm.stop()


@pytest.fixture(scope="session")
def app_env(
    local_services: dict[str, str],
    fake_braze,
    push_fakes: PushFakes,
    webhook_senders: WebhookSenders,
    tmp_path_factory: pytest.TempPathFactory,  # type: ignore[no-untyped-def]
) -> dict[str, str]:
    from core.currents.s3 import s3_client

    syncs = scenario_syncs(tmp_path_factory.mktemp("config") / "syncs.yaml")
    bucket = f"currents-{uuid.uuid4().hex[:10]}"
    s3_client(local_services["SWITCHBOARD_S3_ENDPOINT_URL"], "us-east-1").create_bucket(
        Bucket=bucket
    )
    return {
        **local_services,
        # Currents (tests/test_currents_e2e.py): small limits so that fan-out, quarantine
        # and a dead worker's claim show within a test; the timer fires only when told.
        "SWITCHBOARD_CURRENTS_BUCKET": bucket,
        "SWITCHBOARD_CURRENTS_PREFIX": "braze/currents",
        "SWITCHBOARD_CURRENTS_INLINE_FILES": "3",
        "SWITCHBOARD_CURRENTS_MAX_ATTEMPTS": "2",
        "SWITCHBOARD_CURRENTS_CLAIM_SECONDS": "5",
        "SWITCHBOARD_CURRENTS_SCHEDULE": "0 0 0 1 1 *",
        "SWITCHBOARD_ERASURE_WAIT_SECONDS": "1",
        "SWITCHBOARD_ERASURE_MAX_WAIT_SECONDS": "20",
        # The log export starts at this session's window, not at other tests' far windows.
        "SWITCHBOARD_EXPORT_START": datetime.now(UTC).strftime("%Y-%m-%dT%H:00:00+00:00"),
        "SWITCHBOARD_SYNCS_FILE": str(syncs),
        "SWITCHBOARD_BRAZE_REST_ENDPOINT": fake_braze.url,
        "SWITCHBOARD_BRAZE_API_KEY": fake_braze.state.api_key,
        **push_fakes.env,
        **webhook_senders.env,
    }


@pytest.fixture(scope="session")
def running_app(app_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    app = HostProcess(app_env, free_port(), tmp_path_factory.mktemp("devhost") / "log")
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()
    assert_no_personal_data(app.log_path)  # after every end-to-end test of the session


@pytest.fixture
def scenario(running_app, storage, fake_braze):  # type: ignore[no-untyped-def]
    def make(name: str) -> Scenario:
        return Scenario(running_app, storage, fake_braze, name)

    return make


@pytest.fixture(scope="module")
def own_bucket(app_env: dict[str, str]) -> str:
    """An S3 bucket of the test module's own (for a host whose Currents reads it alone)."""
    from core.currents.s3 import s3_client

    name = f"own-{uuid.uuid4().hex[:10]}"
    s3_client(app_env["SWITCHBOARD_S3_ENDPOINT_URL"], "us-east-1").create_bucket(Bucket=name)
    return name
