"""Reading Braze Currents objects from S3 (or an S3-compatible store) with boto3.

Key layout (braze.md §2.1); only `event_type=` and `date=` are structured, the rest is
opaque and may change:

    <prefix>/dataexport.<cluster>.S3.integration.<id>/event_type=<type>/date=<YYYY-MM-DD-HH>/
        <schema-id>/<zone>/dataexport....+<partition>+<offset>.avro
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict

from core.errors import ConfigError, SwitchboardError, TransientError

_EVENT_TYPE = "event_type="
_DATE = "date="
_CONFIG_CODES = frozenset(
    {
        "NoSuchBucket",
        "InvalidBucketName",
        "AllAccessDisabled",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AuthorizationHeaderMalformed",
        "PermanentRedirect",
    }
)


class CurrentsObject(BaseModel):
    """One object version; also the `currents-files` queue message that hands it out."""

    model_config = ConfigDict(frozen=True)

    bucket: str
    key: str
    etag: str
    size: int
    event_type: str
    date: str
    """The `date=` folder: the hour Braze queued the events, `YYYY-MM-DD-HH`."""

    @property
    def event_folder(self) -> str:
        return self.key[: self.key.index(_EVENT_TYPE)] + _EVENT_TYPE + self.event_type + "/"


def parse_key(bucket: str, key: str, etag: str, size: int) -> CurrentsObject | None:
    """The structured parts of a Currents key, or None for a key outside the layout."""
    parts = key.split("/")
    event_type = next((p[len(_EVENT_TYPE) :] for p in parts if p.startswith(_EVENT_TYPE)), None)
    date = next((p[len(_DATE) :] for p in parts if p.startswith(_DATE)), None)
    if not event_type or not date or not key.endswith(".avro"):
        return None
    return CurrentsObject(
        bucket=bucket, key=key, etag=etag.strip('"'), size=size, event_type=event_type, date=date
    )


def s3_client(endpoint_url: str | None, region: str) -> Any:
    """A boto3 S3 client; credentials come from the standard AWS chain (env, profile, role)."""
    config = Config(
        region_name=region,
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def classify(exc: Exception, what: str) -> SwitchboardError:
    """A boto error as Switchboard's: ConfigError (bucket, credentials) or TransientError."""
    if isinstance(exc, ClientError):
        code = error_code(exc)
        if code in _CONFIG_CODES:
            return ConfigError(
                f"{what}: S3 refused the request ({code}); check the bucket and credentials"
            )
        return TransientError(f"{what}: S3 answered {code or 'an error'}")
    return TransientError(f"{what}: {type(exc).__name__}")


def error_code(exc: ClientError) -> str:
    error: dict[str, Any] = dict(exc.response.get("Error") or {})
    return str(error.get("Code", ""))


def _pages(s3: Any, **arguments: Any) -> Iterator[dict[str, Any]]:
    token: str | None = None
    while True:
        request = dict(arguments, ContinuationToken=token) if token else arguments
        try:
            page: dict[str, Any] = s3.list_objects_v2(**request)
        except (ClientError, BotoCoreError) as exc:
            raise classify(
                exc, f"listing s3://{arguments['Bucket']}/{arguments['Prefix']}"
            ) from exc
        yield page
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


def event_type_folders(s3: Any, bucket: str, prefix: str) -> list[str]:
    """`.../event_type=<type>/` folders under the prefix, at most two levels down."""
    found: list[str] = []
    level = [prefix]
    for _ in range(3):
        below: list[str] = []
        for folder in level:
            for page in _pages(s3, Bucket=bucket, Prefix=folder, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    name = str(common["Prefix"])
                    last = name.rstrip("/").rsplit("/", 1)[-1]
                    (found if last.startswith(_EVENT_TYPE) else below).append(name)
        if found or not below:
            break
        level = below
    return sorted(found)


def list_folder(
    s3: Any, bucket: str, folder: str, from_date: str, *, page_size: int = 1000
) -> Iterator[CurrentsObject]:
    """Objects of one event type folder in `date=` folders from `from_date` on, paged."""
    start_after = f"{folder}{_DATE}{from_date}"
    pages = _pages(s3, Bucket=bucket, Prefix=folder, StartAfter=start_after, MaxKeys=page_size)
    for page in pages:
        for item in page.get("Contents", []):
            parsed = parse_key(bucket, item["Key"], str(item["ETag"]), int(item["Size"]))
            if parsed is not None:
                yield parsed
