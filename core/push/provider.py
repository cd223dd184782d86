"""What a dispatch needs from a push provider, whichever platform it serves.

One provider per app and dispatch: it knows the message template's platform options,
turns a rendered message into its wire payload (checking the 4 KB limit), sends one
payload to one device, and says what came of it. ApnsProvider (core/push/apns.py) and
FcmProvider (core/push/fcm.py) implement it; tests/test_push_providers.py is the contract
both pass.
"""

from __future__ import annotations

import ssl
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import requests

from core.errors import ConfigError
from core.push.h2client import H2Client
from core.push.outcome import SendOutcome
from core.push.templates import PushTemplate, RenderedMessage

if TYPE_CHECKING:
    from core.push.apps import PushApp
    from core.push.tokens import Device
    from core.settings import Settings


class PushProvider(ABC):
    platform: str

    @abstractmethod
    async def validate(self) -> None:
        """Prove the credentials work (key parses and signs, OAuth token obtained), or
        raise ConfigError: a bad credential stops this app before its first message."""

    @abstractmethod
    def encode(self, message: RenderedMessage, device: Device) -> bytes:
        """The request body for one device; ProfileSkipped("payload_too_large") over 4 KB."""

    @abstractmethod
    async def send(self, device: Device, body: bytes) -> SendOutcome:
        """One push. Raises ConfigError (the app's setup is wrong) or TransientError
        (still failing after the bounded retries); every other answer is a SendOutcome."""

    @abstractmethod
    async def aclose(self) -> None: ...


def provider_for(app: PushApp, template: PushTemplate, settings: Settings) -> PushProvider:
    """The provider for `app`, with credentials from the settings its declaration names."""
    from core.push.apns import ApnsProvider, ProviderToken
    from core.push.fcm import FcmCredentials, FcmProvider

    context = ssl.create_default_context(cafile=settings.push_ca_file)
    if app.apns is not None:
        key = settings.named_secret(app.apns.key_setting)
        if key is None:
            raise ConfigError(f"push app {app.id}: setting {app.apns.key_setting} is not set")
        token = ProviderToken(app.apns.team_id, app.apns.key_id, key)
        client = _client(app, settings.apns_endpoint or ApnsProvider.origin_for(app), context,
                         settings)  # fmt: skip
        return ApnsProvider(app.apns.bundle_id, token, template, client=client)
    assert app.fcm is not None
    account = settings.named_secret(app.fcm.service_account_setting)
    if account is None:
        raise ConfigError(
            f"push app {app.id}: setting {app.fcm.service_account_setting} is not set"
        )
    session = requests.Session()
    if settings.push_ca_file:
        # requests prefers REQUESTS_CA_BUNDLE from the environment over session.verify.
        session.verify, session.trust_env = settings.push_ca_file, False
    credentials = FcmCredentials.from_json(account, session)
    client = _client(app, settings.fcm_endpoint, context, settings)
    return FcmProvider(app.fcm.project_id, credentials, template, client=client)


def _client(app: PushApp, origin: str, context: ssl.SSLContext, settings: Settings) -> H2Client:
    try:
        return H2Client(origin, ssl_context=context, max_connections=settings.push_connections)
    except ValueError as exc:
        raise ConfigError(f"push app {app.id}: {exc}") from None
