"""Provider webhooks through the local host: signed requests from each provider's sender
become events and suppression entries; forged, stale, replayed, oversized and malformed
requests are refused with a JSON error; a delivery that can no longer be read fails its run
and stays kept."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from core.events.store import EventStore
from core.runs import RunKind, RunLog, RunStatus, new_run_id
from core.services import Services
from core.settings import Settings
from core.suppression import Channel, Reason, SuppressionList
from core.webhooks.deliveries import (
    DELIVERY_QUEUE,
    WEBHOOKS_CONTAINER,
    DeliveryMessage,
    DeliveryRecord,
    blob_name,
    metadata_for,
    purge_processed,
)
from core.webhooks.hook import digest
from core.webhooks.processing import PendingDelivery, run_batches
from devhost.fakes.webhook_senders import (
    MailgunSender,
    SendGridSender,
    SnsSender,
    StandardSender,
    TwilioSender,
)
from tests.helpers import eventually

pytestmark = pytest.mark.integration


def post(app: Any, provider: str, made: tuple[dict[str, str], bytes]) -> requests.Response:
    headers, body = made
    return requests.post(f"{app.base_url}/api/webhooks/{provider}", headers=headers, data=body,
                         timeout=30)  # fmt: skip


def reasons(storage: Any, channel: Channel, address: str) -> list[Reason]:
    return SuppressionList(storage).reasons(channel, address)


def stored_events(storage: Any, provider: str) -> list[dict[str, Any]]:
    """Every stored event of a provider's webhooks (this session's)."""
    store, found = EventStore(storage), []
    for ref in storage.blobs.list("events", "segments/webhooks/"):
        entry = store.placed(
            ref.name.rsplit("/", 1)[1].removesuffix(".jsonl.gz").removesuffix(".kept")
        )
        if entry is not None:
            found += list(store.read_segment_stored(entry))
    return [e for e in found if e["source"] == f"webhook:{provider}"]


def test_a_sendgrid_bounce_becomes_an_event_and_a_suppression_once(  # type: ignore[no-untyped-def]
    running_app, storage, webhook_senders
) -> None:
    email = f"bounce-{uuid.uuid4().hex[:8]}@example.com"
    events = [SendGridSender.event("bounce", email, type="bounce", reason="550 5.1.1"),
              SendGridSender.event("delivered", f"other-{email}")]  # fmt: skip
    made = webhook_senders.sendgrid.request(events)
    first = post(running_app, "sendgrid", made)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "accepted"
    eventually(lambda: reasons(storage, Channel.EMAIL, email) == [Reason.HARD_BOUNCE], timeout=60)
    again = post(running_app, "sendgrid", made)  # SendGrid's retry of the same batch
    assert again.status_code == 200 and again.json()["status"] == "duplicate", again.text
    # Sent again in another batch (SendGrid may): the same sg_event_id is stored once.
    batch = webhook_senders.sendgrid.request([events[0]])
    assert post(running_app, "sendgrid", batch).json()["status"] == "accepted"
    key = digest("sendgrid", digest(batch[1]))

    def batched() -> DeliveryRecord | None:
        row = storage.tables.get(DeliveryRecord).get("sendgrid", key)
        return row.entity if row is not None and row.entity.status == "done" else None

    assert eventually(batched, timeout=60).counts["events"] == 1
    mine = f"sendgrid:{events[0]['sg_event_id']}"
    found = [e for e in stored_events(storage, "sendgrid") if e["event_id"] == mine]
    assert len(found) == 1 and found[0]["type"] == "bounced_hard"


def test_a_twilio_stop_suppresses_the_persons_number_not_the_brands(  # type: ignore[no-untyped-def]
    running_app, storage, webhook_senders
) -> None:
    person = f"+3161{uuid.uuid4().int % 10**7:07d}"
    answer = post(running_app, "twilio",
                  webhook_senders.twilio.request(TwilioSender.inbound(person, "STOP")))  # fmt: skip
    assert answer.status_code == 200, answer.text
    eventually(lambda: reasons(storage, Channel.PHONE, person) == [Reason.UNSUBSCRIBE], timeout=60)
    assert reasons(storage, Channel.PHONE, "+15005550006") == []  # the brand's number
    opted_out = f"+3162{uuid.uuid4().int % 10**7:07d}"
    callback = TwilioSender.status(opted_out, "failed", "21610")
    assert post(running_app, "twilio", webhook_senders.twilio.request(callback)).status_code == 200
    eventually(
        lambda: reasons(storage, Channel.PHONE, opted_out) == [Reason.UNSUBSCRIBE], timeout=60
    )


def test_mailgun_standard_and_ses_deliveries_reach_the_suppression_list(  # type: ignore[no-untyped-def]
    running_app, storage, webhook_senders
) -> None:
    tag = uuid.uuid4().hex[:8]
    complained, unsubscribed, bounced = (f"{k}-{tag}@example.com" for k in ("c", "u", "b"))
    mailgun = webhook_senders.mailgun
    made = mailgun.request(mailgun.event("complained", complained))
    assert post(running_app, "mailgun", made).status_code == 200
    standard = webhook_senders.standard
    event = StandardSender.event("email.unsubscribed", {"email": unsubscribed, "id": tag})
    assert post(running_app, "standard", standard.request(event)).status_code == 200
    sns = webhook_senders.sns
    answer = post(running_app, "ses", sns.request(sns.envelope(SnsSender.bounce([bounced]))))
    assert answer.status_code == 200, answer.text
    expected = {complained: Reason.SPAM_COMPLAINT, unsubscribed: Reason.UNSUBSCRIBE,
                bounced: Reason.HARD_BOUNCE}  # fmt: skip
    for address, reason in expected.items():
        eventually(
            lambda a=address, r=reason: reasons(storage, Channel.EMAIL, a) == [r], timeout=60
        )


def test_refusals_answer_with_a_json_error_and_keep_nothing(  # type: ignore[no-untyped-def]
    running_app, storage, webhook_senders
) -> None:
    email = f"refused-{uuid.uuid4().hex[:8]}@example.com"
    events = [SendGridSender.event("spamreport", email)]
    now = int(datetime.now(UTC).timestamp())
    cases = {
        "forged": (401, "sendgrid", SendGridSender().request(events)),
        "stale": (401, "sendgrid", webhook_senders.sendgrid.request(events, at=now - 3600)),
        "unsigned": (401, "standard", ({"content-type": "application/json"}, b"{}")),
        "malformed": (400, "sendgrid", webhook_senders.sendgrid.request(body=b"{oops")),
        "oversized": (413, "twilio", webhook_senders.twilio.request({"Body": "x" * 70_000})),
        "unknown": (404, "postmark", webhook_senders.sendgrid.request(events)),
    }
    for name, (status, provider, made) in cases.items():
        answer = post(running_app, provider, made)
        assert answer.status_code == status, (name, answer.text)
        error = answer.json()["error"]
        assert error["code"] and error["message"], name
        assert email not in answer.text
    # A Mailgun token is used once: the same signature over another body is a replay.
    mailgun = webhook_senders.mailgun
    token = uuid.uuid4().hex * 2
    first = mailgun.request(mailgun.event("delivered", f"x-{email}"), token=token)
    assert post(running_app, "mailgun", first).status_code == 200
    forged = mailgun.request(mailgun.event("unsubscribed", email), token=token)
    forged_body = forged[1].replace(forged[1][: forged[1].index(b'"event-data"')],
                                    first[1][: first[1].index(b'"event-data"')])  # fmt: skip
    replay = post(running_app, "mailgun", (forged[0], forged_body))
    assert replay.status_code == 401, replay.text
    assert post(running_app, "mailgun", first).json()["status"] == "duplicate"
    assert reasons(storage, Channel.EMAIL, email) == []


def test_an_sns_subscription_is_confirmed_on_the_certificates_host(  # type: ignore[no-untyped-def]
    running_app, webhook_senders
) -> None:
    sns = webhook_senders.sns
    before = len(sns.confirmations)
    answer = post(
        running_app, "ses", sns.request(sns.envelope("", kind="SubscriptionConfirmation"))
    )
    assert answer.status_code == 200 and answer.json()["confirmed"] is True, answer.text
    assert len(sns.confirmations) == before + 1


def test_a_kept_delivery_that_cannot_be_read_fails_its_run_and_stays(  # type: ignore[no-untyped-def]
    running_app, storage
) -> None:
    """As if a provider changed its format after the answer: the run fails at once, the
    delivery stays kept for a look, nothing is retried for nothing."""
    now = datetime.now(UTC)
    delivery_id = f"msg_{uuid.uuid4().hex}"
    key = digest("standard", delivery_id)
    blob = blob_name("standard", key)
    body = b'{"not": "what the provider sends"}'
    storage.blobs.create(WEBHOOKS_CONTAINER, blob, body,
                         metadata=metadata_for(delivery_id, now, "", {}, body))  # fmt: skip
    run_id = new_run_id(now, seed=f"webhook:{key}")
    storage.queues.send(DELIVERY_QUEUE, DeliveryMessage(provider="standard", digest=key,
                                                        blob=blob, run_id=run_id))  # fmt: skip
    run = eventually(
        lambda: (r := RunLog(storage).get(run_id)) is not None and r.status.ended and r,
        timeout=60,
    )
    assert run.kind == RunKind.WEBHOOK_DELIVERY and run.status == RunStatus.FAILED
    assert run.error_code == "malformed_delivery"
    assert storage.blobs.exists(WEBHOOKS_CONTAINER, blob)


def test_an_erasure_takes_kept_deliveries_and_their_events_but_keeps_the_stop(  # type: ignore[no-untyped-def]
    running_app, storage, webhook_senders
) -> None:
    person = f"+3163{uuid.uuid4().int % 10**7:07d}"
    made = webhook_senders.twilio.request(TwilioSender.inbound(person, "STOP"))
    assert post(running_app, "twilio", made).status_code == 200
    eventually(lambda: reasons(storage, Channel.PHONE, person) == [Reason.UNSUBSCRIBE], timeout=60)
    digits = person.removeprefix("+").encode()
    kept = [r.name for r in storage.blobs.list(WEBHOOKS_CONTAINER, "twilio/")
            if digits in storage.blobs.read_versioned(WEBHOOKS_CONTAINER, r.name)[0]]  # fmt: skip
    assert len(kept) == 1
    answer = requests.post(f"{running_app.base_url}/api/privacy/erasure",
                           json={"phones": [person]}, timeout=30)  # fmt: skip
    assert answer.status_code == 202, answer.text
    run_id = answer.json()["run_id"]
    done = eventually(
        lambda: (r := RunLog(storage).get(run_id)) is not None and r.status.ended and r,
        timeout=120,
    )
    assert done.status == RunStatus.SUCCEEDED, done.detail
    assert not storage.blobs.exists(WEBHOOKS_CONTAINER, kept[0])
    assert all(e.get("phone") != person for e in stored_events(storage, "twilio"))
    assert reasons(storage, Channel.PHONE, person) == [Reason.UNSUBSCRIBE]  # still never texted


def test_processed_deliveries_go_after_the_retention_and_unprocessed_ones_stay(  # type: ignore[no-untyped-def]
    running_app, storage, webhook_senders
) -> None:
    email = f"kept-{uuid.uuid4().hex[:8]}@example.com"
    batch = webhook_senders.sendgrid.request([SendGridSender.event("delivered", email)])
    assert post(running_app, "sendgrid", batch).status_code == 200
    key = digest("sendgrid", digest(batch[1]))
    table = storage.tables.get(DeliveryRecord)
    eventually(lambda: (r := table.get("sendgrid", key)) and r.entity.status == "done", timeout=60)
    waiting = blob_name("standard", digest("standard", uuid.uuid4().hex))
    storage.blobs.create(WEBHOOKS_CONTAINER, waiting, b"{}")  # kept, never processed
    later = datetime.now(UTC) + timedelta(days=31)
    assert purge_processed(storage, retention_days=30, now=later) >= 1
    assert table.get("sendgrid", key) is None
    assert not storage.blobs.exists(WEBHOOKS_CONTAINER, blob_name("sendgrid", key))
    assert storage.blobs.exists(WEBHOOKS_CONTAINER, waiting)
    storage.blobs.delete(WEBHOOKS_CONTAINER, waiting)


def test_a_batch_that_crashed_is_finished_under_its_own_id(  # type: ignore[no-untyped-def]
    running_app, storage, local_services
) -> None:
    """Rows marked with a batch id whose segment never became visible (the batcher died):
    the next batcher (the host's, or this one) stores that batch, under that id, once."""
    batch_id = f"20261207T000000-{uuid.uuid4().hex[:8]}"
    pending = storage.tables.get(PendingDelivery)
    rows = []
    for n in range(3):
        event = {"event_id": f"standard:crashed-{batch_id}-{n}", "source": "webhook:standard",
                 "source_type": "email.delivered", "type": "delivered", "channel": "email",
                 "occurred_at": int(datetime.now(UTC).timestamp() * 1000)}  # fmt: skip
        key = digest("standard", f"crashed-{batch_id}-{n}")
        rows.append(PendingDelivery(
            partition_key="pending", row_key=f"standard:{key}", provider="standard",
            digest=key, blob=blob_name("standard", key), batch=batch_id,
            events=json.dumps(event) + "\n", counts={"events": 1},
        ))  # fmt: skip
    pending.write_batch(rows)
    run_batches(Services.from_settings(Settings(**local_services)), {})  # type: ignore[arg-type]
    ledger = storage.tables.get(DeliveryRecord)

    def finished() -> bool:
        found = [ledger.get("standard", r.digest) for r in rows]
        return all(f is not None and f.entity.batch == batch_id for f in found)

    eventually(finished, timeout=60)
    stored = [e["event_id"] for e in stored_events(storage, "standard")]
    for n in range(3):
        assert stored.count(f"standard:crashed-{batch_id}-{n}") == 1
    assert all(pending.get("pending", r.row_key) is None for r in rows)


def _requests_of(senders: Any) -> dict[str, dict[str, Any]]:
    """Per provider, built fresh: a valid request from the current key and from the other
    configured one, a forged, a stale and a malformed one (None: not applicable)."""
    tag = uuid.uuid4().hex[:8]
    email = f"each-{tag}@example.com"
    stale_at = int(datetime.now(UTC).timestamp()) - 3600
    standard_event = StandardSender.event("email.delivered", {"email": email, "id": tag})
    sendgrid_events = [SendGridSender.event("delivered", email)]
    mailgun_event = MailgunSender.event("delivered", email)
    twilio_params = TwilioSender.status("+31611112222", "delivered")
    sns = senders.sns
    bounce = SnsSender.bounce([email])
    forged_sns = SnsSender().envelope(bounce)
    forged_sns["SigningCertURL"] = sns.cert_url
    old = senders.retired
    return {
        "standard": {
            "valid": senders.standard.request(standard_event),
            "other_key": old["standard"].request(standard_event),
            "forged": StandardSender().request(standard_event),
            "stale": senders.standard.request(standard_event, at=stale_at),
            "malformed": senders.standard.request({}, body=b"[not json"),
        },
        "sendgrid": {
            "valid": senders.sendgrid.request(sendgrid_events),
            "other_key": old["sendgrid"].request(sendgrid_events),
            "forged": SendGridSender().request(sendgrid_events),
            "stale": senders.sendgrid.request(sendgrid_events, at=stale_at),
            "malformed": senders.sendgrid.request(body=b'{"an": "object"}'),
        },
        "mailgun": {
            "valid": senders.mailgun.request(mailgun_event),
            "other_key": old["mailgun"].request(mailgun_event),
            "forged": MailgunSender().request(mailgun_event),
            "stale": senders.mailgun.request(mailgun_event, at=stale_at),
            "malformed": senders.mailgun.request({}, body=b"signature=1"),
        },
        "twilio": {
            "valid": senders.twilio.request(twilio_params),
            "other_key": old["twilio"].request(twilio_params),
            "forged": TwilioSender(senders.twilio.url).request(twilio_params),
            "stale": None,  # Twilio signs no time
            "malformed": senders.twilio.request({"AccountSid": "AC1"}),
        },
        "ses": {
            "valid": sns.request(sns.envelope(bounce)),
            "other_key": sns.request(sns.envelope(bounce, version="1")),
            "forged": sns.request(forged_sns),
            "stale": sns.request(sns.envelope(bounce, at=datetime.now(UTC) - timedelta(hours=3))),
            "malformed": sns.request(sns.envelope("not an SES notification")),
        },
    }


@pytest.mark.parametrize("provider", ["standard", "sendgrid", "mailgun", "twilio", "ses"])
def test_each_provider_through_the_host(  # type: ignore[no-untyped-def]
    running_app, webhook_senders, provider
) -> None:
    """Valid (with either key of a rotation), sent again (a duplicate), forged, stale,
    malformed and oversized requests of one provider, as its own sender makes them."""
    made = _requests_of(webhook_senders)[provider]
    first = post(running_app, provider, made["valid"])
    assert first.status_code == 200 and first.json()["status"] == "accepted", first.text
    again = post(running_app, provider, made["valid"])
    assert again.status_code == 200 and again.json()["status"] == "duplicate", again.text
    rotated = post(running_app, provider, made["other_key"])
    assert rotated.status_code == 200, rotated.text
    expected = {"forged": (401, "bad_signature"), "stale": (401, "stale_timestamp"),
                "malformed": (400, "malformed_body")}  # fmt: skip
    for name, (status, code) in expected.items():
        if made[name] is None:
            continue
        answer = post(running_app, provider, made[name])
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), name
    headers, _ = made["valid"]
    huge = post(running_app, provider, (headers, b"{" + b" " * (4 << 20) + b"}"))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
