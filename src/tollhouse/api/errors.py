"""The error envelope and the one table that maps domain errors to HTTP statuses.

Every error answer reads `{"error": {"code": "<machine_code>", "message": "...", ...fields}}`.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tollhouse import errors as e

log = structlog.get_logger("tollhouse.http")

#: Domain error -> HTTP status. A class not listed takes the status of its nearest listed
#: ancestor, so a new leaf needs a line here only when it differs from its parent.
STATUS: dict[type[e.TollhouseError], int] = {
    e.TollhouseError: 500,
    e.ConfigurationError: 500,
    e.DatabaseError: 500,
    e.DatabaseUnavailable: 503,
    e.MigrationError: 503,
    e.SerializationRetriesExhausted: 503,
    e.UniqueViolation: 409,
    e.ConstraintViolation: 422,
    e.NotFound: 404,
    e.InvalidRequest: 422,
    e.Unauthenticated: 401,
    e.Conflict: 409,
    e.Forbidden: 403,
    e.TooManyRequests: 429,
    e.PaymentRequired: 402,
    e.Gone: 410,
    e.ProviderNotConfigured: 400,
    e.InvalidToken: 400,
    e.ProviderUnavailable: 503,
    e.InvalidWebhookSignature: 400,
    e.InvalidWebhookPayload: 400,
    e.WebhookNotConfigured: 503,
    e.StripeNotConfigured: 503,
    e.StripeUnavailable: 502,
}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}

#: Fields that are safe to show a client; others (SQLSTATEs, constraint names) stay in logs.
_PRIVATE_FIELDS = frozenset({"sqlstate", "constraint"})


def status_for(exc: e.TollhouseError) -> int:
    """The HTTP status of a domain error."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def envelope(code: str, message: str, **fields: Any) -> dict[str, Any]:
    """The body of every error answer."""
    return {"error": {"code": code, "message": message, **fields}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **fields: Any
) -> JSONResponse:
    return JSONResponse(envelope(code, message, **fields), status_code=status, headers=headers)


def domain_error(exc: e.TollhouseError) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """The status, body and extra headers of the answer to a domain error; a server-side
    one is logged with its details, which stay out of the body."""
    status = status_for(exc)
    fields = {k: v for k, v in exc.fields.items() if k not in _PRIVATE_FIELDS}
    message = exc.message if status < 500 else (type(exc).__doc__ or "").strip() or exc.message
    if status >= 500:
        # The client gets the class's plain message; the details go to the logs.
        log.error("request_failed", code=exc.code, error=exc.message, exc_info=exc, **exc.fields)
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        if request_id:
            fields["request_id"] = request_id
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return status, envelope(exc.code, message, **_jsonable(fields)), headers


def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.TollhouseError)
    status, body, headers = domain_error(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(err.get("type") == "json_invalid" for err in errors):
        return error_response(400, "invalid_json", "The request body is not valid JSON.")
    details = [
        {
            "loc": [str(p) for p in err.get("loc", ())],
            "msg": err.get("msg"),
            "type": err.get("type"),
        }
        for err in errors
    ]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(first["loc"][1:] if len(first["loc"]) > 1 else first["loc"])
    return error_response(
        422,
        "validation_error",
        f"{where}: {first['msg']}" if where else str(first["msg"]),
        errors=details,
    )


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, detail, dict(exc.headers or {}))


def _jsonable(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | int | float | bool | None | list) else str(v)
        for k, v in fields.items()
    }


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the envelope."""
    app.add_exception_handler(e.TollhouseError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
