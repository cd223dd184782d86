from __future__ import annotations

import pytest

from core.errors import ConfigError
from core.settings import load_settings
from core.storage.connection import DEV_KEY

SECRET_KEY = "c2VjcmV0LWtleS1kby1ub3QtbG9n"  # base64 of a fake key


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "AzureWebJobsStorage",
        "AzureWebJobsStorage__accountName",
        "SWITCHBOARD_S3_ENDPOINT_URL",
        "SWITCHBOARD_LOG_EXPORT_SCHEDULE",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_development_storage_gives_azurite_endpoints(env: pytest.MonkeyPatch) -> None:
    env.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    account = load_settings().storage_account()
    assert account.blob_url == "http://127.0.0.1:10000/devstoreaccount1"
    assert account.queue_url == "http://127.0.0.1:10001/devstoreaccount1"
    assert account.table_url == "http://127.0.0.1:10002/devstoreaccount1"
    assert account.account_key == DEV_KEY


def test_defaults(env: pytest.MonkeyPatch) -> None:
    env.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    settings = load_settings()
    assert settings.log_export_schedule == "0 0 */4 * * *"
    assert settings.segments_trigger_source == "LogsAndContainerScan"
    assert settings.s3_endpoint_url is None


def test_missing_storage_names_the_setting(env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="AzureWebJobsStorage is not set"):
        load_settings()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("not a connection string", "expected 'Key=Value' pairs"),
        ("AccountName=acct", "expected AccountKey or SharedAccessSignature"),
        (f"AccountKey={SECRET_KEY}", "AccountName is missing"),
        ("AccountName=acct;AccountKey=%%%not-base64", "AccountKey is not valid base64"),
        (f"AccountName=a;AccountKey={SECRET_KEY};Bogus=1", "unknown key 'Bogus'"),
        (f"AccountName=a;AccountKey={SECRET_KEY};BlobEndpoint=ftp://x", "must be an http"),
        ("UseDevelopmentStorage=yes", "only accepts 'true'"),
    ],
)
def test_malformed_storage_fails_naming_it_without_echoing_secrets(
    env: pytest.MonkeyPatch, value: str, reason: str
) -> None:
    env.setenv("AzureWebJobsStorage", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "AzureWebJobsStorage is malformed" in message
    assert reason in message
    assert SECRET_KEY not in message


def test_full_connection_string(env: pytest.MonkeyPatch) -> None:
    env.setenv(
        "AzureWebJobsStorage",
        f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={SECRET_KEY};"
        "EndpointSuffix=core.windows.net",
    )
    account = load_settings().storage_account()
    assert account.blob_url == "https://acct.blob.core.windows.net"
    assert account.table_url == "https://acct.table.core.windows.net"
    assert not account.is_emulator


def test_managed_identity_connection(env: pytest.MonkeyPatch) -> None:
    env.setenv("AzureWebJobsStorage__accountName", "prodacct")
    env.setenv("AzureWebJobsStorage__clientId", "00000000-0000-0000-0000-000000000001")
    account = load_settings().storage_account()
    assert account.uses_managed_identity
    assert account.queue_url == "https://prodacct.queue.core.windows.net"
    assert account.managed_identity_client_id == "00000000-0000-0000-0000-000000000001"


def test_several_bad_settings_are_reported_together(env: pytest.MonkeyPatch) -> None:
    env.setenv("AzureWebJobsStorage", "UseDevelopmentStorage=true")
    env.setenv("SWITCHBOARD_LOG_EXPORT_SCHEDULE", "0 */4 * * *")
    env.setenv("SWITCHBOARD_S3_ENDPOINT_URL", "localhost:9000")
    env.setenv("SWITCHBOARD_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "SWITCHBOARD_LOG_EXPORT_SCHEDULE" in message and "expected 6 NCRONTAB fields" in message
    assert "SWITCHBOARD_S3_ENDPOINT_URL: expected an http:// or https:// URL" in message
    assert "SWITCHBOARD_LOG_LEVEL" in message


def test_every_setting_is_documented() -> None:
    from pathlib import Path

    from core.settings import Settings

    root = Path(__file__).resolve().parent.parent
    reference = (root / "docs" / "operations.md").read_text()
    example = (root / "local.settings.example.json").read_text()
    for field in Settings.model_fields.values():
        name = str(field.validation_alias)
        assert f"`{name}`" in reference, f"{name} missing from docs/operations.md"
        if not name.startswith("AzureWebJobsStorage__"):
            assert f'"{name}"' in example, f"{name} missing from local.settings.example.json"
