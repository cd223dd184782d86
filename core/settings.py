"""The one place that reads the environment.

Past 500 lines by design: every setting is one field here (the only reader of the
environment; the README's settings table is checked against it).

Every app setting Switchboard understands is a field here, named exactly as it appears in
the Azure portal, `local.settings.json` and `local.settings.example.json`. `load_settings()`
validates all of them at once and raises `ConfigError` naming each bad setting and what it
expects; values are never echoed, because some of them are secrets.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Literal

from pydantic import (
    AwareDatetime,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError
from core.export.aep import AepStreamingTarget
from core.schedule import CronSchedule
from core.storage.connection import StorageAccount, parse_connection_string
from core.sync.readers import InputLimits


class Settings(BaseSettings):
    """Typed view of the app settings (environment variables)."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True)

    storage_connection: str | None = Field(
        default=None,
        validation_alias="AzureWebJobsStorage",
        description="Storage connection string, or UseDevelopmentStorage=true for Azurite.",
    )
    storage_account_name: str | None = Field(
        default=None,
        validation_alias="AzureWebJobsStorage__accountName",
        description="Identity-based connection: storage account name (managed identity).",
    )
    storage_client_id: str | None = Field(
        default=None,
        validation_alias="AzureWebJobsStorage__clientId",
        description="Identity-based connection: client id of a user-assigned identity.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO",
        validation_alias="SWITCHBOARD_LOG_LEVEL",
        description="Level for Switchboard's own loggers.",
    )
    segments_trigger_source: Literal["LogsAndContainerScan", "EventGrid"] = Field(
        default="LogsAndContainerScan",
        validation_alias="SWITCHBOARD_SEGMENTS_TRIGGER_SOURCE",
        description="How the segment blob trigger learns of new files (Flex needs EventGrid).",
    )
    log_export_schedule: str = Field(
        default="0 0 */4 * * *",
        validation_alias="SWITCHBOARD_LOG_EXPORT_SCHEDULE",
        description="NCRONTAB schedule of the CDP log export timer (six fields, UTC).",
    )
    currents_schedule: str = Field(
        default="0 */5 * * * *",
        validation_alias="SWITCHBOARD_CURRENTS_SCHEDULE",
        description="NCRONTAB schedule of the Braze Currents S3 discovery timer.",
    )
    syncs_file: str = Field(
        default="config/syncs.yaml",
        validation_alias="SWITCHBOARD_SYNCS_FILE",
        description="Sync definitions document (YAML/JSON), relative to the app root.",
    )
    braze_rest_endpoint: str | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_BRAZE_REST_ENDPOINT",
        description="Braze REST endpoint, e.g. https://rest.fra-01.braze.eu.",
    )
    braze_api_key: SecretStr | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_BRAZE_API_KEY",
        description="Braze REST API key with the users.track permission (a secret).",
    )
    campaign_drop_connection: SecretStr | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_CAMPAIGN_DROP_CONNECTION",
        description=(
            "Azure Storage connection string of the account Adobe Campaign's import "
            "workflows read (its external account); unset means this app's own storage "
            "account (a secret)."
        ),
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_S3_ENDPOINT_URL",
        description="S3 endpoint for S3-compatible stores and local runs; unset means AWS.",
    )
    s3_region: str = Field(
        default="us-east-1",
        validation_alias="SWITCHBOARD_S3_REGION",
        description="AWS region of the Currents bucket.",
    )
    currents_bucket: str | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_CURRENTS_BUCKET",
        description="S3 bucket Braze Currents writes to; unset turns Currents ingestion off.",
    )
    currents_prefix: str = Field(
        default="",
        validation_alias="SWITCHBOARD_CURRENTS_PREFIX",
        description="Key prefix of the Currents connector inside the bucket (may be empty).",
    )
    currents_lookback_hours: int = Field(
        default=72,
        ge=1,
        le=24 * 30,
        validation_alias="SWITCHBOARD_CURRENTS_LOOKBACK_HOURS",
        description="How long a `date=` hour folder keeps being rescanned for late files.",
    )
    currents_inline_files: int = Field(
        default=4,
        ge=0,
        le=1000,
        validation_alias="SWITCHBOARD_CURRENTS_INLINE_FILES",
        description="New files up to this many are ingested by the timer itself; more fan out.",
    )
    currents_claim_seconds: int = Field(
        default=900,
        ge=5,
        le=24 * 3600,
        validation_alias="SWITCHBOARD_CURRENTS_CLAIM_SECONDS",
        description="How long a worker owns a file it started; set above the function timeout.",
    )
    currents_max_attempts: int = Field(
        default=3,
        ge=1,
        le=20,
        validation_alias="SWITCHBOARD_CURRENTS_MAX_ATTEMPTS",
        description="Failed reads of one file before it stays in quarantine.",
    )

    @field_validator("storage_connection")
    @classmethod
    def _connection_parses(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            parse_connection_string(value)
        except ConfigError as exc:  # pydantic only collects ValueErrors
            raise ValueError(str(exc)) from None
        return value

    export_container: str = Field(
        default="cdp-exports",
        pattern=r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$",
        validation_alias="SWITCHBOARD_EXPORT_CONTAINER",
        description="Blob container the log export writes to (the CDP's landing zone).",
    )
    export_profile_namespace: str = Field(
        default="crmId",
        min_length=1,
        max_length=64,
        validation_alias="SWITCHBOARD_EXPORT_PROFILE_NAMESPACE",
        description="identityMap namespace of the CDP's profile id (the events' external_id).",
    )
    xdm_tenant: str = Field(
        default="switchboard",
        pattern=r"^[A-Za-z0-9_]{1,64}$",
        validation_alias="SWITCHBOARD_XDM_TENANT",
        description="XDM tenant id: Switchboard's own fields go under `_<tenant>`.",
    )
    export_start: AwareDatetime | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_EXPORT_START",
        description="First window to export (ISO time); unset: the oldest stored event's.",
    )
    export_target: Literal["blob", "aep_streaming"] = Field(
        default="blob",
        validation_alias="SWITCHBOARD_EXPORT_TARGET",
        description="Where exported records go: files in the export container, or AEP streaming.",
    )
    aep_streaming: AepStreamingTarget | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_AEP_STREAMING",
        description="JSON: the AEP HTTP API inlet, org, and schema and dataset per log.",
    )
    aep_access_token: SecretStr | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_AEP_ACCESS_TOKEN",
        description="Bearer token for an authenticated AEP inlet (a secret).",
    )
    aep_api_key: SecretStr | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_AEP_API_KEY",
        description="x-api-key for an authenticated AEP inlet.",
    )
    export_preferences: bool = Field(
        default=False,
        validation_alias="SWITCHBOARD_EXPORT_PREFERENCES",
        description="Also export profile preferences (consent per channel) per window.",
    )
    export_native_records: bool = Field(
        default=True,
        validation_alias="SWITCHBOARD_EXPORT_NATIVE_RECORDS",
        description="Write broadLog/trackingLog records with the C speedups when built "
        "(false: the Python reference, same bytes, several times slower).",
    )
    sync_native_buckets: bool = Field(
        default=True,
        validation_alias="SWITCHBOARD_SYNC_NATIVE_BUCKETS",
        description="Process segment sync buckets with the C speedups (false: the Python "
        "reference, the same requests and state, several times slower).",
    )
    export_lease_seconds: int = Field(
        default=900,
        ge=5,
        le=24 * 3600,
        validation_alias="SWITCHBOARD_EXPORT_LEASE_SECONDS",
        description="How long an export run owns the watermark without progress.",
    )
    quarantine_soft_threshold: int = Field(
        default=5,
        ge=1,
        le=100,
        validation_alias="SWITCHBOARD_QUARANTINE_SOFT_THRESHOLD",
        description="Counted soft errors that put an address in quarantine.",
    )
    apns_endpoint: str | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_APNS_ENDPOINT",
        description="APNs origin for every app, e.g. https://api.push.apple.com:2197 "
        "(default: production or sandbox host by each app's environment).",
    )
    fcm_endpoint: str = Field(
        default="https://fcm.googleapis.com",
        validation_alias="SWITCHBOARD_FCM_ENDPOINT",
        description="FCM HTTP v1 origin.",
    )
    push_ca_file: str | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_PUSH_CA_FILE",
        description="PEM bundle to trust for APNs, FCM and the OAuth token endpoint instead "
        "of the system's (a TLS-inspecting proxy, or the local fakes).",
    )
    push_concurrency: int = Field(
        default=200,
        ge=1,
        le=5000,
        validation_alias="SWITCHBOARD_PUSH_CONCURRENCY",
        description="Pushes in flight at once per worker and app.",
    )
    push_connections: int = Field(
        default=4,
        ge=1,
        le=64,
        validation_alias="SWITCHBOARD_PUSH_CONNECTIONS",
        description="HTTP/2 connections per worker and app.",
    )
    push_claim_seconds: int = Field(
        default=300,
        ge=5,
        le=3600,
        validation_alias="SWITCHBOARD_PUSH_CLAIM_SECONDS",
        description="How long a dispatch chunk's worker owns it between checkpoints.",
    )
    push_retry_delay_seconds: int = Field(
        default=60,
        ge=1,
        le=3600,
        validation_alias="SWITCHBOARD_PUSH_RETRY_DELAY_SECONDS",
        description="Delay before pushes a provider would not take are tried again "
        "(doubled each round, three rounds).",
    )
    push_targets_per_chunk: int = Field(
        default=1000,
        ge=1,
        le=50_000,
        validation_alias="SWITCHBOARD_PUSH_TARGETS_PER_CHUNK",
        description="Profiles per queue message when a dispatch fans out.",
    )

    max_line_bytes: int = Field(
        default=4 << 20,
        ge=1024,
        le=256 << 20,
        validation_alias="SWITCHBOARD_MAX_LINE_BYTES",
        description="A segment file with a longer record (its bytes, line breaks included) "
        "is rejected as a whole (line_too_long).",
    )
    max_field_bytes: int = Field(
        default=1 << 20,
        ge=256,
        le=64 << 20,
        validation_alias="SWITCHBOARD_MAX_FIELD_BYTES",
        description="A CSV/TSV segment file with a longer field is rejected as a whole "
        "(field_too_long).",
    )
    run_deadline_minutes: int = Field(
        default=360,
        ge=15,
        le=10080,
        validation_alias="SWITCHBOARD_RUN_DEADLINE_MINUTES",
        description="A run with no sign of life for this long is ended as failed "
        "(deadline_exceeded) by the run sweeper.",
    )
    run_sweep_schedule: str = Field(
        default="0 */15 * * * *",
        validation_alias="SWITCHBOARD_RUN_SWEEP_SCHEDULE",
        description="NCRONTAB schedule of the run sweeper (six fields, UTC).",
    )
    erasure_wait_seconds: int = Field(
        default=60,
        ge=1,
        le=3600,
        validation_alias="SWITCHBOARD_ERASURE_WAIT_SECONDS",
        description="How long an erasure waits before it looks again while segment syncs "
        "or push dispatches run.",
    )
    erasure_max_wait_seconds: int = Field(
        default=3600,
        ge=0,
        le=86400,
        validation_alias="SWITCHBOARD_ERASURE_MAX_WAIT_SECONDS",
        description="How long an erasure waits in all for runs under way before it goes ahead.",
    )
    audit_retention_days: int = Field(
        default=400,
        ge=31,
        le=3650,
        validation_alias="SWITCHBOARD_AUDIT_RETENTION_DAYS",
        description="How long the exclusion audit trail keeps a record (whole months are "
        "dropped once all of the month is older).",
    )

    webhook_standard_secrets: SecretStr | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_WEBHOOK_STANDARD_SECRETS",
        description="Standard Webhooks signing secrets (whsec_...), space-separated: two "
        "during a rotation. Unset: /api/webhooks/standard answers 404.",
    )
    webhook_sendgrid_public_keys: str | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_WEBHOOK_SENDGRID_PUBLIC_KEYS",
        description="SendGrid Signed Event Webhook verification keys (base64, as SendGrid "
        "shows them), space-separated: old and new while re-keying.",
    )
    webhook_mailgun_signing_keys: SecretStr | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_WEBHOOK_MAILGUN_SIGNING_KEYS",
        description="Mailgun Webhook Signing Keys, space-separated.",
    )
    webhook_twilio_auth_tokens: SecretStr | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_WEBHOOK_TWILIO_AUTH_TOKENS",
        description="Twilio Auth Tokens (primary, and secondary while promoting it).",
    )
    webhook_twilio_url: str | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_WEBHOOK_TWILIO_URL",
        description="The webhook URL exactly as entered at Twilio (Twilio signs it; behind a "
        "proxy it differs from what the app sees).",
    )
    webhook_sns_topic_arns: str | None = Field(
        default=None,
        validation_alias="SWITCHBOARD_WEBHOOK_SNS_TOPIC_ARNS",
        description="SNS topics whose SES notifications are accepted, space-separated.",
    )
    webhook_sns_cert_url_pattern: str = Field(
        default=r"https://sns\.[a-zA-Z0-9\-]{3,}\.amazonaws\.com(\.cn)?/[^?#]+\.pem",
        validation_alias="SWITCHBOARD_WEBHOOK_SNS_CERT_URL_PATTERN",
        description="Regular expression a SigningCertURL must match whole before it is fetched.",
    )
    webhook_sns_max_age_seconds: int = Field(
        default=3600,
        ge=60,
        le=86400,
        validation_alias="SWITCHBOARD_WEBHOOK_SNS_MAX_AGE_SECONDS",
        description="Oldest SNS message accepted (its Timestamp is the first attempt's, so "
        "at least the subscription's retry window).",
    )
    webhook_tolerance_seconds: int = Field(
        default=300,
        ge=30,
        le=3600,
        validation_alias="SWITCHBOARD_WEBHOOK_TOLERANCE_SECONDS",
        description="How far a signed webhook timestamp may be from now, either way.",
    )
    webhook_retention_days: int = Field(
        default=30,
        ge=1,
        le=3650,
        validation_alias="SWITCHBOARD_WEBHOOK_RETENTION_DAYS",
        description="How long raw webhook deliveries are kept after they were processed.",
    )
    webhook_batch_schedule: str = Field(
        default="*/5 * * * * *",
        validation_alias="SWITCHBOARD_WEBHOOK_BATCH_SCHEDULE",
        description="NCRONTAB schedule of the webhook batcher, which moves handled "
        "deliveries' events into the event store (six fields, UTC).",
    )

    @field_validator("aep_streaming", mode="before")
    @classmethod
    def _json_or_unset(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("expected a JSON object") from None
        return value

    @field_validator("currents_bucket", "push_ca_file")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        return value.strip() or None if value else None

    @field_validator("currents_prefix")
    @classmethod
    def _prefix_is_a_folder(cls, value: str) -> str:
        folder = value.strip().strip("/")
        return f"{folder}/" if folder else ""

    @field_validator(
        "log_export_schedule", "currents_schedule", "run_sweep_schedule", "webhook_batch_schedule"
    )
    @classmethod
    def _schedule_parses(cls, value: str) -> str:
        try:
            CronSchedule.parse(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("webhook_sns_cert_url_pattern")
    @classmethod
    def _pattern_compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator(
        "s3_endpoint_url", "braze_rest_endpoint", "apns_endpoint", "fcm_endpoint",
        "webhook_twilio_url",
    )  # fmt: skip
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value

    @staticmethod
    def named_secret(name: str) -> str | None:
        """A secret whose setting name a configuration document gives (push credentials):
        read from the environment on use, never stored on this object or logged."""
        value = os.environ.get(name)
        return value if value and value.strip() else None

    @model_validator(mode="after")
    def _streaming_is_configured(self) -> Settings:
        if self.export_target == "aep_streaming" and self.aep_streaming is None:
            raise ValueError(
                "SWITCHBOARD_EXPORT_TARGET is aep_streaming, "
                "but SWITCHBOARD_AEP_STREAMING is not set"
            )
        return self

    @model_validator(mode="after")
    def _storage_is_configured(self) -> Settings:
        if self.storage_connection is None and self.storage_account_name is None:
            raise ValueError(
                "AzureWebJobsStorage is not set: expected a storage connection string, "
                "UseDevelopmentStorage=true, or AzureWebJobsStorage__accountName for a "
                "managed-identity connection"
            )
        return self

    @property
    def input_limits(self) -> InputLimits:
        return InputLimits(self.max_line_bytes, self.max_field_bytes)

    def storage_account(self) -> StorageAccount:
        if self.storage_connection is not None:
            return parse_connection_string(self.storage_connection)
        assert self.storage_account_name is not None  # guaranteed by the model validator
        return StorageAccount.for_managed_identity(
            self.storage_account_name, client_id=self.storage_client_id
        )

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]


def _setting_name(location: tuple[int | str, ...]) -> str:
    if not location:
        return ""
    field = Settings.model_fields.get(str(location[0]))
    if field is not None and isinstance(field.validation_alias, str):
        return field.validation_alias
    return str(location[0])


def load_settings() -> Settings:
    """Read and validate every setting; raise ConfigError listing what is wrong."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            name = _setting_name(tuple(error["loc"]))
            problems.append(message if message.startswith(name) else f"{name}: {message}")
        raise ConfigError("invalid app settings: " + "; ".join(problems)) from None
