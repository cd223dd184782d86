"""Settings and services shared by every blueprint, built once per worker process.

Settings are validated when this module is imported, i.e. when the host indexes the app,
so a missing or malformed setting stops the app at start with a message naming it.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import azure.functions as func

from core.services import Services
from core.settings import load_settings

SETTINGS = load_settings()
logging.getLogger("core").setLevel(SETTINGS.log_level_number)
# The storage SDKs log every request at INFO, URLs included; keep them to warnings.
logging.getLogger("azure").setLevel(logging.WARNING)
logging.getLogger("botocore").setLevel(logging.WARNING)


@functools.cache
def services() -> Services:
    return Services.from_settings(SETTINGS)


def json_response(status: int, body: Any) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, default=str), status_code=status, mimetype="application/json"
    )


def error_response(status: int, code: str, message: str) -> func.HttpResponse:
    return json_response(status, {"error": {"code": code, "message": message}})
