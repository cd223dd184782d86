"""Settings and services shared by every blueprint, built once per worker process.

Settings are validated when this module is imported, i.e. when the host indexes the app,
so a missing or malformed setting stops the app at start with a message naming it.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import azure.functions as func
from pydantic import BaseModel, ValidationError

from core.errors import StorageError
from core.services import Services
from core.settings import load_settings
from core.storage import BlobRef
from core.webhooks.hook import WebhookProvider
from core.webhooks.providers import configured_providers

M = TypeVar("M", bound=BaseModel)
SETTINGS = load_settings()
logging.getLogger("core").setLevel(SETTINGS.log_level_number)
# The storage SDKs log every request at INFO, URLs included; keep them to warnings.
logging.getLogger("azure").setLevel(logging.WARNING)
logging.getLogger("botocore").setLevel(logging.WARNING)


@functools.cache
def services() -> Services:
    return Services.from_settings(SETTINGS)


@functools.cache
def webhook_providers() -> dict[str, WebhookProvider]:
    return configured_providers(SETTINGS)


def json_response(status: int, body: Any) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status, mimetype="application/json"
    )


def error_response(status: int, code: str, message: str) -> func.HttpResponse:
    return json_response(status, {"error": {"code": code, "message": message}})


def json_errors(
    route: Callable[[func.HttpRequest], func.HttpResponse],
) -> Callable[[func.HttpRequest], func.HttpResponse]:
    """An exception escaping a route becomes a JSON 500 (503 for a storage failure worth
    retrying) instead of the host's empty one; the exception itself is only logged."""

    @functools.wraps(route)
    def answer(req: func.HttpRequest) -> func.HttpResponse:
        try:
            return route(req)
        except Exception as exc:
            logging.getLogger("functions").exception("route %s failed", route.__name__)
            if isinstance(exc, StorageError):
                return error_response(503, "storage_unavailable", "storage failed; try again")
            return error_response(500, "internal_error", "the request failed; see the logs")

    return answer


def parse_body(req: func.HttpRequest, model: type[M]) -> M | func.HttpResponse:
    """The JSON body as `model`, or a 400 naming each invalid field (never echoing values)."""
    try:
        return model.model_validate_json(req.get_body() or b"{}")
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        return error_response(400, "bad_request", problems)


def blob_ref(client: Any) -> BlobRef:
    """The version of the blob a blob trigger was handed (`azurefunctions` BlobClient)."""
    props = client.get_blob_properties()
    return BlobRef(
        client.container_name, client.blob_name, str(props.etag), props.size, props.last_modified
    )
