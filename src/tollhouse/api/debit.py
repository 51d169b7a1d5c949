"""The short path of `POST /v1/credits/debit`: answered by a plain ASGI middleware, before
FastAPI's routing and dependency injection, when the request is well formed.

A debit is the call an AI product makes on every LLM turn. Through FastAPI it cost
420-480 µs of the service's CPU (matching the path against every route, solving the key and
service dependencies, then the handler), against about 30 µs for the debit itself; the
HTTP rate was bound by that. This path reads the body, parses and validates it exactly as
the route does (`json.loads`, then `DebitBody` in Python mode, as FastAPI does for a JSON
body), authenticates the key and answers with the route's own code
(`routes.credits.run_debit`). Anything it does not take as is (no or an unknown key, a body
that is not JSON or not valid, another content type, a body over 64 KiB, an error looking
the key up, an app mounted under a root path) goes on to FastAPI untouched, with the body
read so far replayed, so every error is the route's own answer. It uses the services given
to `create_app`: FastAPI's dependency overrides do not reach it. The route stays declared
(the OpenAPI document publishes it) and answers everything when the short path is off
(`create_app(..., debit_short_path=False)`); a test sends the same requests both ways and
compares status, headers and bodies.

`RequestMiddleware` sits outside this one, so request ids, the JSON-only rule, access logs,
metrics and the last net for unexpected errors are the same for both paths.
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from fastapi.security.utils import get_authorization_scheme_param
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollhouse.api.errors import domain_error
from tollhouse.api.middleware import media_type, posted_to
from tollhouse.api.routes.credits import DebitBody, run_debit
from tollhouse.app import Tollhouse
from tollhouse.errors import TollhouseError

PATH = "/v1/credits/debit"
#: A debit's body is a few hundred bytes; a larger one goes the route's way.
MAX_BODY = 64 * 1024


class DebitShortPath:
    """Answers a well-formed `POST /v1/credits/debit` itself; passes everything else on."""

    def __init__(self, app: ASGIApp, tollhouse: Tollhouse, route: BaseRoute | None) -> None:
        self.app = app
        self.tollhouse = tollhouse
        #: The route's object, set in the scope as routing would, for the metrics' label.
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not posted_to(scope, PATH):
            await self.app(scope, receive, send)
            return
        authorization = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
        received: list[Message] = []
        body = await _read(receive, received)
        parsed = None
        if body is not None and _is_json(content_type):
            parsed = await self._parse(authorization, body)
        if parsed is None:
            await self.app(scope, _replaying(received, receive), send)
            return
        scope["route"] = self.route
        try:
            response = await run_debit(self.tollhouse, parsed)
        except TollhouseError as exc:
            status, content, headers = domain_error(exc)
            response = JSONResponse(content, status_code=status, headers=headers)
        await response(scope, receive, send)

    async def _parse(self, authorization: str | None, body: bytes) -> DebitBody | None:
        """The body, when it is valid and the key known; else None, and the route answers
        with its own error. Any failure here, a database error looking the key up
        included, leaves the request to the route, which meets it again and answers it."""
        scheme, credentials = get_authorization_scheme_param(authorization)
        if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
            return None
        try:
            parsed = DebitBody.model_validate(json.loads(body))
            if await self.tollhouse.keys.authenticate(credentials) is None:
                return None
        except Exception:  # the route answers whatever went wrong
            return None
        return parsed


def _is_json(content_type: str | None) -> bool:
    """What FastAPI reads as a JSON body, narrowed to the usual spelling."""
    return content_type is not None and media_type(content_type) == "application/json"


async def _read(receive: Receive, received: list[Message]) -> bytes | None:
    """The whole body (every message kept in `received`), or None once it is known to be
    more than MAX_BODY or the client went away."""
    size = 0
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return None
        size += len(message.get("body", b""))
        if size > MAX_BODY:
            return None
        if not message.get("more_body", False):
            return b"".join(m.get("body", b"") for m in received)


def _replaying(received: list[Message], receive: Receive) -> Receive:
    """`receive` for the route: the messages read here first, then the rest."""
    pending = list(received)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
