"""The outermost layer of the HTTP service: request ids, access logs, metrics, the
JSON-only rule for API bodies, and a last net that turns any unhandled error into a 500
envelope without a traceback."""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time

import structlog
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollhouse.api.errors import envelope
from tollhouse.observability import Metrics

log = structlog.get_logger("tollhouse.http")

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID_HEADER_BYTES = REQUEST_ID_HEADER.encode()
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: The largest request body any route reads (the webhook's and the debit's short paths keep
#: smaller bounds of their own); larger is 413 before any of it is parsed.
MAX_BODY_BYTES = 1 << 20
_TOO_LARGE = f"The request body is larger than {MAX_BODY_BYTES} bytes."


class _BodyTooLarge(HTTPException):
    """A body without a Content-Length grew past `MAX_BODY_BYTES` while it streamed in. An
    HTTPException, so that FastAPI's body reading passes it on (it answers any other error
    of the body's stream as 400) to the error handlers, which answer its 413."""

    def __init__(self) -> None:
        super().__init__(413, _TOO_LARGE)


# A request id made here: 32 hex digits, a random prefix for the process and a counter (a
# uuid4 a request cost a getrandom system call).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def media_type(content_type: str) -> str:
    """The media type of a Content-Type value: lower case, without its parameters."""
    return content_type.split(";", 1)[0].strip().lower()


def _is_json(content_type: str) -> bool:
    media = media_type(content_type)
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def posted_to(scope: Scope, path: str) -> bool:
    """Whether the request is a POST to `path` as routing sees it: a short path answers only
    those, and stands aside under a root path (the app mounted below a prefix), where the
    raw path is not the route's."""
    return (
        scope["type"] == "http"
        and scope["path"] == path
        and scope["method"] == "POST"
        and not scope.get("root_path")
    )


class RequestMiddleware:
    """Pure ASGI middleware, so it also sees errors raised by other middleware. It runs on
    every request: the headers are read in one pass, and the metrics' labelled children are
    kept rather than looked up (`Metrics.child`)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        json_prefix: str = "/v1/",
        own_body_bounds: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.json_prefix = json_prefix
        #: Paths that bound their bodies themselves and answer with their own error (the
        #: Stripe webhook's 400 `invalid_payload`, which Stripe's retries rely on).
        self.own_body_bounds = own_body_bounds

    def _record(self, method: str, route: str, status: int, elapsed: float) -> None:
        metrics = self.metrics
        metrics.child(metrics.requests, method, route, str(status)).inc()
        metrics.child(metrics.latency, method, route).observe(elapsed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The last of a repeated header wins, as in a dict of the headers.
        incoming = content_type = ""
        length: str | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-length":
                length = value.decode("latin-1")
            elif name == b"transfer-encoding":
                chunked = True
        request_id = incoming if _VALID_REQUEST_ID.match(incoming) else _new_request_id()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        method = scope["method"]
        started = time.perf_counter()
        status = 500
        sent_start = False
        id_header = (REQUEST_ID_HEADER_BYTES, request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent_start
            if message["type"] == "http.response.start":
                status = message["status"]
                sent_start = True
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        bounded = scope["path"] not in self.own_body_bounds
        if bounded and length is None and chunked:
            receive = _bounded(receive)
        try:
            if (
                bounded
                and length is not None
                and length.strip().isdigit()
                and int(length) > MAX_BODY_BYTES
            ):
                await _send_error(send_with_id, 413, "payload_too_large", _TOO_LARGE)
            elif (
                method in _BODY_METHODS
                and scope["path"].startswith(self.json_prefix)
                and (length.strip() not in ("", "0") if length is not None else chunked)
                and not _is_json(content_type)
            ):
                await _send_error(
                    send_with_id,
                    415,
                    "unsupported_media_type",
                    "The request body must be JSON (Content-Type: application/json).",
                )
            else:
                await self.app(scope, receive, send_with_id)
        except _BodyTooLarge:
            if not sent_start:
                await _send_error(send_with_id, 413, "payload_too_large", _TOO_LARGE)
        except Exception:
            log.exception("unhandled_error", method=method, path=scope["path"])
            if not sent_start:
                await _send_error(
                    send_with_id,
                    500,
                    "internal_error",
                    "An unexpected error occurred; the request id identifies it in the logs.",
                    request_id=request_id,
                )
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"
            self._record(method, route, status, elapsed)
            log.info(
                "request",
                method=method,
                path=scope["path"],
                route=route,
                status=status,
                duration_ms=round(elapsed * 1000, 2),
            )
            structlog.contextvars.unbind_contextvars("request_id")


def _bounded(receive: Receive) -> Receive:
    """`receive`, raising `_BodyTooLarge` once the body passes `MAX_BODY_BYTES`: a body of
    declared length is bounded by that length (the server reads no more)."""
    size = 0

    async def bounded() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > MAX_BODY_BYTES:
                raise _BodyTooLarge()
        return message

    return bounded


async def _send_error(send: Send, status: int, code: str, message: str, **fields: str) -> None:
    body = json.dumps(envelope(code, message, **fields)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
