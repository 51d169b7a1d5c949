"""The short path of `POST /v1/stripe/webhook`: answered by a plain ASGI middleware, before
FastAPI's routing, dependency injection and response model.

A webhook delivery is the one request a Stripe account sends in bursts of thousands, and all
it needs is the raw body, one header and the billing service; the route's framework work
(matching every route, solving dependencies, validating the answer through pydantic) cost
about as much CPU as the rest of the request. The FastAPI route in `routes/billing.py` stays
declared, so the OpenAPI document still publishes the endpoint, and it is what answers when
the short path is off (`create_app(..., webhook_short_path=False)`); a test sends the same
deliveries both ways and compares status, headers and bodies byte for byte.

`RequestMiddleware` sits outside this one, so request ids, the JSON-only rule, access logs,
metrics and the last net for unexpected errors are the same for both paths.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from tollhouse.api.errors import domain_error
from tollhouse.api.middleware import posted_to
from tollhouse.app import Tollhouse
from tollhouse.errors import InvalidWebhookPayload, TollhouseError
from tollhouse.observability import Metrics

PATH = "/v1/stripe/webhook"
#: Stripe's events are far smaller; nothing unauthenticated is buffered past this.
MAX_BODY = 1 << 20


def too_large() -> InvalidWebhookPayload:
    return InvalidWebhookPayload("the body is too large for a Stripe event")


def render(content: Any) -> bytes:
    """JSON as Starlette's `JSONResponse` renders it, so both paths answer the same bytes."""
    return json.dumps(
        content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")


class WebhookShortPath:
    """Answers `POST /v1/stripe/webhook` itself; passes every other request on."""

    def __init__(
        self, app: ASGIApp, tollhouse: Tollhouse, metrics: Metrics, route: BaseRoute | None
    ) -> None:
        self.app = app
        self.tollhouse = tollhouse
        self.metrics = metrics
        #: The route's object, set in the scope as routing would, for the metrics' label.
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not posted_to(scope, PATH):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        signature = length = None
        for name, value in scope["headers"]:
            if name == b"stripe-signature":
                if signature is None:
                    signature = value.decode("latin-1")
            elif name == b"content-length" and length is None:
                length = value
        headers: dict[str, str] | None = None
        try:
            body = await bounded_body(receive, length)
            delivery = await self.tollhouse.billing.receive(body, signature)
        except TollhouseError as exc:
            status, content, headers = domain_error(exc)
        else:
            self.metrics.count_stripe_event(delivery.status)
            status = 200
            content = {
                "id": delivery.event_id,
                "type": delivery.type,
                "status": delivery.status,
                "error": delivery.error,
            }
        payload = render(content)
        raw = [
            *(
                (k.lower().encode("latin-1"), v.encode("latin-1"))
                for k, v in (headers or {}).items()
            ),
            (b"content-length", str(len(payload)).encode("latin-1")),
            (b"content-type", b"application/json"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})


async def bounded_body(receive: Receive, declared: str | bytes | None) -> bytes:
    """The raw body, refused as soon as it is known to be larger than any Stripe event (by
    its Content-Length, or while it streams in)."""
    if isinstance(declared, str):
        declared = declared.encode("latin-1")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise too_large()
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > MAX_BODY:
                raise too_large()
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
