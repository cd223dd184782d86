"""Operator routes for the suppression list (manual blocklist and corrections)."""

from __future__ import annotations

import azure.functions as func

from core.suppression import SuppressionChange, apply_operator_change, lookup
from functions._wiring import error_response, json_errors, json_response, parse_body, services

bp = func.Blueprint()


@bp.route(route="suppressions", methods=["POST", "DELETE"], auth_level=func.AuthLevel.FUNCTION)
@json_errors
def change_suppression(req: func.HttpRequest) -> func.HttpResponse:
    change = parse_body(req, SuppressionChange)
    if isinstance(change, func.HttpResponse):
        return change
    try:
        result = apply_operator_change(services().storage, change, add=req.method == "POST")
    except ValueError as exc:
        return error_response(400, "bad_address", str(exc))
    return json_response(201 if req.method == "POST" else 200, result)


@bp.route(route="suppressions/lookup", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@json_errors
def lookup_suppression(req: func.HttpRequest) -> func.HttpResponse:
    change = parse_body(req, SuppressionChange)
    if isinstance(change, func.HttpResponse):
        return change
    try:
        return json_response(200, lookup(services().storage, change))
    except ValueError as exc:
        return error_response(400, "bad_address", str(exc))
