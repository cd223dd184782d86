"""The contract every webhook provider module passes (core/webhooks/hook.py), with requests
signed for real by devhost/fakes/webhook_senders.py: valid, forged, tampered, stale,
rotated keys, malformed and random input; and what each one's events mean."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.events.effects import suppression_change
from core.events.model import EngagementEvent, EventType
from core.suppression import Channel, Reason
from core.webhooks.hook import (
    Forged,
    InboundRequest,
    Malformed,
    Refused,
    Stale,
    StoredDelivery,
    Verified,
    WebhookProvider,
)
from core.webhooks.mailgun import Mailgun
from core.webhooks.sendgrid import SendGrid
from core.webhooks.ses import AmazonSes
from core.webhooks.standard import StandardWebhooks
from core.webhooks.twilio import Twilio
from devhost.fakes.webhook_senders import (
    MailgunSender,
    SendGridSender,
    SnsSender,
    StandardSender,
    TwilioSender,
)

TOLERANCE = timedelta(minutes=5)
TWILIO_URL = "https://hooks.example.com/api/webhooks/twilio"
Request = tuple[dict[str, str], bytes]


@dataclass
class Case:
    """One provider: built with two keys (a rotation), and requests from either."""

    name: str
    provider: WebhookProvider
    valid: Callable[[], Request]
    """Signed with the new key: an e-mail hard bounce for a@x.test, or an SMS opt-out."""
    by_old_key: Callable[[], Request]
    forged: Callable[[], Request]
    stale: Callable[[], Request] | None
    malformed: Callable[[], Request]
    suppressed: tuple[Channel, str, Reason]


def _standard() -> Case:
    old, new, other = StandardSender(), StandardSender(), StandardSender()
    bounce = StandardSender.event("email.bounced_hard", {"id": "e1", "email": "A@x.test"})
    return Case(
        "standard", StandardWebhooks(f"{old.secret} {new.secret}", TOLERANCE),
        lambda: new.request(bounce), lambda: old.request(bounce), lambda: other.request(bounce),
        lambda: new.request(bounce, at=int(datetime.now(UTC).timestamp()) - 3600),
        lambda: new.request({}, body=b"not json"),
        (Channel.EMAIL, "a@x.test", Reason.HARD_BOUNCE),
    )  # fmt: skip


def _sendgrid() -> Case:
    old, new, other = SendGridSender(), SendGridSender(), SendGridSender()
    events = [SendGridSender.event("bounce", "a@x.test", type="bounce", reason="550 no such user"),
              SendGridSender.event("open", "b@x.test")]  # fmt: skip
    return Case(
        "sendgrid", SendGrid(f"{old.public_key} {new.public_key}", TOLERANCE),
        lambda: new.request(events), lambda: old.request(events), lambda: other.request(events),
        lambda: new.request(events, at=int(datetime.now(UTC).timestamp()) - 3600),
        lambda: new.request(body=b'{"not": "an array"}'),
        (Channel.EMAIL, "a@x.test", Reason.HARD_BOUNCE),
    )  # fmt: skip


def _mailgun() -> Case:
    old, new, other = MailgunSender(), MailgunSender(), MailgunSender()
    failed = MailgunSender.event("failed", "a@x.test", severity="permanent", reason="bounce")
    return Case(
        "mailgun", Mailgun(f"{old.key} {new.key}", TOLERANCE),
        lambda: new.request(failed), lambda: old.request(failed), lambda: other.request(failed),
        lambda: new.request(failed, at=int(datetime.now(UTC).timestamp()) - 3600),
        lambda: new.request({}, body=b"[1, 2"),
        (Channel.EMAIL, "a@x.test", Reason.HARD_BOUNCE),
    )  # fmt: skip


def _twilio() -> Case:
    old, new = TwilioSender(TWILIO_URL), TwilioSender(TWILIO_URL)
    other = TwilioSender(TWILIO_URL)
    stop = TwilioSender.status("+31612345678", "failed", "21610", sid="SM" + "1" * 32)
    return Case(
        "twilio", Twilio(f"{old.token} {new.token}", TWILIO_URL),
        lambda: new.request(stop), lambda: old.request(stop), lambda: other.request(stop), None,
        lambda: new.request({"AccountSid": "AC1"}),  # no MessageSid
        (Channel.PHONE, "+31612345678", Reason.UNSUBSCRIBE),
    )  # fmt: skip


def _ses() -> Case:
    sender, other = SnsSender(), SnsSender()

    def fetch(url: str) -> bytes:
        if url != sender.cert_url:
            raise OSError("404")  # as the production fetch says it
        return sender._server.pem

    provider = AmazonSes(sender.topic_arn, timedelta(hours=1), SnsSender.CERT_URL_PATTERN, fetch)
    bounce = SnsSender.bounce(["A@x.test"])
    forged = other.envelope(bounce)
    forged["SigningCertURL"] = sender.cert_url  # their signature, our certificate
    return Case(
        "ses", provider, lambda: sender.request(sender.envelope(bounce)),
        lambda: sender.request(sender.envelope(bounce, version="1")),
        lambda: other.request(forged),
        lambda: sender.request(sender.envelope(bounce, at=datetime.now(UTC) - timedelta(hours=2))),
        lambda: sender.request(sender.envelope("not an SES notification")),
        (Channel.EMAIL, "a@x.test", Reason.HARD_BOUNCE),
    )  # fmt: skip


CASES = {"standard": _standard, "sendgrid": _sendgrid, "mailgun": _mailgun, "twilio": _twilio,
         "ses": _ses}  # fmt: skip


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]()


def inbound(case: Case, made: Request, url: str | None = None) -> InboundRequest:
    headers, body = made
    return InboundRequest(
        "POST", url or TWILIO_URL, {k.lower(): v for k, v in headers.items()}, body
    )


def stored(case: Case, request: InboundRequest, verified: Verified) -> StoredDelivery:
    return StoredDelivery(case.name, verified.delivery_id, datetime.now(UTC), request.url,
                          dict(request.headers), request.body)  # fmt: skip


def test_a_signed_delivery_verifies_and_reads_as_canonical_events(case: Case) -> None:
    request = inbound(case, case.valid())
    verified = case.provider.verify(request, datetime.now(UTC))
    assert verified.delivery_id and verified.reply is None
    parsed = case.provider.events(stored(case, request, verified))
    assert parsed.events and not parsed.invalid
    for event in parsed.events:
        model = EngagementEvent.model_validate(event)
        assert model.source == f"webhook:{case.name}"
        assert model.event_id.startswith(f"{case.name}:")
    changes = [c for e in parsed.events if (c := suppression_change(e)) is not None]
    assert [(c.channel, c.address, c.reason, c.active) for c in changes] == [
        (*case.suppressed, True)
    ]
    again = case.provider.verify(request, datetime.now(UTC))
    assert again.delivery_id == verified.delivery_id  # the idempotency key is stable


def test_either_key_of_a_rotation_verifies(case: Case) -> None:
    assert case.provider.verify(inbound(case, case.by_old_key()), datetime.now(UTC)).delivery_id


def test_another_key_is_a_forgery(case: Case) -> None:
    with pytest.raises(Forged):
        case.provider.verify(inbound(case, case.forged()), datetime.now(UTC))


def test_changed_bytes_are_a_forgery_or_a_replay_of_the_same_id(case: Case) -> None:
    headers, body = case.valid()
    original = case.provider.verify(inbound(case, (headers, body)), datetime.now(UTC))
    tampered = body.replace(b"a@x.test", b"z@x.test").replace(b"A@x.test", b"Z@x.test")
    tampered = tampered.replace(b"%2B31612345678", b"%2B31612345679")
    assert tampered != body
    try:
        verified = case.provider.verify(inbound(case, (headers, tampered)), datetime.now(UTC))
    except Forged:
        return
    # Only a provider whose body is not signed gets here: then the id is a one-time token,
    # and the receiving side refuses the same id with other bytes.
    assert verified.replay_guarded and verified.delivery_id == original.delivery_id


def test_a_stale_request_is_refused(case: Case) -> None:
    if case.stale is None:
        pytest.skip(f"{case.name} signs no time (deliveries are deduplicated instead)")
    with pytest.raises(Stale):
        case.provider.verify(inbound(case, case.stale()), datetime.now(UTC))


def test_a_signed_body_that_is_not_the_providers_format_is_malformed(case: Case) -> None:
    request = inbound(case, case.malformed())
    with pytest.raises(Malformed):
        verified = case.provider.verify(request, datetime.now(UTC))
        case.provider.events(stored(case, request, verified))


def test_random_requests_are_refused_never_crash(case: Case) -> None:
    """Headers and bodies mangled at random: a Refused, never another exception."""
    rng = random.Random(case.name)
    headers, body = case.valid()
    for _ in range(300):
        mangled_headers = {k: v for k, v in headers.items() if rng.random() > 0.2}
        for key in list(mangled_headers):
            if rng.random() < 0.3:
                value = bytearray(mangled_headers[key].encode())
                if value:
                    value[rng.randrange(len(value))] = rng.randrange(32, 127)
                mangled_headers[key] = value.decode("latin-1")
        data = bytearray(body)
        for _ in range(rng.randrange(4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        request = inbound(case, (mangled_headers, bytes(data)))
        try:
            verified = case.provider.verify(request, datetime.now(UTC))
            case.provider.events(stored(case, request, verified))
        except (Refused, OSError):  # OSError: a certificate that is not there (retry status)
            continue


def test_sendgrid_events_map_as_documented() -> None:
    sender = SendGridSender()
    provider = SendGrid(sender.public_key, TOLERANCE)
    kinds = {"processed": EventType.SENT, "dropped": EventType.REJECTED,
             "delivered": EventType.DELIVERED, "deferred": EventType.DEFERRED,
             "open": EventType.OPENED, "click": EventType.CLICKED,
             "spamreport": EventType.SPAM_COMPLAINT, "unsubscribe": EventType.UNSUBSCRIBED,
             "group_unsubscribe": EventType.SUBSCRIPTION_GROUP_CHANGED}  # fmt: skip
    events = [SendGridSender.event(k, f"{k}@x.test") for k in kinds]
    events.append(SendGridSender.event("bounce", "blocked@x.test", type="blocked"))
    events.append({"event": "open"})  # no id, no time: counted, not stored
    request = inbound(Case("sendgrid", provider, *[None] * 6), sender.request(events))  # type: ignore[arg-type]
    verified = provider.verify(request, datetime.now(UTC))
    parsed = provider.events(StoredDelivery("sendgrid", verified.delivery_id, datetime.now(UTC),
                                            "", {}, request.body))  # fmt: skip
    found = {e["email"]: e["type"] for e in parsed.events}
    assert found == {**{f"{k}@x.test": v.value for k, v in kinds.items()},
                     "blocked@x.test": EventType.BOUNCED_SOFT.value}  # fmt: skip
    assert sum(parsed.invalid.values()) == 1
    reasons = {c.reason for e in parsed.events if (c := suppression_change(e))}
    assert reasons == {Reason.SPAM_COMPLAINT, Reason.UNSUBSCRIBE}  # a block is not a bounce


def test_twilio_codes_and_keywords_map_as_documented() -> None:
    sender = TwilioSender(TWILIO_URL)
    provider = Twilio(sender.token, TWILIO_URL)

    def event(params: dict[str, str]) -> dict[str, Any]:
        request = inbound(Case("twilio", provider, *[None] * 6), sender.request(params))  # type: ignore[arg-type]
        verified = provider.verify(request, datetime.now(UTC))
        delivery = StoredDelivery("twilio", verified.delivery_id, datetime.now(UTC), TWILIO_URL,
                                  {}, request.body)  # fmt: skip
        return provider.events(delivery).events[0]

    person = "+31612345678"
    assert event(TwilioSender.status(person, "delivered"))["type"] == "delivered"
    assert event(TwilioSender.status(person, "undelivered", "30003"))["type"] == "delivery_failed"
    assert event(TwilioSender.status(person, "failed", "30006"))["type"] == "rejected"
    whatsapp = event(TwilioSender.status(f"whatsapp:{person}", "read"))
    assert (whatsapp["channel"], whatsapp["phone"]) == ("whatsapp", person)
    for params, active in ((TwilioSender.inbound(person, " stop "), True),
                           (TwilioSender.inbound(person, "Stop please", "STOP"), True),
                           (TwilioSender.inbound(person, "START"), False)):  # fmt: skip
        change = suppression_change(event(params))
        assert change is not None and (change.address, change.active) == (person, active)
    assert suppression_change(event(TwilioSender.inbound(person, "stop by the shop"))) is None
    # The brand's own number is never the one suppressed.
    assert event(TwilioSender.inbound(person, "STOP"))["phone"] == person


def test_twilio_signs_the_configured_url_not_the_one_the_app_sees() -> None:
    sender = TwilioSender(TWILIO_URL)
    provider = Twilio(sender.token, TWILIO_URL)
    made = sender.request(TwilioSender.status("+31612345678", "sent"))
    internal = inbound(
        Case("twilio", provider, *[None] * 6), made, "http://10.0.0.4:7071/api/webhooks/twilio"
    )  # type: ignore[arg-type]
    assert provider.verify(internal, datetime.now(UTC)).delivery_id
    with_port = TwilioSender("https://hooks.example.com:443/api/webhooks/twilio", sender.token)
    made = with_port.request(TwilioSender.status("+31612345678", "sent"))
    assert provider.verify(inbound(Case("twilio", provider, *[None] * 6), made), datetime.now(UTC))  # type: ignore[arg-type]
    elsewhere = TwilioSender("https://evil.example.com/api/webhooks/twilio", sender.token)
    with pytest.raises(Forged):
        made = elsewhere.request(TwilioSender.status("+31612345678", "sent"))
        provider.verify(inbound(Case("twilio", provider, *[None] * 6), made), datetime.now(UTC))  # type: ignore[arg-type]


def test_sns_certificate_urls_are_checked_before_anything_is_fetched() -> None:
    sender = SnsSender()
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return sender._server.pem

    provider = AmazonSes(sender.topic_arn, timedelta(hours=1),
                         r"https://sns\.[a-zA-Z0-9\-]{3,}\.amazonaws\.com(\.cn)?/[^?#]+\.pem",
                         fetch)  # fmt: skip
    for url in ("http://sns.eu-west-1.amazonaws.com/cert.pem",
                "https://sns.eu-west-1.amazonaws.com.evil.test/cert.pem",
                "https://s3.amazonaws.com/attacker/cert.pem",
                "https://169.254.169.254/latest/meta-data.pem"):  # fmt: skip
        envelope = sender.envelope(SnsSender.bounce(["a@x.test"]))
        envelope["SigningCertURL"] = url
        with pytest.raises(Forged):
            provider.verify(InboundRequest("POST", "", {}, sender.request(envelope)[1]),
                            datetime.now(UTC))  # fmt: skip
    assert fetched == []
    wrong_topic = SnsSender("arn:aws:sns:eu-west-1:999999999999:other")
    with pytest.raises(Forged):
        body = wrong_topic.request(wrong_topic.envelope(SnsSender.bounce(["a@x.test"])))[1]
        provider.verify(InboundRequest("POST", "", {}, body), datetime.now(UTC))
