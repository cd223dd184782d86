"""The webhook providers Switchboard knows, listed by hand, and which ones are configured.

A provider is configured when its keys are set; one that is not answers 404 like an
unknown one (it is never accepted unsigned). A key setting that cannot be read (a public
key that is not one) stops the app at start, naming the setting.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from core.errors import ConfigError
from core.settings import Settings
from core.webhooks.hook import WebhookProvider
from core.webhooks.mailgun import Mailgun
from core.webhooks.sendgrid import SendGrid
from core.webhooks.ses import AmazonSes, Fetch, fetch_https
from core.webhooks.standard import StandardWebhooks
from core.webhooks.twilio import Twilio

Factory = Callable[[Settings, Fetch], WebhookProvider | None]


def _secret(value: object) -> str | None:
    reveal = getattr(value, "get_secret_value", None)
    return str(reveal()) if reveal is not None else None


def _standard(s: Settings, _: Fetch) -> WebhookProvider | None:
    secrets = _secret(s.webhook_standard_secrets)
    tolerance = timedelta(seconds=s.webhook_tolerance_seconds)
    return StandardWebhooks(secrets, tolerance) if secrets else None


def _sendgrid(s: Settings, _: Fetch) -> WebhookProvider | None:
    keys = s.webhook_sendgrid_public_keys
    return SendGrid(keys, timedelta(seconds=s.webhook_tolerance_seconds)) if keys else None


def _mailgun(s: Settings, _: Fetch) -> WebhookProvider | None:
    keys = _secret(s.webhook_mailgun_signing_keys)
    return Mailgun(keys, timedelta(seconds=s.webhook_tolerance_seconds)) if keys else None


def _twilio(s: Settings, _: Fetch) -> WebhookProvider | None:
    tokens = _secret(s.webhook_twilio_auth_tokens)
    if not tokens:
        return None
    if not s.webhook_twilio_url:
        raise ValueError("SWITCHBOARD_WEBHOOK_TWILIO_URL is not set (Twilio signs that URL)")
    return Twilio(tokens, s.webhook_twilio_url)


def _ses(s: Settings, fetch: Fetch) -> WebhookProvider | None:
    topics = s.webhook_sns_topic_arns
    if not topics:
        return None
    max_age = timedelta(seconds=s.webhook_sns_max_age_seconds)
    return AmazonSes(topics, max_age, s.webhook_sns_cert_url_pattern, fetch)


PROVIDERS: dict[str, tuple[str, Factory]] = {
    "standard": ("SWITCHBOARD_WEBHOOK_STANDARD_SECRETS", _standard),
    "sendgrid": ("SWITCHBOARD_WEBHOOK_SENDGRID_PUBLIC_KEYS", _sendgrid),
    "mailgun": ("SWITCHBOARD_WEBHOOK_MAILGUN_SIGNING_KEYS", _mailgun),
    "twilio": ("SWITCHBOARD_WEBHOOK_TWILIO_AUTH_TOKENS", _twilio),
    "ses": ("SWITCHBOARD_WEBHOOK_SNS_TOPIC_ARNS", _ses),
}
"""Route name -> (the setting that turns it on, how it is built)."""


def configured_providers(
    settings: Settings, fetch: Fetch = fetch_https
) -> dict[str, WebhookProvider]:
    """The providers whose keys are set. ConfigError naming the setting that is unusable."""
    found: dict[str, WebhookProvider] = {}
    for name, (setting, build) in PROVIDERS.items():
        try:
            provider = build(settings, fetch)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{setting}: {exc}") from None
        if provider is not None:
            found[name] = provider
    return found
